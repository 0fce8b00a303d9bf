"""End to end through real dvc commands in a throw-away copy of the project:

* ``dvc repro`` with two methods (logit, attention) and tiny epochs produces both distilled
  models and both rows in metrics/evaluation.json and reports/report.md;
* a 2×2 T×α sweep runs through ``dvc exp run --queue`` + ``dvc queue start`` and
  ``kdpipe sweep-report`` draws it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.e2e

COPY = ["src", "stages", "teachers", "dvc.yaml", "params.yaml", ".gitignore"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tiny-epoch copy of the project, reproduced once with kd.methods [logit, attention]."""
    root = tmp_path_factory.mktemp("kd_e2e")
    for name in COPY:
        src = PROJECT_ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section in ("teacher", "student"):
        params[section].update(epochs=1, batch_size=128)
    params["kd"]["methods"] = ["logit", "attention"]
    params["evaluate"].update(latency_warmup=0, latency_runs=2, batch_size=512)
    params["mlflow"]["log_models"] = False
    params["runtime"]["threads"] = 1  # two shared cores: one thread each is fastest
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    shutil.copy2(PROJECT_ROOT / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(PROJECT_ROOT / ".dvc" / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "project"], root, env)
    _run(["dvc", "repro"], root, env)
    return root, env


def test_repro_with_two_methods_produces_both_models_and_rows(project):
    root, _ = project
    for method in ("logit", "attention"):
        assert (root / "models" / f"distilled_{method}.pt").is_file()
    evaluation = json.loads((root / "metrics" / "evaluation.json").read_text())
    assert list(evaluation) == ["teacher", "baseline", "distilled_logit", "distilled_attention"]
    report = (root / "reports" / "report.md").read_text()
    assert "| distilled_logit |" in report and "| distilled_attention |" in report
    header = (root / "plots" / "history" / "distilled_attention.csv").read_text().splitlines()[0]
    assert "train_at" in header and "train_ce" in header  # every loss term is logged per epoch
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    deps = [d["path"] for d in lock["stages"]["distill@attention"]["deps"]]
    assert "teachers/ensemble" in deps and "models/teacher.pt" in deps


def test_sweep_2x2_runs_through_the_queue_and_is_drawn(project):
    root, env = project
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "reproduced"], root, env)
    # only what the heatmap needs: logit distillation up to evaluate, no MLflow
    _run(["dvc", "exp", "run", "--queue", "evaluate", "-S", "kd.temperature=1,4", "-S", "kd.alpha=0.5,0.9",
          "-S", "kd.methods=[logit]", "-S", "mlflow.enabled=false"], root, env)
    _run(["dvc", "queue", "start"], root, env)
    deadline = time.monotonic() + 600
    while True:
        status = _run(["dvc", "queue", "status"], root, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 4, status
    out = root / "sweep"
    result = _run([sys.executable, "-m", "kdpipe.cli", "sweep-report", "--out", str(out)], root, env)
    assert (out / "sweep_heatmap.png").stat().st_size > 1000
    table = (out / "sweep_table.md").read_text()
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4
    assert sorted((float(r[3]), float(r[4])) for r in rows) == [(1.0, 0.5), (1.0, 0.9), (4.0, 0.5), (4.0, 0.9)]
    accuracies = [float(r[5]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert "sweep_heatmap.png" in result.stdout
