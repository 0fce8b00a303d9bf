"""The report's cells, headline, figure choices and rendering, on hand-made metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kdpipe.io import write_csv
from kdpipe.report import (
    FIGURES,
    seed_phrase,
    TABLE_COLUMNS,
    choose_disagreements,
    comparison_table,
    dodge_offsets,
    headline,
    load_timing,
    log_ticks,
    objective_terms,
    per_class_table,
    vs_teacher,
    write_report,
)
from tests.conftest import make_prepared

PNG = b"\x89PNG\r\n\x1a\n"


def _student(acc: float, vs_teacher_pt: float, diff: float, ci: list[float], p: float) -> dict[str, Any]:
    return {"test_accuracy": acc, "test_accuracy_ci95": [acc - 3, min(100.0, acc + 1)], "params": 94186,
            "size_mb": 0.361023, "compression_ratio": 118.1577, "accuracy_vs_teacher": vs_teacher_pt,
            "accuracy_diff_vs_baseline": diff, "accuracy_diff_ci95": ci, "mcnemar_p": p, "gap_closed": None}


def _evaluation() -> dict[str, dict[str, Any]]:
    """The committed digits run's numbers, in the new evaluation.json shape (no timing keys)."""
    return {
        "teacher": {"test_accuracy": 98.1413, "test_accuracy_ci95": [95.7234, 99.2035], "params": 11172810,
                    "size_mb": 42.657661},
        "baseline": {"test_accuracy": 98.8848, "test_accuracy_ci95": [96.7729, 99.62], "params": 94186,
                     "size_mb": 0.361023, "compression_ratio": 118.1577, "accuracy_vs_teacher": 0.7435},
        "distilled_logit": _student(98.1413, 0.0, -0.7435, [-2.6022, 1.1152], 0.6875),
        "distilled_dkd": _student(98.8848, 0.7435, 0.0, [-1.8587, 1.8587], 1.0),
    }


def _timing() -> dict[str, Any]:
    models = {
        "teacher": {"latency_ms_p50": 3.328, "latency_ms_p10": 3.2, "latency_ms_p90": 3.6, "throughput_ips": 6255.2,
                    "efficiency": 0.6913},
        "baseline": {"latency_ms_p50": 0.127, "latency_ms_p10": 0.12, "latency_ms_p90": 0.14,
                     "throughput_ips": 86931.6, "speedup": 26.1316, "efficiency": 2150.69},
        "distilled_logit": {"latency_ms_p50": 0.128, "latency_ms_p10": 0.121, "latency_ms_p90": 0.15,
                            "throughput_ips": 90150.1, "speedup": 25.94, "efficiency": 2118.87},
        "distilled_dkd": {"latency_ms_p50": 0.130, "latency_ms_p10": 0.122, "latency_ms_p90": 0.16,
                          "throughput_ips": 93369.6, "speedup": 25.62, "efficiency": 2108.41},
    }
    return {"machine": {"cpu": "Test CPU 9000", "flags": ["avx2"], "threads": 2}, "models": models}


# ---- cells -----------------------------------------------------------------------------------


def test_vs_teacher_is_student_minus_teacher_and_reads_the_old_key():
    assert vs_teacher({"accuracy_vs_teacher": 0.7435}) == 0.7435
    assert vs_teacher({"accuracy_drop": 0.7435}) == -0.7435  # old key: teacher − student
    assert vs_teacher({"accuracy_vs_teacher": 1.5, "accuracy_drop": 9.0}) == 1.5  # the new key wins
    assert vs_teacher({"test_accuracy": 98.0}) is None
    assert str(vs_teacher({"accuracy_drop": 0.0})) == "0.0"  # not -0.0


