"""End to end through real dvc commands in a throw-away copy of the project:

* ``dvc repro`` with three methods (logit, attention, dkd) and tiny epochs produces every
  distilled model and its rows in metrics/evaluation.json and reports/report.md;
* each ``distill@<method>`` re-runs only for what its method reads: ``kd.temperature`` re-trains
  logit and dkd but not attention, ``kd.dkd.beta`` only dkd, a new entry in ``kd.methods`` only
  the new method;
* a 2×2 T×α sweep runs through ``dvc exp run --queue`` + ``dvc queue start`` and
  ``kdpipe sweep-report`` draws it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture
def project(kd_methods_project) -> tuple[Path, dict[str, str]]:
    """The reproduced, committed tiny project with kd.methods [logit, attention, dkd] (conftest.py)."""
    return kd_methods_project


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.parametrize("flags, retrained", [
    (["-S", "kd.temperature=3"], {"distill@logit", "distill@dkd"}),  # attention does not read T
    (["-S", "kd.dkd.beta=2"], {"distill@dkd"}),  # another method's section
    (["-S", "kd.methods=[logit,attention,dkd,fitnets]"], {"distill@fitnets"}),  # a new method: only it trains
])
def test_an_experiment_retrains_only_the_methods_that_read_the_change(project, flags, retrained):
    root, env = project
    name = "only-" + "-".join(sorted(r.split("@")[1] for r in retrained))
    out = _run(["dvc", "exp", "run", "-n", name, *flags], root, env).stdout
    _run(["dvc", "exp", "remove", name], root, env)  # the sweep test below reads every experiment
    assert {s for s in stages_run(out) if s.startswith("distill@")} == retrained, out
    assert "kd_settings" in stages_run(out)
    _run(["git", "checkout", "--", "."], root, env)  # back to the committed run
    _run(["dvc", "checkout", "-q"], root, env)


def test_repro_with_three_methods_produces_every_model_and_row(project):
    root, _ = project
    for method in ("logit", "attention", "dkd"):
        assert (root / "models" / f"distilled_{method}.pt").is_file()
    evaluation = json.loads((root / "metrics" / "evaluation.json").read_text())
    assert list(evaluation) == ["teacher", "baseline", "distilled_logit", "distilled_attention", "distilled_dkd"]
    report = (root / "reports" / "report.md").read_text()
    assert "| distilled_logit |" in report and "| distilled_attention |" in report
    header = (root / "plots" / "history" / "distilled_attention.csv").read_text().splitlines()[0]
    assert "train_at" in header and "train_ce" in header  # every loss term is logged per epoch
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    deps = [d["path"] for d in lock["stages"]["distill@attention"]["deps"]]
    assert "teachers/ensemble" in deps and "models/teacher.pt" in deps
    assert "data/kd_settings/attention.json" in deps and "src/kdpipe/distill/attention.py" in deps
    assert not any(d.endswith(("logit.py", "dkd.py", "logit.json", "dkd.json")) for d in deps)
    params = lock["stages"]["distill@attention"]["params"]["params.yaml"]
    assert not [key for key in params if key.split(".")[0] == "kd"]  # kd reaches it only through its own file


def test_sweep_2x2_runs_through_the_queue_and_is_drawn(project):
    root, env = project
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
