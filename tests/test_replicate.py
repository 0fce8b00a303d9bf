"""Seed replicates: ``student.seed`` seeds the student runs only; ``kdpipe replicate`` queues the
experiments; ``kdpipe replicate-report`` aggregates them.

The aggregation reads tests/fixtures/exp_show_replicates.json, a trimmed ``dvc exp show --json``
of a real run: a tiny digits project (teacher.epochs 2, student.epochs 3, kd.methods [logit])
committed after ``dvc repro`` (student.seed null, i.e. 42), then ``kdpipe replicate --seeds 2``
(experiments seed-1 and seed-2) and one experiment ``probe`` queued with ``-S student.seed=7
kd_settings``, which never re-ran the students. Its 2-epoch teacher had not learnt (10.04%),
so the distilled student is at chance too: the numbers exercise the arithmetic, not KD.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from kdpipe import models, paths
from kdpipe.cli import main
from kdpipe.config import parse_params
from kdpipe.data.prepare import write_prepared
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.expqueue import queue_states
from kdpipe.replicate import (Replicate, collect_replicates, markdown_table, paired_diff, replicate_report,
                              resolved_student_seed, run_replicates, summarize, t_quantile)
from kdpipe.sweep import exp_commits
from kdpipe.teacher_targets import build_teacher_targets
from kdpipe.workflow import distill, train_baseline, train_teacher
from tests.conftest import make_prepared

FIXTURE = Path(__file__).parent / "fixtures" / "exp_show_replicates.json"
EXP_SHOW = json.loads(FIXTURE.read_text())
# test accuracies in the fixture (metrics/evaluation.json of each run)
BASELINE = {42: 95.1673, 1: 97.026, 2: 94.7955}
CHANCE = 10.0372  # the teacher and distilled_logit in every run


def _experiment(exp_show, name):
    for commit in exp_show:
        for exp in commit.get("experiments") or []:
            if exp["name"] == name:
                return exp["revs"][0]["data"]
    raise KeyError(name)


# ---- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize(("df", "expected"), [
    (1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452),  # printed t tables
])
def test_t_quantile_is_the_tabulated_two_sided_95_percent_value(df, expected):
    assert t_quantile(df) == pytest.approx(expected, abs=1e-4)


def test_paired_difference_by_hand():
    # diffs 1, 2, 3: mean 2, sd 1, half width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    d = paired_diff([11.0, 12.0, 13.0], [10.0, 10.0, 10.0], "distilled_logit")
    assert (d.n, d.mean) == (3, pytest.approx(2.0))
    assert (d.low, d.high) == (pytest.approx(-0.484138, abs=1e-6), pytest.approx(4.484138, abs=1e-6))
    assert (d.wins, d.ties, d.losses) == (3, 0, 0)
    # one image of 269 either way and a tie: mean 0, sd 0.3717, t(0.975, 3) = 3.182446
    step = 100 / 269
    d = paired_diff([90 + step, 90.0, 90 - step, 90 + step], [90.0, 90.0, 90.0, 90.0])
    assert (d.wins, d.ties, d.losses) == (2, 1, 1)
    assert d.mean == pytest.approx(step / 4)
    sd = math.sqrt(sum((x - step / 4) ** 2 for x in (step, 0, -step, step)) / 3)
    assert d.high - d.mean == pytest.approx(3.182446 * sd / 2, abs=1e-5)
    single = paired_diff([91.0], [90.0])
    assert single.mean == 1.0 and math.isnan(single.low) and math.isnan(single.high)


def test_summaries_and_paired_differences_over_seeds():
    reps = [Replicate("a", 1, {"teacher": 99.0, "baseline": 90.0, "distilled_logit": 91.0}),
            Replicate("b", 2, {"teacher": 99.0, "baseline": 92.0, "distilled_logit": 92.0}),
            Replicate("c", 3, {"teacher": 99.0, "baseline": 94.0, "distilled_logit": 96.0})]
    summaries, diffs = summarize(reps)
    assert [(s.model, s.n, s.mean, s.std) for s in summaries] == [
        ("teacher", 3, 99.0, 0.0), ("baseline", 3, 92.0, 2.0), ("distilled_logit", 3, pytest.approx(93.0),
                                                               pytest.approx(math.sqrt(7)))]
    (d,) = diffs  # diffs 1, 0, 2: mean 1, sd 1
    assert (d.model, d.mean, d.wins, d.ties, d.losses) == ("distilled_logit", 1.0, 2, 1, 0)
    assert d.high - d.mean == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)


# ---- which runs are replicates (the real exp show) -------------------------------------------


def test_the_fixture_has_the_shape_of_dvc_exp_show():
    (commit, experiments), = list(exp_commits(EXP_SHOW))  # the workspace entry is skipped
    assert sorted(e.name for e in experiments) == ["probe", "seed-1", "seed-2"]
    assert all(e.baseline == commit.rev for e in experiments)
    assert commit.deps["models/teacher.pt"] == commit.outs["models/teacher.pt"]
    seeds = {e.name: e.params["student"]["seed"] for e in experiments}
    assert seeds == {"seed-1": 1, "seed-2": 2, "probe": 7} and commit.params["student"]["seed"] is None


def test_replicates_are_the_commit_and_its_seed_only_experiments():
    commit, reps, skipped = collect_replicates(EXP_SHOW)
    assert [(r.seed, r.name) for r in reps] == [(42, f"commit {commit.rev[:7]}"), (1, "seed-1"), (2, "seed-2")]
    assert {r.seed: r.accuracies["baseline"] for r in reps} == BASELINE
    assert all(r.accuracies["teacher"] == r.accuracies["distilled_logit"] == CHANCE for r in reps)
    assert list(skipped) == ["probe"] and "not re-run for its student seed" in skipped["probe"]
    assert resolved_student_seed(commit.params) == 42


@pytest.mark.parametrize(("change", "reason"), [
    (lambda d: d["params"]["params.yaml"]["data"]["kd"].update(temperature=2.0), "other params differ"),
    (lambda d: d["params"]["params.yaml"]["data"]["student"].update(epochs=4), "other params differ"),
    (lambda d: d["deps"]["models/teacher.pt"].update(hash="0" * 32), "other inputs differ: models/teacher.pt"),
    (lambda d: d["deps"]["src/kdpipe/train.py"].update(hash="0" * 32), "other inputs differ: src/kdpipe/train.py"),
])
def test_an_experiment_that_differs_in_more_than_the_seed_is_left_out(change, reason):
    exp_show = copy.deepcopy(EXP_SHOW)
    change(_experiment(exp_show, "seed-2"))
    _, reps, skipped = collect_replicates(exp_show)
    assert [r.name for r in reps][1:] == ["seed-1"]
    assert skipped["seed-2"].startswith(reason)


def test_one_replicate_per_seed_the_newest():
    exp_show = copy.deepcopy(EXP_SHOW)
    commit = exp_show[1]
    again = copy.deepcopy(next(e for e in commit["experiments"] if e["name"] == "seed-1"))
    again["name"] = again["revs"][0]["name"] = "seed-1-again"
    data = again["revs"][0]["data"]
    data["timestamp"] = "2099-01-01T00:00:00"
    data["metrics"]["metrics/evaluation.json"]["data"]["baseline"]["test_accuracy"] = 50.0
    commit["experiments"].append(again)
    # and one that names the commit's own seed explicitly: the same run, counted once
    same = copy.deepcopy(next(e for e in commit["experiments"] if e["name"] == "seed-2"))
    same["name"] = "seed-42"
    same["revs"][0]["data"]["params"]["params.yaml"]["data"]["student"]["seed"] = 42
    commit["experiments"].append(same)
    _, reps, skipped = collect_replicates(exp_show)
    assert [(r.seed, r.name) for r in reps][1:] == [(1, "seed-1-again"), (2, "seed-2")]
    assert reps[1].accuracies["baseline"] == 50.0
    assert skipped["seed-1"] == "an older run of student seed 1"
    assert skipped["seed-42"] == "same student seed as the commit (42)"


def test_the_table_of_the_real_run():
    _, reps, _ = collect_replicates(EXP_SHOW)
    table = markdown_table(reps)
    # baseline: mean 95.6629, sd 1.1950; diffs -85.1301, -86.9888, -84.7583: mean -85.6257, sd 1.1950,
    # half width 4.302653 * 1.1950 / sqrt(3) = 2.9685
    assert "| baseline | 95.66 ± 1.19 | 3 | – | – | – |" in table
    assert "| teacher | 10.04 ± 0.00 | 3 |" in table
    assert "| distilled_logit | 10.04 ± 0.00 | 3 | -85.63 | [-88.59, -82.66] | 0 / 0 / 3 |" in table


def test_cli_writes_the_table_and_the_figure(tmp_path, capsys):
    out = tmp_path / "replicates"
    assert main(["replicate-report", "--input", str(FIXTURE), "--out", str(out)]) == 0
    assert (out / "replicates.png").stat().st_size > 1000
    text = (out / "replicates.md").read_text()
    assert "student seeds 42, 1, 2" in text and "| 1 | seed-1 | 10.04 | 97.03 | 10.04 |" in text
    assert "- probe: not re-run" in text
    assert "3 replicates (student seeds 42, 1, 2)" in capsys.readouterr().out


def test_nothing_to_aggregate_is_one_sentence(tmp_path):
    exp_show = copy.deepcopy(EXP_SHOW)
    exp_show[1]["data"]["metrics"] = {}
    exp_show[1]["experiments"] = []
    with pytest.raises(KdpipeError, match=r"has no finished run \(its metrics/evaluation.json is not committed\) "
                                          "and no experiments; run kdpipe replicate --seeds N first"):
        replicate_report(tmp_path, exp_show)
    with pytest.raises(KdpipeError, match="lists no commit"):
        replicate_report(tmp_path, exp_show[:1])


def test_experiments_that_are_no_replicates_are_named_with_the_reason(tmp_path):
    """Not "run kdpipe replicate first" when experiments exist: why none of them counts."""
    exp_show = copy.deepcopy(EXP_SHOW)
    exp_show[1]["data"]["metrics"] = {}
    for name in ("seed-1", "seed-2"):
        _experiment(exp_show, name)["params"]["params.yaml"]["data"]["kd"]["temperature"] = 2.0
    with pytest.raises(KdpipeError) as exc:
        replicate_report(tmp_path, exp_show)
    message = str(exc.value)
    assert "(its metrics/evaluation.json is not committed), and none of its 3 experiment(s) is a" in message
    assert "(probe: not re-run for its student seed" in message and "seed-1: other params differ" in message
    assert "run kdpipe replicate --seeds N first" not in message and not (tmp_path / "replicates.md").exists()


# ---- queueing them (dvc replaced by a recording fake) -----------------------------------------

STATUS = """Task     Name    Created    Status
4c67a01  seed-1  06:34 AM   {s1}
ef6c1fb  seed-2  06:34 AM   {s2}

