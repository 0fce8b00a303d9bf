"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdpipe import models
from kdpipe.data.loader import Normalizer
from kdpipe.evaluate import compare_to_teacher, confusion_matrix, evaluate_model, per_class_accuracy
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
    teacher = {"test_accuracy": 98.0, "size_mb": 40.0, "latency_ms_b1": 4.0}
    student = {"test_accuracy": 96.5, "size_mb": 0.4, "latency_ms_b1": 0.5}
    out = compare_to_teacher(student, teacher)
    assert out == {
        "compression_ratio": pytest.approx(100.0),  # 40 / 0.4
        "speedup": pytest.approx(8.0),  # 4 / 0.5
        "accuracy_drop": pytest.approx(1.5),  # 98 − 96.5 points
        "efficiency": pytest.approx(482.5),  # 96.5 / (0.4 × 0.5)
    }
    # a student better than its teacher shows a negative drop
    assert compare_to_teacher({**student, "test_accuracy": 99.0}, teacher)["accuracy_drop"] == pytest.approx(-1.0)


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
    metrics, conf, got = evaluate_model(model, data.test, normalize, 4, batch_size=20, warmup=1, runs=3)
    assert torch.equal(got, preds)
    assert metrics["test_accuracy"] == pytest.approx(85.0)
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
    metrics, conf, preds = evaluate_model(model, data.test, normalize, data.num_classes, 16, warmup=1, runs=3)
    assert set(metrics) == {"test_accuracy", "params", "size_mb", "latency_ms_b1", "throughput_ips", "threads",
                            "per_class_accuracy"}
    assert metrics["params"] == models.count_params(model)
    assert metrics["size_mb"] == pytest.approx(models.size_mb(model), abs=1e-6)
    assert metrics["latency_ms_b1"] > 0 and metrics["throughput_ips"] > 0
    assert metrics["threads"] == torch.get_num_threads()
    assert len(metrics["per_class_accuracy"]) == data.num_classes
    assert conf.sum().item() == len(data.test) == len(preds)
    acc = (preds == data.test.labels).float().mean().item() * 100
    assert metrics["test_accuracy"] == pytest.approx(acc, abs=1e-3)
    assert not model.training
