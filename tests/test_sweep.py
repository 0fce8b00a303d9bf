"""kdpipe sweep (the grid through the queue, dvc replaced by a recording fake) and kdpipe
sweep-report on a synthetic ``dvc exp show --json`` (the real queue is exercised in
tests/test_e2e_kd_methods.py and, with parallel workers and an MLflow server, tests/test_e2e_team.py)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from kdpipe.cli import main
from kdpipe.errors import KdpipeError
from kdpipe.sweep import (collect_rows, experiment_records, grid, grid_experiments, run_sweep, sweep_report,
                          why_no_rows)
from tests.test_replicate import FakeDvc


def _rev(name, t, a, acc, ts, baseline=90.0, error=None):
    return {"rev": name * 5, "name": name, "error": error, "experiments": None, "data": {
        "rev": name * 5, "timestamp": ts,
        "params": {"params.yaml": {"data": {"kd": {"temperature": t, "alpha": a, "methods": ["logit"]}}}},
        "metrics": {"metrics/evaluation.json": {"data": {
            "baseline": {"test_accuracy": baseline}, "distilled_logit": {"test_accuracy": acc}}}},
    }}


EXP_SHOW = [
    {"rev": "workspace", "name": None, "error": None, "experiments": None,
     "data": _rev("w", 4.0, 0.9, 99.0, "2026-01-01T00:00:00")["data"]},
    {"rev": "abc", "name": "main", "error": None, "data": _rev("m", 4.0, 0.9, 99.0, "2026-01-01T00:00:00")["data"],
     "experiments": [
         {"name": "e1", "executor": None, "revs": [_rev("e1", 1, 0.5, 91.5, "2026-01-01T01:00:00")]},
         {"name": "e2", "executor": None, "revs": [_rev("e2", 1, 0.9, 93.0, "2026-01-01T02:00:00")]},
         {"name": "e3", "executor": None, "revs": [_rev("e3", 4, 0.5, 92.0, "2026-01-01T03:00:00")]},
         {"name": "e4", "executor": None, "revs": [_rev("e4", 4, 0.9, 95.25, "2026-01-01T04:00:00")]},
         {"name": "e4b", "executor": None, "revs": [_rev("e4b", 4, 0.9, 94.0, "2026-01-01T05:00:00")]},
         {"name": "bad", "executor": None, "revs": [_rev("bad", 2, 0.5, 0.0, "2026-01-01T06:00:00", error={"x": 1})]},
     ]},
]


def test_rows_come_from_experiments_only_and_skip_failed_ones():
    rows = collect_rows(EXP_SHOW, "logit")
    assert [r.name for r in rows] == ["e1", "e2", "e3", "e4", "e4b"]
    assert rows[0].temperature == 1.0 and rows[0].alpha == 0.5 and rows[0].gain == pytest.approx(1.5)
    assert collect_rows(EXP_SHOW, "dkd") == []


def test_grid_keeps_the_newest_experiment_per_cell():
    temps, alphas, values = grid(collect_rows(EXP_SHOW, "logit"))
    assert temps == [1.0, 4.0] and alphas == [0.5, 0.9]
    assert values == [[91.5, 93.0], [92.0, 94.0]]
    _, _, sparse = grid(collect_rows(EXP_SHOW, "logit")[:1] + collect_rows(EXP_SHOW, "logit")[3:4])
    assert math.isnan(sparse[0][1]) and math.isnan(sparse[1][0])


def test_cli_writes_heatmap_and_sorted_table(tmp_path, capsys):
    src = tmp_path / "exp_show.json"
    src.write_text(json.dumps(EXP_SHOW))
    assert main(["sweep-report", "--input", str(src), "--out", str(tmp_path / "sweep")]) == 0
    assert (tmp_path / "sweep" / "sweep_heatmap.png").stat().st_size > 1000
    table = (tmp_path / "sweep" / "sweep_table.md").read_text()
    accs = [float(line.split("|")[5]) for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert accs == [95.25, 94.0, 93.0, 92.0, 91.5]
    assert "| 1 | e4 | 4 | 0.9 | 95.25 | +5.25 |" in table
    assert "95.25" in capsys.readouterr().out


def test_no_experiments_at_all_is_one_sentence(tmp_path, capsys):
    with pytest.raises(KdpipeError, match="^dvc exp show lists no experiments; run the sweep first"):
        sweep_report(tmp_path, "logit", exp_show=EXP_SHOW[:1])
    assert "lists no experiments of the HEAD commit (--all-commits" in why_no_rows([], "logit", head_only=True)
    src = tmp_path / "empty.json"
    src.write_text("[]")
    assert main(["sweep-report", "--input", str(src), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: dvc exp show lists no experiments;")
    src.write_text('{"not": "exp show"}')
    assert main(["sweep-report", "--input", str(src), "--out", str(tmp_path)]) == 2
    assert "is JSON but not 'dvc exp show --json' output" in capsys.readouterr().err


def _cli_error(tmp_path, capsys, exp_show, *args):
    src = tmp_path / "exp_show.json"
    src.write_text(json.dumps(exp_show))
    assert main(["sweep-report", "--input", str(src), "--out", str(tmp_path / "sweep"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1  # one sentence
    assert not (tmp_path / "sweep").exists()
    return err


def test_a_misspelt_method_names_the_methods_there_are(tmp_path, capsys):
    err = _cli_error(tmp_path, capsys, EXP_SHOW, "--method", "logti")
    assert "--method 'logti' is neither a method of the sweep's experiments (logit) nor a known KD method (" in err
    assert "dkd" in err and "run the sweep first" not in err


def test_a_known_method_the_sweep_did_not_distill(tmp_path, capsys):
    err = _cli_error(tmp_path, capsys, EXP_SHOW, "--method", "dkd")
    assert "none of the 5 finished experiment(s) distilled with dkd (they have: logit); pass one of those" in err


def test_failed_experiments_and_seed_replicates_are_not_a_sweep_to_run(tmp_path, capsys):
    failed = copy.deepcopy(EXP_SHOW)
    for exp in failed[1]["experiments"]:
        exp["revs"][0]["error"] = {"msg": "stage failed"}
    err = _cli_error(tmp_path, capsys, failed)
    assert "none of the 6 experiment(s) finished (6 failed, 0 without metrics/evaluation.json)" in err
    replicates = json.loads((Path(__file__).parent / "fixtures" / "exp_show_replicates.json").read_text())
    err = _cli_error(tmp_path, capsys, replicates)
    assert "the 3 experiment(s) shown are seed replicates" in err and "run the sweep first" in err


def test_rows_from_a_real_dvc_exp_show():
    """The parsing shared with kdpipe replicate-report reads the real format (a trimmed
    ``dvc exp show --json``, see tests/test_replicate.py)."""
    real = json.loads((Path(__file__).parent / "fixtures" / "exp_show_replicates.json").read_text())
    records = list(experiment_records(real))
    assert sorted(r.name for r in records) == ["probe", "seed-1", "seed-2"]
    assert sorted(r.evaluation["baseline"]["test_accuracy"] for r in records) == [94.7955, 95.1673, 97.026]
    # they are seed replicates (student.seed differs from the commit's), not points of a T×α sweep
    assert collect_rows(real, "logit") == []


# ---- kdpipe sweep: the grid through DVC's queue ---------------------------------------------

GRID_STATUS = """Task     Name             Created    Status
4c67a01  sweep-T1-a0.5    06:34 AM   {a}
ef6c1fb  sweep-T1-a0.9    06:34 AM   {b}
ab12cd3  sweep-T4-a0.5    06:34 AM   {c}
9f8e7d6  sweep-T4-a0.9    06:34 AM   {d}

