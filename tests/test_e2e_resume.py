"""SIGKILL during `dvc repro train_teacher` (DVC and the stage, mid-epoch 4 of 6), then `dvc repro`:
the stage resumes after epoch 3 and ends with the very bytes of an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess

import pytest

from tests.dvc_project import make_dvc_project

pytestmark = pytest.mark.e2e

PARAMS = {"teacher.resnet18.width": 16, "teacher.epochs": 6, "mlflow.enabled": False, "runtime.threads": 1}
OUTPUTS = ("models/teacher.pt", "metrics/teacher.json", "plots/history/teacher.csv")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_killed_training_resumes_to_the_same_bytes(tmp_path):
    killed, env = make_dvc_project(tmp_path / "killed", PARAMS)
    proc = subprocess.Popen(["dvc", "repro", "train_teacher"], cwd=killed, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "teacher epoch 3/6:" in line:  # printed once epoch 3's checkpoint is on disk
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert not (killed / "models" / "teacher.pt").exists()

    resumed = subprocess.run(["dvc", "repro", "train_teacher"], cwd=killed, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    log = resumed.stdout + resumed.stderr
    assert "teacher: resuming from .kdpipe/checkpoints/teacher.pt after epoch 3 of 6" in log
    assert "teacher epoch 1/6" not in log and "teacher epoch 4/6" in log
    assert not (killed / ".kdpipe" / "checkpoints" / "teacher.pt").exists()  # removed once the model is written

    whole, env2 = make_dvc_project(tmp_path / "whole", PARAMS)
    subprocess.run(["dvc", "repro", "train_teacher"], cwd=whole, env=env2, capture_output=True, check=True, timeout=600)
    for rel in OUTPUTS:
        assert _sha(killed / rel) == _sha(whole / rel), rel
