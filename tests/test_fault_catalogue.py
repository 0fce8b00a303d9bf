"""The catalogue of bad inputs and faults: every stage script, run as `dvc repro` runs it, on a
tiny finished project with one thing broken. Each case asserts the exit code, the one-sentence
message (never a traceback) and that nothing half-written is left behind.

The project is built once (digits, a width-8 teacher, one epoch each); every case works on its
own copy. The stage scripts run in this process through ``runpy`` (a subprocess per case would
cost a torch import each); test_e2e_bad_params.py and test_workspace.py run real processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import runpy
import shutil
import signal
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from kdpipe import models
from kdpipe.checkpoint import Checkpoint
from kdpipe.workspace import LOCK_FILE, leftovers
from tests.conftest import PROJECT_ROOT
from tests.data_fixtures import cifar_members, md5, write_tar
from tests.dvc_project import set_params

TINY = {
    "teacher.resnet18.width": 8, "teacher.epochs": 1, "teacher.batch_size": 128,
    "student.epochs": 1, "student.student_cnn.widths": [8, 16], "kd.methods": ["logit", "multi_teacher"],
    "kd.multi_teacher.teachers": ["teachers/ensemble/second.pt"],
    "mlflow.enabled": False, "runtime.threads": 1,
    "evaluate.latency_warmup": 0, "evaluate.latency_runs": 2, "evaluate.wait_alone_s": 0,
}
BUILD = ["check_params", "download", "prepare", "train_teacher", "train_student", "teacher_targets", "kd_settings",
         "distill --method logit"]


def run_stage(root: Path, stage: str) -> tuple[int, str]:
    """Run ``stages/<stage>.py`` (with its arguments) in ``root`` as DVC would; (exit code, stderr)."""
    script, *args = stage.split()
    cwd, argv, handler = os.getcwd(), sys.argv, signal.getsignal(signal.SIGTERM)
    err = io.StringIO()
    code = 0
    try:
        os.chdir(root)
        sys.argv = [f"stages/{script}.py", *args]
        old_err, sys.stderr = sys.stderr, err
        try:
            runpy.run_path(f"stages/{script}.py", run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stderr = old_err
    finally:
        os.chdir(cwd)
        sys.argv = argv
        signal.signal(signal.SIGTERM, handler)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalogue") / "project"
    root.mkdir()
    for name in ("stages", "conf", "teachers"):
        shutil.copytree(PROJECT_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(PROJECT_ROOT / "params.yaml", root / "params.yaml")
    set_params(root / "params.yaml", {**TINY, "kd.methods": ["logit"], "kd.multi_teacher.teachers": []})
    for stage in BUILD:
        code, err = run_stage(root, stage)
        assert code == 0, f"{stage}: {err[-2000:]}"
    (root / "teachers" / "ensemble").mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "models" / "teacher.pt", root / "teachers" / "ensemble" / "second.pt")
    set_params(root / "params.yaml", TINY)
    assert run_stage(root, "kd_settings")[0] == 0
    return root


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


# ---- the faults: each takes the project copy and breaks one thing ------------------------------


def param(key: str, value) -> Callable[[Path], None]:
    return lambda root: set_params(root / "params.yaml", {key: value})


def write(rel: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes(data)


def truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def fault(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: int(len(data) * keep)])
    return fault


def remove(rel: str) -> Callable[[Path], None]:
    def fault(root: Path) -> None:
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return fault


def torch_save(rel: str, obj_factory: Callable[[], object]) -> Callable[[Path], None]:
    return lambda root: torch.save(obj_factory(), root / rel)


def npy_save(rel: str, array: np.ndarray) -> Callable[[Path], None]:
    return lambda root: np.save(root / rel, array)


def older_prepared_format(root: Path) -> None:
    """data/prepared as kdpipe wrote it before the image store: <split>.pt files."""
    for split in ("train", "val", "test"):
        (root / f"data/prepared/{split}_images.npy").unlink()
        (root / f"data/prepared/{split}_labels.npy").unlink()
        torch.save({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.int64)},
                   root / f"data/prepared/{split}.pt")


def edit_logits(how: str) -> Callable[[Path], None]:
    def fault(root: Path) -> None:
        path = root / "data/teacher_targets/logits.npy"
        logits = np.load(path)
        logits[0, :50] = np.nan if how == "nan" else logits[0, :50] + 3.0
        np.save(path, logits)
    return fault


def model_for_other_data(root: Path) -> None:
    model, meta = models.load(root / "models/teacher.pt")
    data_meta = {"class_names": meta["class_names"], "channels": 1, "image_size": 16,
                 "mean": meta["preprocessing"]["mean"], "std": meta["preprocessing"]["std"]}
    models.save(root / "models/teacher.pt", model, meta["arch"], meta["arch_params"], data_meta)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def cifar_archive(links=None, extra=None, md5_override: str | None = None) -> Callable[[Path], None]:
    def fault(root: Path) -> None:
        members = {**cifar_members(per_batch=10, train_batches=1), **(extra or {})}
        archive = write_tar(root / "cifar.tar.gz", members, links=links)
        set_params(root / "params.yaml", {"data.name": "cifar10", "data.cifar10.url": str(archive),
                                          "data.cifar10.md5": md5_override or md5(archive)})
    return fault


def held_lock(root: Path) -> None:
    (root / ".kdpipe").mkdir(exist_ok=True)
    # this test process holds it, as a stage script would: the lock names a part of its command line
    # (under `make test` that is an xdist worker's, which does not contain "pytest")
    command = json.dumps(psutil.Process().cmdline()[0])
    (root / LOCK_FILE).write_text(f'{{"pid": {os.getpid()}, "command": {command}, "started": "now"}}')


def stale_lock_and_leftovers(root: Path) -> None:
    (root / ".kdpipe").mkdir(exist_ok=True)
    (root / LOCK_FILE).write_text('{"pid": 999999999, "command": "stages/train_teacher.py", "started": "then"}')
    (root / "models" / ".teacher.pt.x1y2.tmp").write_bytes(b"half")
    (root / "data" / ".teacher_targets.abc.tmp").mkdir()


def foreign_checkpoint(root: Path) -> None:
    Checkpoint("baseline", "another run's fingerprint", root / ".kdpipe/checkpoints").save({"history": []})


def corrupt_checkpoint(root: Path) -> None:
    (root / ".kdpipe/checkpoints").mkdir(parents=True, exist_ok=True)
    (root / ".kdpipe/checkpoints/baseline.pt").write_bytes(b"not a checkpoint")


@dataclass(frozen=True)
class Case:
    id: str
    fault: Callable[[Path], None]
    stage: str
    code: int
    message: str  # a substring of stderr ("" for none)
    unchanged: tuple[str, ...] = ()  # outputs that must keep their bytes (nothing half-written)
    lock_is_others: bool = False  # the fault is another stage holding the workspace: its lock stays
    env: tuple[tuple[str, str], ...] = ()  # environment variables set for the stage


CASES = [
    # -- params: check_params stops them before anything runs (exit 2, kdpipe's sentence)
    Case("unknown data set", param("data.name", "mnist"), "check_params", 2,
         "data.name='mnist' is not allowed; expected one of cats_vs_dogs, cifar10, csv, digits, imagefolder, intel."),
    Case("temperature that zeroes the KD term", param("kd.temperature", 1e-30), "check_params", 2,
         "kd.temperature=1e-30 is not allowed"),
    Case("temperature that makes every output uniform", param("kd.temperature", 1000), "check_params", 2,
         "kd.temperature=1000.0 is not allowed"),
    Case("alpha 0: no teacher term", param("kd.alpha", 0), "check_params", 2, "that is the baseline"),
    Case("alpha above 1", param("kd.alpha", 1.5), "check_params", 2, "kd.alpha=1.5 is not allowed"),
    Case("zero epochs", param("teacher.epochs", 0), "check_params", 2, "teacher.epochs=0 is not allowed"),
    Case("unknown KD method", param("kd.methods", ["hinton"]), "check_params", 2, "'hinton'"),
    Case("no KD method", param("kd.methods", []), "check_params", 2, "kd.methods=[] is not allowed"),
    Case("too few bootstrap resamples", param("evaluate.bootstrap_resamples", 10), "check_params", 2,
         "evaluate.bootstrap_resamples=10 is not allowed"),
    Case("typo in a key", param("kd.temprature", 3), "check_params", 2, "kd.temprature"),
    Case("unknown device", param("runtime.device", "tpu"), "check_params", 2, "runtime.device='tpu'"),
    Case("params.yaml that is not YAML", write("params.yaml", b"kd: [unclosed\n"), "check_params", 2,
         "params.yaml"),
    Case("multi_teacher without extra teachers", param("kd.multi_teacher.teachers", []), "check_params", 2,
         "kd.multi_teacher.teachers"),
    # -- model files
    Case("truncated teacher", truncate("models/teacher.pt"), "distill --method logit", 2,
         "models/teacher.pt is truncated or corrupt", ("models/distilled_logit.pt",)),
    Case("a plain state_dict as the teacher",
         torch_save("models/teacher.pt", lambda: models.build("student_cnn", 1, 10, 8).state_dict()),
         "distill --method logit", 2, "models/teacher.pt is not a kdpipe model file", ("models/distilled_logit.pt",)),
    Case("a malicious pickle as a model", torch_save("models/baseline.pt", Evil), "evaluate", 2,
         "models/baseline.pt holds objects other than tensors", ("metrics/evaluation.json",)),
    Case("random bytes as a model", write("models/teacher.pt", os.urandom(4096)), "teacher_targets", 2,
         "models/teacher.pt is truncated or corrupt", ("data/teacher_targets/logits.npy",)),
    Case("a teacher trained on other images", model_for_other_data, "teacher_targets", 2,
         "models/teacher.pt was trained on other data (image size 16 in the model vs 8 in data/prepared)",
         ("data/teacher_targets/logits.npy",)),
    Case("missing teacher", remove("models/teacher.pt"), "distill --method logit", 2,
         "models/teacher.pt not found; run the stage that trains it (dvc repro)."),
    Case("missing extra teacher", remove("teachers/ensemble/second.pt"), "distill --method multi_teacher", 2,
         "teachers/ensemble/second.pt not found; train it"),
    # -- prepared data
    Case("truncated prepared split", truncate("data/prepared/train_images.npy"), "train_student", 2,
         "data/prepared/train_images.npy is truncated or corrupt", ("models/baseline.pt",)),
    Case("a prepared split holding something else", npy_save("data/prepared/train_images.npy", np.zeros((4, 8))),
         "train_student", 2, "data/prepared/train_images.npy is not a prepared split", ("models/baseline.pt",)),
    Case("prepared labels that do not match the images", npy_save("data/prepared/val_labels.npy", np.zeros(3, np.int64)),
         "train_student", 2, "data/prepared/val_labels.npy 3 labels", ("models/baseline.pt",)),
    Case("prepared data of an older kdpipe", older_prepared_format, "train_student", 2,
         "data/prepared is in the format of an older kdpipe (train.pt); rebuild it", ("models/baseline.pt",)),
    Case("prepared meta that is not JSON", write("data/prepared/meta.json", b"{oops"), "train_student", 2,
         "data/prepared/meta.json is not valid JSON", ("models/baseline.pt",)),
    Case("no prepared data", remove("data/prepared"), "train_student", 2,
         "data/prepared/meta.json not found; run the prepare stage first"),
    # -- the teacher-targets cache
    Case("edited cached logits (same shape)", edit_logits("shift"), "distill --method logit", 2,
         "logits.npy is missing or its contents changed", ("models/distilled_logit.pt",)),
    Case("NaN rows in the cached logits", edit_logits("nan"), "distill --method logit", 2,
         "logits.npy is missing or its contents changed", ("models/distilled_logit.pt",)),
    Case("truncated cached logits", truncate("data/teacher_targets/logits.npy"), "distill --method logit", 2,
         "logits.npy is missing or its contents changed"),
    Case("missing cache", remove("data/teacher_targets"), "distill --method logit", 2,
         "run the teacher_targets stage first"),
    Case("a cache made for another batch size", param("student.batch_size", 32), "distill --method logit", 2,
         "were computed for another run"),
    Case("kd settings file out of date", param("kd.temperature", 2.0), "distill --method logit", 2,
         "data/kd_settings/logit.json"),
    # -- training that diverges: nothing written
    Case("student learning rate 1e30", param("student.lr", 1e30), "train_student", 2,
         "baseline training diverged in epoch 1", ("models/baseline.pt", "metrics/baseline.json")),
    Case("teacher learning rate 1e30", param("teacher.lr", 1e30), "train_teacher", 2,
         "teacher training diverged in epoch 1", ("models/teacher.pt", "metrics/teacher.json")),
    # -- archives (download): refused before anything is extracted
    Case("CIFAR archive with data_batch_5 -> test_batch",
         cifar_archive(links={"cifar-10-batches-py/data_batch_5": (tarfile.SYMTYPE, "test_batch")}), "download", 2,
         "member 'cifar-10-batches-py/data_batch_5' is a link (to 'test_batch')"),
    Case("CIFAR archive with a hard link", cifar_archive(links={"cifar-10-batches-py/x": (tarfile.LNKTYPE,
                                                                         "cifar-10-batches-py/test_batch")}),
         "download", 2, "is a link"),
    Case("CIFAR archive climbing out with ..", cifar_archive(extra={"../evil.txt": b"x"}), "download", 2,
         "climbs out of the target folder"),
    Case("CIFAR archive with the wrong md5", cifar_archive(md5_override="0" * 32), "download", 2, "md5"),
    Case("Intel zip path that does not exist",
         lambda root: set_params(root / "params.yaml", {"data.name": "intel", "data.intel.zip_path": "nope.zip"}),
         "download", 2, "data.intel.zip_path='nope.zip' does not exist"),
    Case("Cats vs Dogs data_dir typo",
         lambda root: set_params(root / "params.yaml", {"data.name": "cats_vs_dogs",
                                                        "data.cats_vs_dogs.data_dir": "tfds_dta"}),
         "download", 2, "data.cats_vs_dogs.data_dir='tfds_dta' is not a folder"),
    # -- one workspace, one run
    Case("another stage holds the workspace", held_lock, "train_student", 2,
         "is running in this workspace", ("models/baseline.pt",), lock_is_others=True),
    Case("a stale lock and a killed stage's temp files", stale_lock_and_leftovers, "kd_settings", 0,
         "removed 2 temporary file(s) left by an interrupted stage"),
    # -- tracking never costs a training
    Case("unreachable tracking server", param("mlflow.enabled", True), "kd_settings", 0, "", env=(
        ("MLFLOW_TRACKING_URI", "http://127.0.0.1:9"),)),
    Case("unreachable tracking server, evaluate",
         lambda root: set_params(root / "params.yaml", {"mlflow.enabled": True, "kd.methods": ["logit"],
                                                        "kd.multi_teacher.teachers": []}), "evaluate", 0,
         "warning: the MLflow tracking store http://127.0.0.1:9 cannot be used (no answer within 5s",
         env=(("MLFLOW_TRACKING_URI", "http://127.0.0.1:9"),)),
    Case("unreachable tracking server with mlflow.required",
         lambda root: set_params(root / "params.yaml", {"mlflow.enabled": True, "mlflow.required": True}),
         "evaluate", 2, "error: the MLflow tracking store http://127.0.0.1:9 cannot be used",
         ("metrics/evaluation.json",), env=(("MLFLOW_TRACKING_URI", "http://127.0.0.1:9"),)),
    # -- checkpoints that must not be resumed
    Case("a checkpoint of another run", foreign_checkpoint, "train_student", 0,
         "made for other params, code or inputs; training starts from epoch 1"),
    Case("a corrupt checkpoint", corrupt_checkpoint, "train_student", 0,
         "ignoring the unreadable checkpoint"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(golden, tmp_path, monkeypatch, case: Case):
    root = tmp_path / "project"
    shutil.copytree(golden, root, symlinks=True)
    case.fault(root)
    before = {rel: digest(root / rel) for rel in case.unchanged}
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    code, err = run_stage(root, case.stage)
    assert code == case.code, err[-3000:]
    assert case.message in err, err[-3000:]
    assert "Traceback" not in err
    if code != 0:
        assert err.strip().splitlines()[-1].startswith("error: "), err[-2000:]
    assert {rel: digest(root / rel) for rel in case.unchanged} == before  # nothing (half-)written over them
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert leftovers() == []  # no temporary file left behind
        assert LOCK_FILE.exists() == case.lock_is_others  # the stage released its lock
    finally:
        os.chdir(cwd)
    assert not (root / "pwned.txt").exists()  # nothing malicious ever ran


def test_the_catalogue_covers_enough_faults():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def test_the_build_left_no_checkpoints(golden):
    assert not (golden / ".kdpipe" / "checkpoints").exists() or not any((golden / ".kdpipe/checkpoints").iterdir())


def test_params_yaml_round_trips(golden):
    assert yaml.safe_load((golden / "params.yaml").read_text())["kd"]["methods"] == ["logit", "multi_teacher"]