Worker status: 2 active, 0 idle
"""


def test_sweep_queues_one_named_experiment_per_point_and_runs_them_with_n_workers():
    dvc = FakeDvc([GRID_STATUS.format(a="Running", b="Running", c="Queued", d="Queued"),
                   GRID_STATUS.format(a="Success", b="Success", c="Success", d="Success")])
    lines = []
    states = run_sweep([1, 4], [0.5, 0.9], jobs=2, sets=["kd.methods=[logit]"], targets=["evaluate"],
                       poll_seconds=0, runner=dvc, log=lines.append)
    assert list(states) == ["sweep-T1-a0.5", "sweep-T1-a0.9", "sweep-T4-a0.5", "sweep-T4-a0.9"]
    assert dvc.calls[0] == ["exp", "list", "--name-only"]
    assert dvc.calls[1] == ["exp", "run", "--queue", "-n", "sweep-T1-a0.5", "-S", "kd.temperature=1", "-S",
                            "kd.alpha=0.5", "-S", "kd.methods=[logit]", "evaluate"]
    assert [c[4] for c in dvc.calls[1:5]] == list(states)
    assert dvc.calls[5:] == [["queue", "start", "-j", "2"], ["queue", "status"], ["queue", "status"]]
    assert "sweep-T4-a0.9: Queued" in lines and "sweep-T4-a0.9: Success" in lines


def test_sweep_refuses_bad_values_and_taken_names_before_queueing_anything():
    with pytest.raises(KdpipeError, match="kd.alpha"):
        grid_experiments([2], [0.5, 1.5])
    with pytest.raises(KdpipeError, match="kd.temperature"):
        grid_experiments([0], [0.5])
    assert [name for name, _ in grid_experiments([2, 2.5, 2], [0.9])] == ["sweep-T2-a0.9", "sweep-T2.5-a0.9"]
    dvc = FakeDvc([], existing="sweep-T2-a0.9\n")
    with pytest.raises(KdpipeError, match=r"sweep-T2-a0.9 already exist for this commit; remove them "
                                          r"\(dvc exp remove sweep-T2-a0.9\)"):
        run_sweep([2], [0.5, 0.9], runner=dvc)
    assert not [c for c in dvc.calls if c[:2] == ["exp", "run"]]
    failed = FakeDvc([GRID_STATUS.format(a="Success", b="Failed", c="Success", d="Success")])
    with pytest.raises(KdpipeError, match=r"1 of 4 sweep experiments failed \(sweep-T1-a0.9\); "
                                          r"see dvc queue logs sweep-T1-a0.9"):
        run_sweep([1, 4], [0.5, 0.9], poll_seconds=0, runner=failed, log=lambda _: None)


def test_sweep_cli_says_what_is_wrong_with_its_numbers(capsys):
    assert main(["sweep", "--temperatures", "1,two", "--alphas", "0.5"]) == 2
    assert "--temperatures '1,two': expected numbers separated by commas" in capsys.readouterr().err
    assert main(["sweep", "--temperatures", "1", "--alphas", "0.5", "--jobs", "0"]) == 2
    assert "--jobs 0: expected --jobs >= 1." in capsys.readouterr().err