def test_quality_table_leads_with_accuracy_and_a_signed_vs_teacher_cell():
    table = comparison_table(_evaluation(), "quality").splitlines()
    assert table[0] == ("| Model | Test acc. (%) | 95% CI (%) | vs baseline (pt) [95% CI] | McNemar p | Gap closed "
                        "| vs teacher (pt) |")
    # the baseline is 0.74 points above the teacher: positive; a tie prints +0.00, the teacher's own row –
    assert table[2] == "| teacher | 98.14 | 95.72 to 99.20 | – | – | – | – |"
    assert table[3] == "| baseline | 98.88 | 96.77 to 99.62 | – | – | – | +0.74 |"
    assert table[4] == "| distilled_logit | 98.14 | 95.14 to 99.14 | -0.74 [-2.60 to +1.12] | 0.688 | n/a | +0.00 |"
    # an evaluation.json with only the old key gives the same signed cell
    old = {"baseline": {"test_accuracy": 98.8848, "accuracy_drop": -0.7435}}
    assert comparison_table(old).splitlines()[2].endswith("| +0.74 |")
    assert "Drop" not in " ".join(title for columns in TABLE_COLUMNS.values() for title, _ in columns)


def test_each_column_is_defined_once():
    titles = [title for columns in TABLE_COLUMNS.values() for title, _ in columns]
    assert len(titles) == len(set(titles))
    assert not {"Latency b=1, median (ms)", "Throughput (img/s)", "Speed-up"} & {t for t, _ in TABLE_COLUMNS["quality"]}


# ---- headline --------------------------------------------------------------------------------


def test_headline_names_a_single_best_student():
    lines = [line for line in headline(_evaluation(), 269) if line]
    assert len(lines) == 1
    assert lines[0].startswith("Best distilled student: **distilled_dkd** at 98.88%")
    assert "Against the teacher: +0.74 points (above it), with 118.2× fewer bytes." in lines[0]


def test_headline_says_a_tie_is_a_tie_and_ranks_no_one():
    evaluation = _evaluation()
    evaluation["distilled_attention"] = _student(98.8848, 0.7435, 0.0, [-1.8587, 1.8587], 1.0)
    lines = [line for line in headline(evaluation, 269) if line]
    assert lines[0] == ("No single best distilled student: **distilled_dkd** and **distilled_attention** tie at "
                        "98.88% (the same number of the 269 test images right); the report does not rank them.")
    assert [line.split(" at ")[0] for line in lines[1:]] == [
        "Tied best distilled student: **distilled_dkd**",
        "Tied best distilled student: **distilled_attention**",
    ]
    assert not any(line.startswith("Best distilled student") for line in lines)


def test_headline_says_below_the_teacher_with_the_old_key():
    evaluation = _evaluation()
    del evaluation["distilled_dkd"]
    student = evaluation["distilled_logit"]
    del student["accuracy_vs_teacher"]
    student["accuracy_drop"] = 1.1
    (line,) = [line for line in headline(evaluation, 269) if line]
    assert "Against the teacher: -1.10 points (below it)" in line


def test_headline_gives_the_gap_size_and_flags_a_gap_within_noise():
    # the committed digits run: the teacher is one of 269 test images above the baseline, so DKD's
    # +1.12 points are "300% of the gap", a share that says nothing
    evaluation = {"teacher": {"test_accuracy": 99.2565}, "baseline": {"test_accuracy": 98.8848},
                  "distilled_dkd": {**_student(100.0, 0.7435, 1.1152, [0.0, 2.6022], 0.25), "gap_closed": 3.0}}
    (line,) = [line for line in headline(evaluation, 269) if line]
    assert ("it closes 300% of the teacher–baseline gap of 0.37 points (1 test image), a gap narrower than "
            "this comparison's own uncertainty, so that share says little.") in line
    # the CIFAR-10 slice, seed 42: a 29-image gap, wider than the half-width of [-1.47, +3.64]
    evaluation = {"teacher": {"test_accuracy": 72.2714}, "baseline": {"test_accuracy": 69.4199},
                  "distilled_logit": {**_student(70.3048, -1.97, 0.8849, [-1.4749, 3.6382], 0.5), "gap_closed": 0.3103}}
    (line,) = [line for line in headline(evaluation, 1017) if line]
    assert "it closes 31% of the teacher–baseline gap of 2.85 points (29 test images)." in line
    assert "says little" not in line


# ---- figure choices --------------------------------------------------------------------------


