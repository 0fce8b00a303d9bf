"""The Makefile's targets with a stand-in .venv: the real Python runs kdpipe, a fake ``dvc``
records its arguments and exits with $FAKE_DVC_STATUS (answering ``queue status`` and ``exp show``
from the files queue-status and exp-show.json when present), and a fake ``mlflow`` records its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

FAKE_DVC = """#!/bin/sh
echo "$@" >> dvc-calls
if [ "$1 $2" = "queue status" ] && [ -f queue-status ]; then cat queue-status; fi
if [ "$1 $2" = "exp show" ] && [ -f exp-show.json ]; then cat exp-show.json; fi
exit "${FAKE_DVC_STATUS:-0}"
"""
FAKE_MLFLOW = """#!/bin/sh
echo "$@" >> mlflow-calls
"""


@pytest.fixture
def project(tmp_path):
    shutil.copy(PROJECT_ROOT / "Makefile", tmp_path)
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path)
    shutil.copytree(PROJECT_ROOT / "conf/presets", tmp_path / "conf/presets")
    (tmp_path / "pyproject.toml").write_text("")
    bin_dir = tmp_path / ".venv/bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "dvc").write_text(FAKE_DVC)
    (bin_dir / "mlflow").write_text(FAKE_MLFLOW)
    (bin_dir / "kdpipe").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kdpipe.cli "$@"\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    (tmp_path / ".venv/.kdpipe-installed").touch()  # set up already: newer than pyproject.toml
    earlier = os.stat(tmp_path / ".venv/.kdpipe-installed").st_mtime - 60
    os.utime(tmp_path / "pyproject.toml", (earlier, earlier))
    return tmp_path


def make(project, *args, dvc_status=0):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "FAKE_DVC_STATUS": str(dvc_status)}
    # MAKE*: under `make test` make would print "Entering directory"; the others change what the targets run
    for inherited in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MLFLOW_TRACKING_URI", "PORT"):
        env.pop(inherited, None)
    return subprocess.run(["make", "--no-print-directory", *args], cwd=project, env=env, capture_output=True, text=True, timeout=300)


def dvc_calls(project):
    calls = project / "dvc-calls"
    return calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("target", ["exp", "repro"])
def test_a_misspelt_data_set_stops_with_the_presets_error_and_runs_nothing(project, target):
    before = (project / "params.yaml").read_bytes()
    result = make(project, target, "DATA=cifar")
    assert result.returncode != 0
    assert "error: there is no preset 'cifar'; choose one of: cats_vs_dogs, cifar10, cifar10-cpu" in result.stderr
    assert dvc_calls(project) == []
    assert (project / "params.yaml").read_bytes() == before


def test_exp_passes_the_preset_as_flags_before_args(project):
    before = (project / "params.yaml").read_bytes()
    result = make(project, "exp", "DATA=cifar10", "ARGS=-S kd.alpha=0.5")
    assert result.returncode == 0, result.stderr
    (call,) = dvc_calls(project)
    assert call.startswith("exp run -S ") and "-S data.name=cifar10" in call and call.endswith("-S kd.alpha=0.5")
    assert (project / "params.yaml").read_bytes() == before


def test_a_failed_repro_restores_params_yaml_and_a_successful_one_keeps_the_preset(project):
    params = project / "params.yaml"
    before = params.read_bytes()
    failed = make(project, "repro", "DATA=cifar10", dvc_status=3)
    assert failed.returncode != 0 and dvc_calls(project) == ["repro"]
    assert params.read_bytes() == before
    assert "params.yaml was restored as it was before the cifar10 preset, because" in failed.stderr
    ok = make(project, "repro", "DATA=cifar10")
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(params.read_text())["data"]["name"] == "cifar10"
    assert "restored" not in ok.stderr


def test_help_lists_every_target_with_its_description(project):
    result = make(project, "help")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    targets = [line.split()[1] for line in lines]
    assert targets == ["setup", "help", "repro", "exp", "replicate", "sweep", "exp-show", "compare", "presets", "test",
                       "ui", "server", "clean-venv"]
    assert any(line.split()[1] == "repro" and "run the whole DVC pipeline" in line for line in lines)


def test_sweep_queues_the_grid_on_jobs_workers_then_draws_it(project):
    import json

    from tests.test_sweep import EXP_SHOW

    (project / "queue-status").write_text("Task  Name  Created  Status\n" + "".join(
        f"abc{i}  sweep-T{t}-a0.9  06:34 AM   Success\n" for i, t in enumerate((1, 4))))
    (project / "exp-show.json").write_text(json.dumps(EXP_SHOW))
    result = make(project, "sweep", "T=1,4", "ALPHA=0.9", "JOBS=2")
    assert result.returncode == 0, result.stderr
    calls = dvc_calls(project)
    assert calls[:4] == ["exp list --name-only",
                         "exp run --queue -n sweep-T1-a0.9 -S kd.temperature=1 -S kd.alpha=0.9 evaluate",
                         "exp run --queue -n sweep-T4-a0.9 -S kd.temperature=4 -S kd.alpha=0.9 evaluate",
                         "queue start -j 2"]
    assert calls[-1] == "exp show --json"
    assert "| 1 | e4 | 4 | 0.9 | 95.25 | +5.25 |" in (project / "reports/sweep/sweep_table.md").read_text()


def test_server_runs_mlflow_on_localhost_with_a_database_and_proxied_artifacts(project):
    result = make(project, "server")
    assert result.returncode == 0, result.stderr
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in result.stdout
    (call,) = (project / "mlflow-calls").read_text().splitlines()
    assert call == (f"server --backend-store-uri sqlite:///{project}/mlflow-server/mlflow.db --artifacts-destination "
                    f"{project}/mlflow-server/artifacts --host 127.0.0.1 --port 5000")
    assert (project / "mlflow-server").is_dir()
    make(project, "server", "BACKEND=postgresql://user:pass@db.example:5432/mlflow", "ARTIFACTS=s3://bucket/mlflow")
    call = (project / "mlflow-calls").read_text().splitlines()[-1]
    assert call.startswith("server --backend-store-uri postgresql://user:pass@db.example:5432/mlflow "
                           "--artifacts-destination s3://bucket/mlflow --host 127.0.0.1")


def test_ui_on_a_tracking_server_points_at_it_instead_of_serving_a_store(project):
    result = make(project, "ui", "MLFLOW_TRACKING_URI=http://127.0.0.1:5000")
    assert result.returncode == 0, result.stderr
    assert "MLFLOW_TRACKING_URI is a tracking server, which is its own UI: open http://127.0.0.1:5000" in result.stdout
    assert not (project / "mlflow-calls").exists()
    make(project, "ui")
    (call,) = (project / "mlflow-calls").read_text().splitlines()
    assert call == f"ui --backend-store-uri sqlite:///{project}/mlflow.db --host 127.0.0.1 --port 5000"
