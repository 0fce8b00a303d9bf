"""The Makefile's targets with a stand-in .venv: the real Python runs kdpipe, and a fake
``dvc`` records its arguments and exits with $FAKE_DVC_STATUS."""

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
exit "${FAKE_DVC_STATUS:-0}"
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
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    (tmp_path / ".venv/.kdpipe-installed").touch()  # set up already: newer than pyproject.toml
    earlier = os.stat(tmp_path / ".venv/.kdpipe-installed").st_mtime - 60
    os.utime(tmp_path / "pyproject.toml", (earlier, earlier))
    return tmp_path


def make(project, *args, dvc_status=0):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "FAKE_DVC_STATUS": str(dvc_status)}
    for inherited in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # under `make test` make would print "Entering directory"
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
    assert targets == ["setup", "help", "repro", "exp", "replicate", "exp-show", "compare", "presets", "test", "ui",
                       "clean-venv"]
    assert any(line.split()[1] == "repro" and "run the whole DVC pipeline" in line for line in lines)
