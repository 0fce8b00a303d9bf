"""End to end through real dvc commands in a throw-away copy of the project:

* ``dvc repro`` with two methods (logit, attention) and tiny epochs produces both distilled
  models and both rows in metrics/evaluation.json and reports/report.md;
* a 2×2 T×α sweep runs through ``dvc exp run --queue`` + ``dvc queue start`` and
  ``kdpipe sweep-report`` draws it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.dvc_project import make_dvc_project

pytestmark = pytest.mark.e2e

TINY_PARAMS = {
    "teacher.epochs": 1, "teacher.batch_size": 128, "student.epochs": 1, "student.batch_size": 128,
    "kd.methods": ["logit", "attention"],
    "evaluate.latency_warmup": 0, "evaluate.latency_runs": 2, "evaluate.batch_size": 512,
    "mlflow.log_models": False,
    "runtime.threads": 1,  # two shared cores: one thread each is fastest
}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tiny-epoch copy of the project, reproduced once with kd.methods [logit, attention]."""
    root, env = make_dvc_project(tmp_path_factory.mktemp("kd_e2e"), TINY_PARAMS,
                                 env={"PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"})
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
