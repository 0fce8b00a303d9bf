"""Distillation losses against values computed independently here (torchdistill-style)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.distill import METHODS, BatchContext, CrossEntropyObjective, FrozenTeacher, OnlineTeacher, soft_kl
from kdpipe.distill.logit import LogitKD


def softmax_list(z: list[float], t: float) -> list[float]:
    m = max(v / t for v in z)
    e = [math.exp(v / t - m) for v in z]
    return [v / sum(e) for v in e]


def reference_soft_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> float:
    """Σ_k p_t·(log p_t − log p_s) per row, mean over the batch, × T², in float64 with plain Python."""
    total = 0.0
    for srow, trow in zip(s.double().tolist(), t.double().tolist()):
        ps, pt = softmax_list(srow, temperature), softmax_list(trow, temperature)
        total += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    return total / len(s) * temperature**2


def test_soft_kl_hand_computed_value():
    # One row, two classes. T=2: student logits [0, 0] -> p_s = [1/2, 1/2];
    # teacher logits [2 ln 3, 0] -> z/T = [ln 3, 0] -> p_t = [3/4, 1/4].
    # KL = 3/4·ln(3/4 / 1/2) + 1/4·ln(1/4 / 1/2) = 3/4·ln 1.5 − 1/4·ln 2; × T² = 4.
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[2 * math.log(3.0), 0.0]])
    expected = 4 * (0.75 * math.log(1.5) - 0.25 * math.log(2.0))
    assert expected == pytest.approx(0.523248, abs=1e-6)
    assert soft_kl(s, t, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # batchmean: adding a row with zero divergence halves the value
    s2 = torch.cat([s, torch.tensor([[1.0, -1.0]])])
    t2 = torch.cat([t, torch.tensor([[1.0, -1.0]])])
    assert soft_kl(s2, t2, 2.0).item() == pytest.approx(expected / 2, rel=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 10.0])
def test_soft_kl_matches_the_independent_formula(temperature):
    gen = torch.Generator().manual_seed(int(temperature * 10))
    s = torch.randn(6, 5, generator=gen) * 3
    t = torch.randn(6, 5, generator=gen) * 3
    assert soft_kl(s, t, temperature).item() == pytest.approx(reference_soft_kl(s, t, temperature), rel=1e-5)


def test_soft_kl_is_zero_for_identical_logits_and_positive_otherwise():
    z = torch.randn(8, 10)
    assert soft_kl(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # shifting every logit of a row by a constant does not change the softmax
    assert soft_kl(z + 5.0, z, 4.0).item() == pytest.approx(0.0, abs=1e-5)
    assert soft_kl(z, torch.randn(8, 10), 4.0).item() > 0


def test_soft_kl_is_computed_in_float32_for_low_precision_logits():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    out = soft_kl(s.bfloat16(), t.bfloat16(), 3.0)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(reference_soft_kl(s.bfloat16().float(), t.bfloat16().float(), 3.0), rel=1e-5)


def test_soft_kl_high_temperature_limit():
    """For large T, p = softmax(z/T) ≈ (1 + (z − z̄)/T)/K, and KL(p_t‖p_s) ≈ ½ Σ (p_t − p_s)² / p, so
    T²·KL → (1/2K)·Σ_k ((t − t̄) − (s − s̄))_k², averaged over the batch. The error is O(1/T)."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(16, 10, generator=gen)
    t = torch.randn(16, 10, generator=gen)
    k = s.shape[1]
    d = (t - t.mean(1, keepdim=True)) - (s - s.mean(1, keepdim=True))
    limit = (d.pow(2).sum(1) / (2 * k)).mean().item()
    errors = {}
    for temperature in (10.0, 100.0):
        value = soft_kl(s, t, temperature).item()
        errors[temperature] = abs(value - limit) / limit
    assert errors[100.0] < 0.01
    assert errors[100.0] < errors[10.0]  # converging, not just close by chance


