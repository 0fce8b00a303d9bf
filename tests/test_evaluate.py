"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe import machine, models, paths
from kdpipe.config import parse_params
from kdpipe.data.loader import Normalizer
from kdpipe.data.prepare import write_prepared
from kdpipe.errors import ConfigError
from kdpipe.evaluate import (
    compare_to_baseline,
    compare_to_teacher,
    confusion_matrix,
    latency_summary,
    time_forward,
    evaluate_all,
    evaluate_model,
    mlflow_metrics,
    per_class_accuracy,
)
from kdpipe.io import write_csv
from tests.conftest import make_prepared


def test_confusion_matrix_hand_example():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    # rows: true class, columns: predicted class
    expected = [[1, 1, 0],
                [0, 1, 0],
                [1, 0, 2]]
    conf = confusion_matrix(labels, preds, 3)
    assert conf.tolist() == expected
    assert conf.sum().item() == len(labels)


def test_confusion_matrix_counts_unused_classes():
    conf = confusion_matrix(torch.tensor([3, 3, 1]), torch.tensor([3, 1, 1]), 5)
    assert conf.shape == (5, 5)
    assert conf[3, 3] == 1 and conf[3, 1] == 1 and conf[1, 1] == 1 and conf.sum() == 3


def test_per_class_accuracy_hand_example():
    conf = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    # 1/2, 1/1, 2/3, and a class with no test image reports 0 rather than dividing by zero
    assert per_class_accuracy(conf) == [50.0, 100.0, pytest.approx(66.6667, abs=1e-4), 0.0]


def test_compare_to_teacher_ratios():
    teacher = {"test_accuracy": 98.0, "size_mb": 40.0}
    student = {"test_accuracy": 96.5, "size_mb": 0.4}
    out = compare_to_teacher(student, teacher)
    assert out == {
        "compression_ratio": pytest.approx(100.0),  # 40 / 0.4
        "accuracy_vs_teacher": pytest.approx(-1.5),  # 96.5 − 98 points: worse than the teacher
    }
    # a student better than its teacher shows a positive difference
    assert compare_to_teacher({**student, "test_accuracy": 99.0}, teacher)["accuracy_vs_teacher"] == pytest.approx(1.0)


def test_latency_summary_percentiles_and_paired_speedup():
    times = np.arange(1.0, 11.0)  # 1..10 ms
    teacher = times * 4.0  # every pass 4x slower
    out = latency_summary(times, teacher)
    # numpy's linear percentiles of 1..10: p10 = 1.9, p50 = 5.5, p90 = 9.1
    assert out == {"latency_ms_p50": pytest.approx(5.5), "latency_ms_p10": pytest.approx(1.9),
                   "latency_ms_p90": pytest.approx(9.1), "speedup": pytest.approx(4.0),
                   "speedup_p10": pytest.approx(4.0), "speedup_p90": pytest.approx(4.0)}
    assert set(latency_summary(times)) == {"latency_ms_p50", "latency_ms_p10", "latency_ms_p90"}


