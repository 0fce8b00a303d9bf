"""kdpipe.distill.logit: Hinton KD, ``α · soft_kl + (1 − α) · CE``, checked against the
independent soft-KL formula, with online and cached teacher logits."""

from __future__ import annotations

import dataclasses

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe import models
from kdpipe.distill import METHODS, BatchContext, CachedTeacher
from kdpipe.distill.logit import LogitKD, LogitSettings
from kdpipe.validation import derived_fields
from tests import kd_reference as ref
from tests.conftest import build_method, method_inputs, method_settings

BATCH = BatchContext(torch.arange(8), 0)


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
    # params.yaml refuses alpha 0 (no teacher term: the baseline); the formula is still checked at that end
    settings = dataclasses.replace(method_settings("logit", temperature=temperature, alpha=alpha or 0.5), alpha=alpha)
    objective = METHODS.get("logit").factory(method_inputs(student, teacher, label_smoothing, (1, 8, 8)), settings)
    return objective, student, teacher


def test_logit_is_registered_with_the_shared_values_it_reads():
    plugin = METHODS.get("logit")
    assert plugin.factory is LogitKD and plugin.settings is LogitSettings
    assert set(derived_fields(LogitSettings)) == {"temperature", "alpha", "teacher_targets", "teacher_flip"}
    settings = method_settings("logit", temperature=2.5, alpha=0.25, teacher_targets="online")
    assert (settings.temperature, settings.alpha, settings.teacher_targets) == (2.5, 0.25, "online")
    assert settings.logit_standardization is False  # its one own setting, off by default
    assert method_settings("logit", logit={"logit_standardization": True}).logit_standardization is True


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_alpha_zero_is_plain_cross_entropy(label_smoothing):
    objective, student, _ = make_logit_kd(alpha=0.0, label_smoothing=label_smoothing)
    objective.eval()  # no dropout, so the student's logits can be recomputed
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    _, losses = objective.forward_train(x, y, BATCH)
    ce = F.cross_entropy(student(x), y, label_smoothing=label_smoothing)
    assert set(losses) == {"kd", "ce"}
    assert sum(losses.values()).item() == pytest.approx(ce.item(), rel=1e-6)
    assert losses["kd"].item() == 0.0


def test_alpha_one_is_the_soft_term_only():
    objective, student, teacher = make_logit_kd(alpha=1.0, temperature=4.0)
    objective.eval()
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    _, losses = objective.forward_train(x, y, BATCH)
    with torch.no_grad():
        s, t = student(x), teacher.eval()(x)
    assert losses["ce"].item() == 0.0
    assert sum(losses.values()).item() == pytest.approx(ref.soft_kl(s, t, 4.0), rel=1e-5)


def test_weights_are_alpha_and_one_minus_alpha():
    objective, student, teacher = make_logit_kd(alpha=0.3, temperature=2.0)
    objective.eval()
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    logits, losses = objective.forward_train(x, y, BATCH)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    assert torch.equal(logits, s)
    assert losses["kd"].item() == pytest.approx(0.3 * ref.soft_kl(s, t, 2.0), rel=1e-5)
    assert losses["ce"].item() == pytest.approx(0.7 * F.cross_entropy(s, y).item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_logit_standardization_takes_the_soft_term_between_standardized_logits(temperature):
    student, teacher = TinyNet(0), TinyNet(1)
    objective = build_method("logit", student, teacher, temperature=temperature, alpha=0.7,
                             logit={"logit_standardization": True}).eval()
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    logits, losses = objective.forward_train(x, y, BATCH)
    with torch.no_grad():
        s, t = student(x), teacher.eval()(x)
    assert torch.equal(logits, s)  # the student's own logits are returned, not standardised ones
    expected = ref.soft_kl(ref.standardize_rows(s), ref.standardize_rows(t), temperature)
    assert losses["kd"].item() == pytest.approx(0.7 * expected, rel=1e-5)
    assert losses["ce"].item() == pytest.approx(0.3 * F.cross_entropy(s, y).item(), rel=1e-5)  # raw logits
    assert losses["kd"].item() != pytest.approx(0.7 * ref.soft_kl(s, t, temperature), rel=1e-3)


def test_with_logit_standardization_a_rescaled_teacher_has_nothing_to_distil():
    """Standardised logits drop each sample's logit scale and offset: a teacher whose logits are
    the student's times 5 plus 2 matches it exactly (plain KD does not)."""
    student = TinyNet(0).eval()
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    with torch.no_grad():
        table = (student(x) * 5 + 2)[None]  # one epoch of cached teacher logits
    for standardize, zero in ((True, True), (False, False)):
        objective = build_method("logit", student, CachedTeacher(table), temperature=4.0, alpha=0.9,
                                 logit={"logit_standardization": standardize}).eval()
        _, losses = objective.forward_train(x, y, BATCH)
        assert (losses["kd"].item() == pytest.approx(0.0, abs=1e-5)) == zero


def test_the_student_as_its_own_teacher_has_nothing_to_distil():
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16])
    objective = build_method("logit", student, copy.deepcopy(student), temperature=4.0, alpha=0.9).eval()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 3, 2])
    _, losses = objective.forward_train(x, y, BatchContext(torch.arange(3), 0))
    assert losses["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_cached_teacher_logits_are_read_by_epoch_and_index():
    """With ``kd.teacher_targets: cached`` the soft term is taken against the stored rows of
    the batch's images in the batch's epoch (no teacher runs)."""
    student = TinyNet(0).eval()
    table = torch.randn(2, 20, 4)  # epochs × images × classes
    objective = build_method("logit", student, CachedTeacher(table), temperature=2.0, alpha=0.6).eval()
    x, y = torch.randn(3, 12), torch.tensor([1, 0, 3])
    indices = torch.tensor([7, 0, 19])
    _, losses = objective.forward_train(x, y, BatchContext(indices, 1))
    with torch.no_grad():
        s = student(x)
    assert losses["kd"].item() == pytest.approx(0.6 * ref.soft_kl(s, table[1, indices], 2.0), rel=1e-5)
    _, other_epoch = objective.forward_train(x, y, BatchContext(indices, 0))
    assert other_epoch["kd"].item() == pytest.approx(0.6 * ref.soft_kl(s, table[0, indices], 2.0), rel=1e-5)


def test_gradient_reaches_the_student_and_never_the_teacher():
    objective, student, teacher = make_logit_kd(alpha=0.5)
    objective.train()
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    _, losses = objective.forward_train(x, y, BATCH)
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.fc.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    trainable = {id(p) for p in objective.trainable_parameters()}
    assert trainable == {id(p) for p in student.parameters()}