def test_prediction_grid_picks_baseline_wrong_distilled_right_images_first():
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    preds = {
        #                         0  1  2  3  4  5  6
        "teacher": torch.tensor([0, 1, 2, 0, 0, 3, 2]),
        "baseline": torch.tensor([0, 0, 2, 3, 3, 3, 2]),
        "distilled_logit": torch.tensor([0, 1, 1, 3, 3, 3, 2]),
        "distilled_dkd": torch.tensor([0, 0, 2, 3, 0, 3, 2]),
    }
    # 0, 6: everyone agrees; 5: everyone wrong the same way. 1, 4: the baseline wrong, a student
    # right; 2: the baseline right, a student wrong; 3: only the teacher differs.
    chosen, groups = choose_disagreements(labels, preds, 16)
    assert chosen == [1, 4, 2, 3]
    assert groups == {"gained": 2, "lost": 1, "other": 1}
    assert choose_disagreements(labels, preds, 3)[0] == [1, 4, 2]
    assert choose_disagreements(labels, preds, 3) == choose_disagreements(labels, preds, 3)  # no randomness


def test_prediction_grid_without_students_still_finds_disagreements():
    labels = torch.tensor([0, 1])
    chosen, groups = choose_disagreements(labels, {"teacher": torch.tensor([0, 1]),
                                                   "baseline": torch.tensor([0, 0])}, 16)
    assert chosen == [1] and groups == {"gained": 0, "lost": 0, "other": 1}


def test_per_class_table_hand_example():
    labels = torch.tensor([0, 0, 1, 1, 1])
    table = per_class_table(labels, {"a": torch.tensor([0, 1, 1, 1, 0])}, 3)
    assert table == {"a": [50.0, pytest.approx(66.6667), None]}  # class 2 has no test image


@pytest.mark.parametrize(("low", "high", "ticks"), [
    (0.2256, 68.25, [0.3, 1, 3, 10, 30]),      # the committed sizes, padded
    (0.0796, 5.325, [0.1, 0.3, 1, 3]),         # the committed latencies, padded
    (1e-3, 1e6, [0.001, 0.1, 10, 1000, 1e5]),  # many decades: every other power of ten
    (0.11, 0.45, [0.15, 0.2, 0.3]),             # less than one 1-3 step: finer steps
])
def test_log_ticks_are_few_and_round(low, high, ticks):
    assert log_ticks(low, high) == pytest.approx(ticks)


def test_dodge_spreads_only_models_at_the_same_cost():
    # three students share a size (their whiskers would overlap whatever their accuracy); the teacher is far away
    assert dodge_offsets([0.361, 0.361, 0.3615, 42.7]) == [-8.0, 0.0, 8.0, 0.0]
    assert dodge_offsets([0.361, 0.5]) == [0.0, 0.0]


def test_objective_terms_are_the_loss_terms_besides_the_total():
    row = {"model": "m", "epoch": "1", "train_loss": "2", "train_acc": "50", "val_loss": "1", "val_acc": "60",
           "lr": "0.1", "train_kd": "1.5", "train_ce": "0.5"}
    assert objective_terms(row) == ["train_kd", "train_ce"]


# ---- timing ----------------------------------------------------------------------------------


def test_load_timing_reads_the_timing_file_or_says_there_is_none(tmp_path):
    evaluation = _evaluation()
    path = tmp_path / "timing" / "evaluate.json"
    assert load_timing(path, evaluation) is None
    path.parent.mkdir()
    path.write_text(json.dumps(_timing()))
    timing = load_timing(path, evaluation)
    assert timing["models"]["baseline"]["latency_ms_p50"] == 0.127 and timing["source"] == str(path)


# ---- rendering -------------------------------------------------------------------------------


