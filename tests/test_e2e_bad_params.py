"""A bad value given to `dvc exp run -S` stops at the check_params stage, before DVC templates a
path from it and before anything trains: kdpipe's one sentence, a non-zero exit, no experiment."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.dvc_project import make_dvc_project

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("flag, message", [
    ("data.name=mnist", "data.name='mnist' is not allowed; expected one of cats_vs_dogs, cifar10, csv, digits, "
                        "imagefolder, intel."),
    ("kd.temperature=1e-30", "kd.temperature=1e-30 is not allowed; expected a number in [0.5, 50.0]"),
])
def test_a_bad_param_stops_first_with_one_sentence_and_saves_no_experiment(tmp_path, flag, message):
    root, env = make_dvc_project(tmp_path / "project", {"mlflow.enabled": False})
    done = subprocess.run(["dvc", "exp", "run", "-S", flag], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert f"error: params.yaml: {message}" in done.stderr
    assert "Running stage 'check_params'" in done.stdout and "Running stage 'download'" not in done.stdout
    assert not any(p.is_file() for p in (root / "data").rglob("*") if p.name != "data_source.json")  # nothing ran after
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=root, env=env, capture_output=True, text=True,
                           timeout=120)
    experiments = [e for commit in json.loads(shown.stdout) for e in commit.get("experiments") or []]
    assert experiments == []
