"""End to end with real dvc commands: the teacher_targets stage depends on what decides the
teacher's logits on the student's views, and on nothing of kd.* except the on/off switch."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.dvc_project import make_dvc_project

pytestmark = pytest.mark.e2e


def _run(root: Path, env: dict, *cmd: str) -> str:
    done = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def _set(params_path: Path, **changes) -> None:
    params = yaml.safe_load(params_path.read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def _changed(root: Path, env: dict) -> set[str]:
    out = _run(root, env, "dvc", "status", "--json")
    return set(json.loads(out[out.index("{"):]) if "{" in out else {})


TINY_PARAMS = {
    "teacher.epochs": 1, "teacher.batch_size": 256, "student.epochs": 2, "student.batch_size": 256,
    "evaluate.batch_size": 64, "evaluate.latency_warmup": 1, "evaluate.latency_runs": 2, "evaluate.wait_alone_s": 0, "mlflow.log_models": False,
    "runtime.threads": 1, "kd.teacher_targets": "cached", "kd.methods": ["logit"],
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root, env = make_dvc_project(tmp_path_factory.mktemp("kdpipe_tt"), TINY_PARAMS, env={"PYTHONWARNINGS": "ignore"})
    for name in ("data", "data/raw", "models", "metrics", "plots", "reports"):
        (root / name).mkdir(exist_ok=True)
    first = _run(root, env, "dvc", "repro")
    return root, env, first


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_repro_stores_the_targets_and_distills_from_them(project):
    root, env, first = project
    assert "teacher_targets" in _stages_run(first)
    meta = json.loads((root / "data/teacher_targets/meta.json").read_text())
    logits = np.load(root / "data/teacher_targets/logits.npy")
    assert meta["mode"] == "cached" and logits.shape == (2, meta["train_images"], 10) == tuple(meta["shape"])
    assert "teacher_targets" in (root / "data/.gitignore").read_text()
    assert _changed(root, env) == set()


def test_kd_params_leave_the_teacher_targets_up_to_date(project):
    root, env, _ = project
    _set(root / "params.yaml", kd__temperature=2.0, kd__alpha=0.5)
    changed = _changed(root, env)
    assert "teacher_targets" not in changed and "train_teacher" not in changed
    # kd.* reaches the distill stages through kd_settings (data/kd_settings/<method>.json)
    downstream = {"check_params", "kd_settings", "distill@logit", "evaluate", "export", "report"}  # check_params: any param
    assert "kd_settings" in changed and changed <= downstream
    would_run = _stages_run(_run(root, env, "dvc", "repro", "--dry"))
    assert "kd_settings" in would_run and would_run <= downstream
    # the student's recipe (other than its epochs and batch size) does not touch them either
    _set(root / "params.yaml", student__lr=0.05, student__label_smoothing=0.2)
    assert "teacher_targets" not in _changed(root, env)
    _run(root, env, "git", "checkout", "params.yaml")
    assert _changed(root, env) == set()


def test_a_new_teacher_makes_the_teacher_targets_stale(project):
    root, env, _ = project
    for change in ({"student__epochs": 3}, {"student__batch_size": 128}, {"data__augment__crop_padding": 2},
                   {"seed": 7}, {"kd__teacher_targets": "online"}):
        _set(root / "params.yaml", **change)
        assert "teacher_targets" in _changed(root, env), change
        _run(root, env, "git", "checkout", "params.yaml")
    _set(root / "params.yaml", teacher__epochs=2)
    assert "train_teacher" in _changed(root, env)
    _run(root, env, "dvc", "repro", "train_teacher")
    assert "teacher_targets" in _changed(root, env)  # models/teacher.pt changed