def _inputs(tmp_path: Path) -> dict[str, Any]:
    """A toy test split (4 classes, 32 images), predictions and histories for the four models."""
    data = make_prepared(n_test=32, classes=4)
    labels = data.test.labels.tolist()
    wrong = {"teacher": {3}, "baseline": {1, 5, 9}, "distilled_logit": {5, 20}, "distilled_dkd": {1, 2}}
    rows = [{"index": i, "actual": y, **{n: (y + 1) % 4 if i in wrong[n] else y for n in wrong}}
            for i, y in enumerate(labels)]
    write_csv(tmp_path / "predictions.csv", rows)
    history = tmp_path / "history"
    for name in wrong:
        terms = {"train_kd": 1.0, "train_ce": 0.1} if name.startswith("distilled") else {"train_ce": 1.0}
        write_csv(history / f"{name}.csv", [
            {"model": name, "epoch": e, "train_loss": sum(terms.values()) / e, "train_acc": 90, "val_loss": 0.5 / e,
             "val_acc": 80 + e, "lr": 0.1, **{k: v / e for k, v in terms.items()}} for e in range(1, 4)])
    context = {"dataset": "toy", "teacher_arch": "resnet18", "student_arch": "student_cnn", "student_settings": "",
               "temperature": 4.0, "alpha": 0.9, "seed": 42}
    return {"figures_dir": tmp_path / "reports" / "figures", "evaluation": _evaluation(), "training": {},
            "history_dir": history, "predictions_csv": tmp_path / "predictions.csv", "data": data,
            "context": context}


def test_report_renders_with_the_timing_file(tmp_path):
    out = tmp_path / "reports" / "report.md"
    inputs = _inputs(tmp_path)
    write_report(out, **inputs, timing={**_timing(), "source": "metrics/timing/evaluate.json"})
    report = out.read_text()
    assert report.index("## Quality") < report.index("## Cost on this machine") < report.index("## Figures")
    assert "Timed on Test CPU 9000 (flags: avx2), 2 thread(s)" in report
    assert ("| baseline | 94,186 | 0.361 | 118.2× | 0.127 | 0.120 to 0.140 | 86,932 | 26.13× | 2150.7 |"
            in report.splitlines())
    assert "| teacher | 11,172,810 | 42.658 | – | 3.328 | 3.200 to 3.600 | 6,255 | – | 0.7 |" in report.splitlines()
    for file, _, _ in FIGURES:
        assert (inputs["figures_dir"] / file).read_bytes()[:8] == PNG, file
        assert f"(figures/{file})" in report
    assert "not drawn" not in report


def test_report_renders_without_timing(tmp_path):
    out = tmp_path / "reports" / "report.md"
    inputs = _inputs(tmp_path)
    stale = inputs["figures_dir"] / "accuracy_vs_latency.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG)  # from an earlier run with timing
    write_report(out, **inputs, timing=None)
    report = out.read_text()
    assert "No timing was recorded (`metrics/timing/evaluate.json` is missing)" in report
    assert "| baseline | 94,186 | 0.361 | 118.2× | – | – | – | – | – |" in report.splitlines()
    assert ("Accuracy vs latency: not drawn, because no timing was recorded (`metrics/timing/evaluate.json` is "
            "missing)." in report)
    assert not stale.exists() and "accuracy_vs_latency.png" not in report
    for file in ("accuracy.png", "accuracy_vs_size.png", "predictions.png", "per_class_accuracy.png"):
        assert (inputs["figures_dir"] / file).read_bytes()[:8] == PNG, file




def test_training_table_takes_the_time_from_the_timing_file(tmp_path, monkeypatch):
    from kdpipe import paths
    from kdpipe.io import write_json
    from kdpipe.report import _train_seconds, _training_table

    monkeypatch.chdir(tmp_path)
    write_json(paths.timing_path("baseline"), {"train_seconds": 5.12, "machine": {}})
    training = {"baseline": {"best_val_accuracy": 99.63, "best_epoch": 19, "epochs": 30, **_train_seconds("baseline")},
                "teacher": {"best_val_accuracy": 98.51, "best_epoch": 13, "epochs": 15, **_train_seconds("teacher")}}
    lines = _training_table(["teacher", "baseline"], training)
    assert "| baseline | 99.63 | 19 | 30 | 5.1 |" in lines and "| teacher | 98.51 | 13 | 15 | – |" in lines


def test_the_report_names_the_teachers_and_students_own_seeds_where_they_differ():
    from kdpipe.config import parse_params

    assert seed_phrase(parse_params({})) == "42"
    assert seed_phrase(parse_params({"student": {"seed": 42}})) == "42"
    assert seed_phrase(parse_params({"student": {"seed": 3}})) == "42 (student seed 3)"
    assert seed_phrase(parse_params({"seed": 1, "teacher": {"seed": 7}, "student": {"seed": 2}})) == \
        "1 (teacher seed 7, student seed 2)"
