"""kdpipe compare on a synthetic ``dvc exp show --json`` (the real one: tests/test_pipeline_e2e.py)."""

from __future__ import annotations

import json

import pytest

from kdpipe.cli import main
from kdpipe.compare import changed_params, compare
from kdpipe.errors import KdpipeError
from kdpipe.sweep import exp_commits


def _data(temperature, accs, failed=False, latency=1.0):
    return {"rev": "r", "timestamp": "2026-01-01T00:00:00",
            "params": {"params.yaml": {"data": {"seed": 42, "kd": {"temperature": temperature, "alpha": 0.9},
                                                "evaluate": {"latency_runs": latency}}}},
            "metrics": {"metrics/evaluation.json": {"data": {m: {"test_accuracy": a} for m, a in accs.items()}}}}


HEAD = {"teacher": 97.4, "baseline": 98.88, "distilled_logit": 98.14, "distilled_dkd": 98.14}
EXP_SHOW = [
    {"rev": "workspace", "name": None, "error": None, "experiments": None, "data": _data(4.0, HEAD)},
    {"rev": "abc1234", "name": "main", "error": None, "data": _data(4.0, HEAD), "experiments": [
        {"name": "kd-t3", "executor": None, "revs": [{"rev": "e1", "name": "kd-t3", "error": None,
         "data": _data(3.0, {**HEAD, "distilled_logit": 98.51, "distilled_dkd": 97.77}, latency=5)}]},
    ]},
]


def test_changed_params_leave_out_timing_and_tracking_settings():
    commit, experiments = next(exp_commits(EXP_SHOW))
    # evaluate.latency_runs differs too, but says nothing about the models
    assert changed_params([commit, *experiments]) == ["kd.temperature"]


def test_compare_table_fits_a_terminal_and_shows_the_changes():
    table = compare(EXP_SHOW)
    lines = table.splitlines()
    assert lines[0] == "| run | kd.temperature | teacher | baseline | logit | dkd |"
    assert lines[2] == "| main (HEAD) | 4.0 | 97.40 | 98.88 | 98.14 | 98.14 |"
    assert lines[3] == "| kd-t3 | 3.0 | 97.40 | 98.88 | 98.51 (+0.37) | 97.77 (-0.37) |"
    assert max(len(line) for line in lines[:4]) <= 120


def test_compare_cli_and_its_errors(tmp_path, capsys):
    src = tmp_path / "exp_show.json"
    src.write_text(json.dumps(EXP_SHOW))
    assert main(["compare", "--input", str(src)]) == 0
    assert "| kd-t3 | 3.0 |" in capsys.readouterr().out
    with pytest.raises(KdpipeError, match="no run here has test accuracies"):
        compare([{**EXP_SHOW[1], "data": {**EXP_SHOW[1]["data"], "metrics": {}}, "experiments": []}])
    with pytest.raises(KdpipeError, match="lists no commit"):
        compare([EXP_SHOW[0]])