def test_time_forward_interleaves_the_models():
    calls: list[str] = []

    class Tagged(nn.Module):
        def __init__(self, tag: str) -> None:
            super().__init__()
            self.tag = tag

        def forward(self, x):
            calls.append(self.tag)
            return x

    times = time_forward({"a": Tagged("a"), "b": Tagged("b")}, torch.zeros(1, 1), warmup=2, runs=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up each, then pass by pass in turn
    assert times["a"].shape == times["b"].shape == (3,) and (times["a"] > 0).all()


class FixedPredictor(nn.Module):
    """Predicts class = label of a known lookup, to get an exactly known accuracy."""

    def __init__(self, answers: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.register_buffer("answers", answers.clone())
        self.scale = nn.Parameter(torch.ones(1))
        self.classes = classes
        self.seen = 0

    def forward(self, x):
        n = x.shape[0]
        if n == 1:  # latency probes: any answer
            return torch.zeros(1, self.classes)
        answers = self.answers[self.seen:self.seen + n]
        self.seen = (self.seen + n) % len(self.answers)
        return nn.functional.one_hot(answers, self.classes).float() * self.scale


def test_evaluate_model_with_known_predictions():
    data = make_prepared(n_test=20, classes=4)
    labels = data.test.labels
    preds = labels.clone()
    preds[[0, 5, 6]] = (preds[[0, 5, 6]] + 1) % 4  # three mistakes: 17/20 right
    model = FixedPredictor(preds, 4)
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    metrics, conf, got = evaluate_model(model, data.test, normalize, 4, batch_size=20)
    assert torch.equal(got, preds)
    assert metrics["test_accuracy"] == pytest.approx(85.0)
    # Wilson, p = 0.85, n = 20, z² = 3.8416: centre = (0.85 + 3.8416/40) / (1 + 3.8416/20) = 0.793604,
    # half = 1.96·sqrt(0.85·0.15/20 + 3.8416/1600) / 1.19208 = 0.154028
    assert metrics["test_accuracy_ci95"] == pytest.approx([63.9577, 94.7632], abs=1e-4)
    assert torch.equal(conf, confusion_matrix(labels, preds, 4))
    expected_per_class = [100.0 * int(((labels == c) & (preds == c)).sum()) / int((labels == c).sum()) for c in range(4)]
    assert metrics["per_class_accuracy"] == pytest.approx(expected_per_class, abs=1e-4)
    assert metrics["params"] == 1
    # one float32 parameter + a 20-element int64 buffer
    assert metrics["size_mb"] == pytest.approx((4 + 20 * 8) / 2**20, abs=1e-6)


def test_evaluate_model_returns_the_documented_keys():
    data = make_prepared(n_test=24)
    torch.manual_seed(0)
    model = models.build("student_cnn", 1, data.num_classes, 8, widths=[8, 16], dropout=0.0).eval()
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    metrics, conf, preds = evaluate_model(model, data.test, normalize, data.num_classes, 16)
    assert set(metrics) == {"test_accuracy", "test_accuracy_ci95", "params", "size_mb", "per_class_accuracy"}
    low, high = metrics["test_accuracy_ci95"]
    assert 0 <= low <= metrics["test_accuracy"] <= high <= 100
    assert metrics["params"] == models.count_params(model)
    assert metrics["size_mb"] == pytest.approx(models.size_mb(model), abs=1e-6)
    assert len(metrics["per_class_accuracy"]) == data.num_classes
    assert conf.sum().item() == len(data.test) == len(preds)
    acc = (preds == data.test.labels).float().mean().item() * 100
    assert metrics["test_accuracy"] == pytest.approx(acc, abs=1e-3)
    assert not model.training


# ---- paired statistics: each distilled student against the baseline ---------------------------

N_TEST = 40


def _correct(right: list[int]) -> np.ndarray:
    mask = np.zeros(N_TEST, dtype=bool)
    mask[right] = True
    return mask


# 40 test images: the teacher gets 36 right, the baseline 30 (images 0-29), the student 34: it
# loses 2 of the baseline's (0, 1) and wins 6 more (30-35). Discordant pairs b=6, c=2.
TEACHER_RIGHT = _correct(list(range(36)))
BASELINE_RIGHT = _correct(list(range(30)))
STUDENT_RIGHT = _correct(list(range(2, 36)))


def test_compare_to_baseline_hand_example():
    out = compare_to_baseline(STUDENT_RIGHT, BASELINE_RIGHT, TEACHER_RIGHT, resamples=2000, seed=42)
    assert set(out) == {"accuracy_diff_vs_baseline", "accuracy_diff_ci95", "mcnemar_p", "gap_closed"}
    assert out["accuracy_diff_vs_baseline"] == pytest.approx(10.0)  # (34 − 30) / 40 in points
    low, high = out["accuracy_diff_ci95"]
    assert low < 10.0 < high and high - low < 40
    assert out["mcnemar_p"] == pytest.approx(74 / 256, abs=1e-6)  # 2·(C(8,0)+C(8,1)+C(8,2))/2^8
    assert out["gap_closed"] == pytest.approx(round(4 / 6, 4))  # (34 − 30) / (36 − 30)
    assert compare_to_baseline(STUDENT_RIGHT, BASELINE_RIGHT, TEACHER_RIGHT, 2000, 42) == out  # seeded
    json.dumps(out, allow_nan=False)  # plain JSON values


def test_compare_to_baseline_gap_is_null_when_the_teacher_is_not_above_the_baseline():
    out = compare_to_baseline(STUDENT_RIGHT, BASELINE_RIGHT, BASELINE_RIGHT.copy(), 2000, 0)
    assert out["gap_closed"] is None
    same = compare_to_baseline(BASELINE_RIGHT, BASELINE_RIGHT, TEACHER_RIGHT, 2000, 0)
    assert same["accuracy_diff_vs_baseline"] == 0 and same["accuracy_diff_ci95"] == [0, 0]
    assert same["mcnemar_p"] == 1.0 and same["gap_closed"] == 0


def test_mlflow_metrics_splits_intervals_and_drops_nulls():
    metrics = {"test_accuracy": 85.0, "test_accuracy_ci95": [63.9, 94.7], "accuracy_diff_ci95": [-1.5, 2.25],
               "mcnemar_p": 0.25, "gap_closed": None, "params": 10}
    assert mlflow_metrics("distilled_logit", metrics) == {
        "distilled_logit.test_accuracy": 85.0,
        "distilled_logit.test_accuracy_ci95_low": 63.9, "distilled_logit.test_accuracy_ci95_high": 94.7,
        "distilled_logit.accuracy_diff_ci95_low": -1.5, "distilled_logit.accuracy_diff_ci95_high": 2.25,
        "distilled_logit.mcnemar_p": 0.25, "distilled_logit.params": 10,
    }


def test_bootstrap_resamples_is_validated():
    assert parse_params({}).evaluate.bootstrap_resamples == 2000
    assert parse_params({"evaluate": {"bootstrap_resamples": 5000}}).evaluate.bootstrap_resamples == 5000
    with pytest.raises(ConfigError, match=r"evaluate\.bootstrap_resamples=100 .*expected an integer >= 1000"):
        parse_params({"evaluate": {"bootstrap_resamples": 100}})


def test_evaluate_all_writes_the_paired_statistics(tmp_path, monkeypatch):
    """The evaluate stage on a synthetic project whose models give known answers."""
    monkeypatch.chdir(tmp_path)
    data = make_prepared(n_test=N_TEST, classes=4)
    write_prepared(paths.PREPARED_DIR, data)
    labels = data.test.labels
    right = {paths.TEACHER: TEACHER_RIGHT, paths.BASELINE: BASELINE_RIGHT, "distilled_logit": STUDENT_RIGHT}
    for name in right:
        write_csv(paths.history_path(name), [{"model": name, "epoch": 1, "train_loss": 1.0, "train_acc": 50.0,
                                              "val_loss": 1.0, "val_acc": 50.0}])

    def fake_load(path, data_meta=None):
        name = Path(path).stem
        answers = torch.where(torch.from_numpy(right[name]), labels, (labels + 1) % 4)
        return FixedPredictor(answers, 4), {}

    monkeypatch.setattr(models, "load", fake_load)
    monkeypatch.setattr(machine, "other_stage_processes", lambda: [])  # whatever else runs on this machine
    params = parse_params({"kd": {"methods": ["logit"]}, "mlflow": {"enabled": False},
                           "evaluate": {"batch_size": N_TEST, "latency_warmup": 1, "latency_runs": 5, "wait_alone_s": 0,
                                        "timing_threads": 1},
                           "runtime": {"device": "cpu", "threads": 1}})
    results = evaluate_all(params)
    written = json.loads((paths.METRICS_DIR / "evaluation.json").read_text())
    assert written == results
    assert list(written) == ["teacher", "baseline", "distilled_logit"]
    for name, m in written.items():
        low, high = m["test_accuracy_ci95"]
        assert low < m["test_accuracy"] < high, name
        assert "accuracy_diff_vs_baseline" not in m or name == "distilled_logit"
    student = written["distilled_logit"]
    assert student["test_accuracy"] == pytest.approx(85.0)
    assert student["accuracy_diff_vs_baseline"] == pytest.approx(10.0)
    low, high = student["accuracy_diff_ci95"]
    assert low < 10.0 < high
    assert student["mcnemar_p"] == pytest.approx(74 / 256, abs=1e-6)
    assert student["gap_closed"] == pytest.approx(0.6667)
    # seeded by params.seed: the interval is the pure function's for that seed
    assert student == {**student, **compare_to_baseline(STUDENT_RIGHT, BASELINE_RIGHT, TEACHER_RIGHT, 2000, 42)}

    # timings apart, with the machine they were taken on; quality metrics carry none
    timing = json.loads(paths.timing_path("evaluate").read_text())
    assert set(timing["models"]) == set(written)
    assert timing["machine"]["threads"] == 1 and timing["machine"]["cpu"]
    assert timing["machine"]["other_kdpipe_stages_running"] == 0
    for name, t in timing["models"].items():
        assert 0 < t["latency_ms_p10"] <= t["latency_ms_p50"] <= t["latency_ms_p90"], name
        assert t["throughput_ips"] > 0 and ("speedup" in t) == (name != "teacher")
        assert not {"latency_ms_p50", "throughput_ips", "speedup", "efficiency"} & set(written[name])
    assert written["baseline"]["accuracy_vs_teacher"] == pytest.approx(75.0 - 90.0)
    latency_rows = (paths.PLOTS_DIR / "timing" / "accuracy_vs_latency.csv").read_text().splitlines()
    assert latency_rows[0] == "model,test_accuracy,latency_ms_p50,latency_ms_p10,latency_ms_p90" and len(latency_rows) == 4