Worker status: 1 active, 0 idle
"""


class FakeDvc:
    def __init__(self, statuses, existing=""):
        self.calls, self.statuses, self.existing = [], list(statuses), existing

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd[1:])
        out = {"list": self.existing, "status": ""}.get(cmd[2], "")
        if cmd[1:3] == ["queue", "status"]:
            out = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return subprocess.CompletedProcess(cmd, 0, out, "")


def test_queue_states_reads_dvc_queue_status():
    assert queue_states(STATUS.format(s1="Running", s2="Queued"), ["seed-1", "seed-2", "seed-3"]) == {
        "seed-1": "Running", "seed-2": "Queued"}


def test_replicate_queues_one_experiment_per_seed_and_waits():
    dvc = FakeDvc([STATUS.format(s1="Running", s2="Queued"), STATUS.format(s1="Success", s2="Running"),
                   STATUS.format(s1="Success", s2="Success")])
    lines = []
    states = run_replicates([1, 2], jobs=1, poll_seconds=0, runner=dvc, log=lines.append)
    assert states == {"seed-1": "Success", "seed-2": "Success"}
    assert dvc.calls[:4] == [["exp", "list", "--name-only"],
                             ["exp", "run", "--queue", "-n", "seed-1", "-S", "student.seed=1"],
                             ["exp", "run", "--queue", "-n", "seed-2", "-S", "student.seed=2"],
                             ["queue", "start", "-j", "1"]]
    assert dvc.calls[4:] == [["queue", "status"]] * 3
    assert "seed-2: Running" in lines


def test_replicate_reports_failures_and_refuses_taken_names():
    dvc = FakeDvc([STATUS.format(s1="Success", s2="Failed")])
    with pytest.raises(KdpipeError, match=r"1 of 2 replicates failed \(seed-2\); see dvc queue logs seed-2"):
        run_replicates([1, 2], poll_seconds=0, runner=dvc, log=lambda _: None)
    dvc = FakeDvc([], existing="seed-2\nother\n")
    with pytest.raises(KdpipeError, match=r"seed-2 already exist.*dvc exp remove seed-2"):
        run_replicates([1, 2], runner=dvc)
    assert not [c for c in dvc.calls if c[:2] == ["exp", "run"]]  # nothing queued


# ---- student.seed at the workflow level (tiny synthetic data, no dvc) -------------------------


def test_student_seed_is_validated_and_resolved():
    assert parse_params({}).student.seed is None and parse_params({}).student_seed == 42
    assert parse_params({"seed": 3, "student": {"seed": 0}}).student_seed == 0
    with pytest.raises(ConfigError, match=r"student.seed=-1 is not allowed; expected null \(the global seed\)"):
        parse_params({"student": {"seed": -1}})
    assert parse_params({"seed": 3, "teacher": {"seed": 9}}).seed_for("teacher") == 9
    assert parse_params({"seed": 3, "teacher": {"seed": 9}}).student_seed == 3  # each role its own
    with pytest.raises(ConfigError, match=r"teacher.seed=-2 is not allowed; expected null \(the global seed\)"):
        parse_params({"teacher": {"seed": -2}})


def _params(teacher_seed=None, **student):
    return parse_params({
        "seed": 0, "mlflow": {"enabled": False}, "kd": {"methods": ["logit"]},
        "runtime": {"device": "cpu", "threads": 1, "bf16": "off", "channels_last": "off"},
        "teacher": {"epochs": 1, "batch_size": 16, "resnet18": {"width": 8}, "seed": teacher_seed},
        "student": {"epochs": 1, "batch_size": 16, "student_cnn": {"widths": [4, 8]}, **student},
    })


def _weights(name):
    model, _ = models.load(paths.model_path(name))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_student_seed_changes_the_students_and_teacher_seed_the_teacher_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_prepared(n_train=48, n_val=16, n_test=8)
    write_prepared(paths.PREPARED_DIR, data)

    default, other, explicit = _params(), _params(seed=5), _params(seed=0)
    assert (default.student_seed, other.student_seed, explicit.student_seed) == (0, 5, 0)
    train_teacher(other)
    teacher = _weights(paths.TEACHER)
    train_teacher(default)  # the teacher does not read student.seed
    assert _same(_weights(paths.TEACHER), teacher)

    train_baseline(default)
    base = _weights(paths.BASELINE)
    train_baseline(explicit)  # student.seed equal to seed: the same run
    assert _same(_weights(paths.BASELINE), base)
    train_baseline(other)
    assert not _same(_weights(paths.BASELINE), base)

    # teacher.seed: another teacher on the same split (for multi_teacher); the students do not read it
    train_teacher(_params(teacher_seed=3))
    assert not _same(_weights(paths.TEACHER), teacher)
    train_baseline(_params(teacher_seed=3))
    assert _same(_weights(paths.BASELINE), base)
    train_teacher(default)
    assert _same(_weights(paths.TEACHER), teacher)

    # teacher_targets follows the student seed, and distillation reads the cache of its own seed
    assert build_teacher_targets(other)["seed"] == 5
    distill(other, "logit")
    with pytest.raises(KdpipeError, match="seed: cache 5 vs run 0"):
        distill(default, "logit")
