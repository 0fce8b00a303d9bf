"""Shared fixtures: small prepared data sets made by the tests themselves, and the one way the
distillation tests build a KD method (its registry entry, its resolved settings, its inputs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdpipe.data.prepare import PreparedData, Split
from kdpipe.distill import METHODS, MethodInputs, OnlineTeacher, TeacherLogits

PROJECT_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("PYTHONWARNINGS", "ignore")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs files in parallel workers: one thread each, or they make each other wait
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def make_prepared(n_train: int = 64, n_val: int = 32, n_test: int = 32, channels: int = 1, size: int = 8,
                  classes: int = 4, flip: bool = False, seed: int = 0) -> PreparedData:
    """A learnable toy data set: each class is a bright square in its own quadrant, plus noise."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        labels = torch.arange(n) % classes
        images = torch.randint(0, 60, (n, channels, size, size), generator=gen, dtype=torch.uint8)
        half = size // 2
        for i, c in enumerate(labels.tolist()):
            r, q = divmod(c % 4, 2)
            images[i, :, r * half:(r + 1) * half, q * half:(q + 1) * half] += 150
        return Split(images, labels)

    meta = {
        "dataset": "toy", "class_names": [f"c{i}" for i in range(classes)], "channels": channels,
        "image_size": size, "mean": [0.3] * channels, "std": [0.3] * channels, "flip": flip,
        "sizes": {"train": n_train, "val": n_val, "test": n_test},
    }
    return PreparedData(split(n_train), split(n_val), split(n_test), meta)


@pytest.fixture
def toy_data() -> PreparedData:
    return make_prepared()


def method_settings(method: str, **kd: Any) -> Any:
    """``params.kd.method(method)`` for a ``kd`` section given as keywords, e.g.
    ``method_settings("dkd", temperature=2.0, dkd={"beta": 8.0})``."""
    from kdpipe.config import parse_params  # here: importing config discovers every plug-in

    return parse_params({"kd": kd}).kd.method(method)


def method_inputs(student: nn.Module, teacher: nn.Module | TeacherLogits, label_smoothing: float = 0.0,
                  input_shape: tuple[int, int, int] = (1, 8, 8), meta: dict[str, Any] | None = None) -> MethodInputs:
    """What the distill workflow hands a method; a plain ``teacher`` model runs online."""
    targets = teacher if isinstance(teacher, TeacherLogits) else OnlineTeacher(teacher)
    return MethodInputs(student, targets, label_smoothing, input_shape, meta or {})


def build_method(method: str, student: nn.Module, teacher: nn.Module | TeacherLogits, *, label_smoothing: float = 0.0,
                 input_shape: tuple[int, int, int] = (1, 8, 8), meta: dict[str, Any] | None = None,
                 **kd: Any) -> nn.Module:
    """The objective the distill workflow builds: the registered factory, called with the
    method's inputs and its settings resolved from ``kd`` (see :func:`method_settings`)."""
    inputs = method_inputs(student, teacher, label_smoothing, input_shape, meta)
    return METHODS.get(method).factory(inputs, method_settings(method, **kd))


# Tiny epochs, three KD methods: the reproduced project that test_e2e_kd_methods.py and
# test_e2e_team.py share (one `dvc repro` for both: CI time).
KD_METHODS_TINY_PARAMS = {
    "teacher.epochs": 1, "teacher.batch_size": 128, "student.epochs": 1, "student.batch_size": 128,
    "kd.methods": ["logit", "attention", "dkd"],
    "evaluate.latency_warmup": 0, "evaluate.latency_runs": 2, "evaluate.wait_alone_s": 0, "evaluate.batch_size": 512,
    "mlflow.log_models": False,
    "runtime.threads": 1,  # two shared cores: one thread each is fastest
}


@pytest.fixture(scope="session")
def kd_methods_project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tiny-epoch copy of the project, reproduced (``dvc repro``) and committed with kd.methods
    [logit, attention, dkd]. Shared by modules: a test that changes it puts it back (experiments
    removed, workspace checked out)."""
    import subprocess

    from tests.dvc_project import make_dvc_project

    root, env = make_dvc_project(tmp_path_factory.mktemp("kd_e2e"), KD_METHODS_TINY_PARAMS,
                                 env={"PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"})
    for cmd in (["dvc", "repro"], ["git", "add", "-A"], ["git", "commit", "-qm", "reproduced"]):
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return root, env