def test_soft_kl_t_squared_scaling_keeps_gradient_scale():
    """Hinton's T² factor: the gradient w.r.t. student logits is (p_s − p_t)·T/B, which for
    large T tends to ((s − s̄) − (t − t̄))/(K·B), independent of T."""
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(4, 10, generator=gen)
    grads = []
    for temperature in (20.0, 40.0):
        s = torch.randn(4, 10, generator=torch.Generator().manual_seed(2)).requires_grad_()
        soft_kl(s, t, temperature).backward()
        expected = (F.softmax(s.detach() / temperature, 1) - F.softmax(t / temperature, 1)) * temperature / 4
        assert torch.allclose(s.grad, expected, atol=1e-6)
        grads.append(s.grad.norm().item())
    assert grads[0] == pytest.approx(grads[1], rel=0.05)


class TinyNet(nn.Module):
    def __init__(self, seed: int, features: int = 12, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(features, classes)
        self.bn = nn.BatchNorm1d(classes)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.fc(x)))


def make_logit_kd(alpha: float, temperature: float = 3.0, label_smoothing: float = 0.0):
    student, teacher = TinyNet(0), TinyNet(1)
    objective = LogitKD(student, OnlineTeacher(teacher), temperature=temperature, alpha=alpha,
                        label_smoothing=label_smoothing)
    return objective, student, teacher


def test_logit_method_is_registered():
    assert METHODS["logit"] is LogitKD


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_logit_kd_alpha_zero_is_plain_cross_entropy(label_smoothing):
    objective, student, _ = make_logit_kd(alpha=0.0, label_smoothing=label_smoothing)
    objective.eval()  # no dropout, so the student's logits can be recomputed
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    logits, losses = objective.forward_train(x, y, BatchContext(torch.arange(8), 0))
    ce = F.cross_entropy(student(x), y, label_smoothing=label_smoothing)
    assert sum(losses.values()).item() == pytest.approx(ce.item(), rel=1e-6)
    assert losses["kd"].item() == 0.0
    baseline = CrossEntropyObjective(student, label_smoothing)
    _, base_losses = baseline.forward_train(x, y, BatchContext(torch.arange(8), 0))
    assert base_losses["ce"].item() == pytest.approx(ce.item(), rel=1e-6)


def test_logit_kd_alpha_one_is_the_soft_term_only():
    objective, student, teacher = make_logit_kd(alpha=1.0, temperature=4.0)
    objective.eval()
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    _, losses = objective.forward_train(x, y, BatchContext(torch.arange(8), 0))
    with torch.no_grad():
        s, t = student(x), teacher.eval()(x)
    assert losses["ce"].item() == 0.0
    assert sum(losses.values()).item() == pytest.approx(reference_soft_kl(s, t, 4.0), rel=1e-5)


def test_logit_kd_weights_are_alpha_and_one_minus_alpha():
    objective, student, teacher = make_logit_kd(alpha=0.3, temperature=2.0)
    objective.eval()
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    _, losses = objective.forward_train(x, y, BatchContext(torch.arange(8), 0))
    with torch.no_grad():
        s, t = student(x), teacher(x)
    assert losses["kd"].item() == pytest.approx(0.3 * reference_soft_kl(s, t, 2.0), rel=1e-5)
    assert losses["ce"].item() == pytest.approx(0.7 * F.cross_entropy(s, y).item(), rel=1e-5)


def test_gradient_reaches_the_student_and_never_the_teacher():
    objective, student, teacher = make_logit_kd(alpha=0.5)
    objective.train()
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    _, losses = objective.forward_train(x, y, BatchContext(torch.arange(8), 0))
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.fc.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    trainable = {id(p) for p in objective.trainable_parameters()}
    assert trainable == {id(p) for p in student.parameters()}


def test_teacher_stays_in_eval_mode_when_the_objective_trains():
    objective, student, teacher = make_logit_kd(alpha=0.9)
    objective.train()
    assert student.training
    assert not teacher.training and all(not m.training for m in teacher.modules())
    running = teacher.bn.running_mean.clone()
    x = torch.randn(8, 12)
    t1 = objective.targets(x, BatchContext(torch.arange(8), 0))
    t2 = objective.targets(x, BatchContext(torch.arange(8), 1))
    assert torch.equal(t1, t2)  # no dropout in the teacher
    assert torch.equal(teacher.bn.running_mean, running)  # BatchNorm statistics untouched
    objective.train(True)
    teacher_wrapper = objective.targets.teacher
    assert isinstance(teacher_wrapper, FrozenTeacher) and not teacher_wrapper.training
