"""kdpipe.distill.dist: DIST's inter- and intra-class relation losses (Pearson correlations of the
probability tables) against plain-Python loops, the objective's weights, cached teacher logits,
logit standardization and the settings' validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe import models
from kdpipe.distill import METHODS, BatchContext, CachedTeacher, soft_kl
from kdpipe.distill.dist import DIST, DistSettings, dist_terms, pearson
from kdpipe.errors import ConfigError
from kdpipe.validation import derived_fields
from tests import kd_reference as ref
from tests.conftest import build_method, method_settings

BATCH = BatchContext(torch.arange(8), 0)


class TinyNet(nn.Module):
    def __init__(self, seed: int, features: int = 12, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(features, classes)
        self.bn = nn.BatchNorm1d(classes)

    def forward(self, x):
        return self.bn(self.fc(x)) * 3


def _random_logits(seed: int, rows: int = 7, classes: int = 5, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, classes, generator=gen) * scale, torch.randn(rows, classes, generator=gen) * scale


# ---- settings ---------------------------------------------------------------------------------


def test_dist_is_registered_and_reads_temperature_not_kd_alpha():
    plugin = METHODS.get("dist")
    assert plugin.factory is DIST and plugin.settings is DistSettings
    assert set(derived_fields(DistSettings)) == {"temperature", "teacher_targets", "teacher_flip"}
    settings = method_settings("dist", temperature=2.0, alpha=0.1, teacher_targets="online",
                               dist={"beta": 2.0, "gamma": 0.5, "logit_standardization": True})
    assert (settings.beta, settings.gamma, settings.logit_standardization) == (2.0, 0.5, True)
    assert (settings.temperature, settings.teacher_targets) == (2.0, "online")
    assert not hasattr(settings, "alpha")
    default = method_settings("dist")
    assert (default.beta, default.gamma, default.logit_standardization) == (1.0, 1.0, False)


@pytest.mark.parametrize("name", ["beta", "gamma"])
def test_negative_weights_are_rejected_with_one_sentence(name):
    with pytest.raises(ConfigError) as info:
        method_settings("dist", dist={name: -1.0})
    message = str(info.value)
    assert f"kd.dist.{name}" in message and "-1.0" in message and ">= 0" in message, message
    assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message
    method_settings("dist", dist={name: 0.0})  # zero switches a term off


def test_shared_values_are_not_allowed_in_its_own_section():
    with pytest.raises(ConfigError, match="'kd.dist.temperature'"):
        method_settings("dist", dist={"temperature": 2.0})


# ---- the relation losses ----------------------------------------------------------------------


def test_pearson_matches_the_loops_and_is_one_for_affine_relations():
    a, b = _random_logits(0)
    expected = [ref.pearson(x, y) for x, y in zip(a.double().tolist(), b.double().tolist())]
    assert pearson(a, b).tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert pearson(a, 2.5 * a + 7.0).tolist() == pytest.approx([1.0] * len(a), abs=1e-6)
    assert pearson(a, -a).tolist() == pytest.approx([-1.0] * len(a), abs=1e-6)
    assert pearson(torch.ones(1, 5), a[:1]).item() == 0.0  # a constant row: no correlation, no NaN


@pytest.mark.parametrize("temperature", [1.0, 4.0, 10.0])
def test_dist_terms_match_the_independent_formula(temperature):
    s, t = _random_logits(int(temperature))
    inter, intra = dist_terms(s, t, temperature)
    e_inter, e_intra = ref.dist_terms(s, t, temperature)
    assert inter.item() == pytest.approx(e_inter, rel=1e-4, abs=1e-6)
    assert intra.item() == pytest.approx(e_intra, rel=1e-4, abs=1e-6)
    assert inter.dtype == intra.dtype == torch.float32


def test_dist_terms_are_computed_in_float32_for_low_precision_logits():
    s, t = _random_logits(3)
    inter, intra = dist_terms(s.bfloat16(), t.bfloat16(), 2.0)
    e_inter, e_intra = ref.dist_terms(s.bfloat16().float(), t.bfloat16().float(), 2.0)
    assert inter.dtype == intra.dtype == torch.float32
    assert (inter.item(), intra.item()) == pytest.approx((e_inter, e_intra), rel=1e-4, abs=1e-6)


def test_relation_terms_vanish_for_perfectly_correlated_predictions():
    t = torch.tensor([[4.0, 0.0, -2.0, 1.0], [-1.0, 3.0, 0.5, 0.0], [0.0, 1.0, 5.0, -3.0], [2.0, 2.0, -4.0, 0.0]])
    temperature = 2.0
    # the same logits, and logits shifted per row (the same probabilities)
    for s in (t.clone(), t + torch.tensor([[1.0], [-3.0], [0.5], [10.0]])):
        inter, intra = dist_terms(s, t, temperature)
        assert inter.item() == pytest.approx(0.0, abs=1e-5) and intra.item() == pytest.approx(0.0, abs=1e-5)
    # a student whose probabilities are the teacher's mixed with the uniform distribution,
    # p_s = p_t / 2 + 1 / (2C): affine in p_t along every row and every column, so DIST sees
    # perfect correlation while the KL divergence does not
    p_t = F.softmax(t / temperature, dim=1)
    s = temperature * torch.log(p_t / 2 + 1 / (2 * t.shape[1]))
    inter, intra = dist_terms(s, t, temperature)
    assert inter.item() == pytest.approx(0.0, abs=1e-5) and intra.item() == pytest.approx(0.0, abs=1e-5)
    assert soft_kl(s, t, temperature).item() > 0.05
    # a student ranking the classes the other way round is negatively correlated: inter > T²
    flipped, _ = dist_terms(-t, t, 1.0)
    assert flipped.item() > 1.0


def test_a_single_sample_has_a_constant_intra_term():
    """One sample: each class column is a single value, its correlation is 0 (not NaN), so the
    intra term is T² and carries no gradient."""
    s = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    inter, intra = dist_terms(s, torch.tensor([[0.5, 0.2, -1.0]]), 3.0)
    assert intra.item() == pytest.approx(9.0, rel=1e-6)
    intra.backward()
    assert torch.all(s.grad == 0)
    assert math.isfinite(inter.item())


# ---- the objective ----------------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_objective_terms_are_ce_plus_weighted_relations(label_smoothing):
    student, teacher = TinyNet(0), TinyNet(1)
    objective = build_method("dist", student, teacher, label_smoothing=label_smoothing, temperature=3.0,
                             alpha=0.2, dist={"beta": 2.0, "gamma": 0.5}).eval()
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    logits, terms = objective.forward_train(x, y, BATCH)
    with torch.no_grad():
        s, t = student(x), teacher.eval()(x)
    e_inter, e_intra = ref.dist_terms(s, t, 3.0)
    assert torch.equal(logits, s)
    assert set(terms) == {"ce", "inter", "intra"}
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, y, label_smoothing=label_smoothing).item(),
                                               rel=1e-5)  # the full label term: kd.alpha is not read
    assert terms["inter"].item() == pytest.approx(2.0 * e_inter, rel=1e-4, abs=1e-6)
    assert terms["intra"].item() == pytest.approx(0.5 * e_intra, rel=1e-4, abs=1e-6)
    for beta, gamma in ((0.0, 1.0), (1.0, 0.0)):
        obj = build_method("dist", student, teacher, temperature=3.0, dist={"beta": beta, "gamma": gamma}).eval()
        _, terms = obj.forward_train(x, y, BATCH)
        assert (terms["inter"].item() == 0.0) == (beta == 0.0)
        assert (terms["intra"].item() == 0.0) == (gamma == 0.0)


def test_logit_standardization_takes_the_relations_between_standardized_logits():
    student, teacher = TinyNet(0), TinyNet(1)
    objective = build_method("dist", student, teacher, temperature=2.0,
                             dist={"logit_standardization": True}).eval()
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    _, terms = objective.forward_train(x, y, BATCH)
    with torch.no_grad():
        s, t = student(x), teacher.eval()(x)
    e_inter, e_intra = ref.dist_terms(ref.standardize_rows(s), ref.standardize_rows(t), 2.0)
    assert terms["inter"].item() == pytest.approx(e_inter, rel=1e-4, abs=1e-6)
    assert terms["intra"].item() == pytest.approx(e_intra, rel=1e-4, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-5)  # on the raw logits
    plain_inter, _ = ref.dist_terms(s, t, 2.0)
    assert terms["inter"].item() != pytest.approx(plain_inter, rel=1e-3)  # the option does change the loss


def test_cached_teacher_logits_are_read_by_epoch_and_index():
    student = TinyNet(0).eval()
    table = torch.randn(2, 20, 5) * 3  # epochs × images × classes
    objective = build_method("dist", student, CachedTeacher(table), temperature=2.0).eval()
    x, y = torch.randn(4, 12), torch.tensor([1, 0, 3, 4])
    indices = torch.tensor([7, 0, 19, 3])
    with torch.no_grad():
        s = student(x)
    for epoch in (1, 0):
        _, terms = objective.forward_train(x, y, BatchContext(indices, epoch))
        e_inter, e_intra = ref.dist_terms(s, table[epoch, indices], 2.0)
        assert terms["inter"].item() == pytest.approx(e_inter, rel=1e-4, abs=1e-6)
        assert terms["intra"].item() == pytest.approx(e_intra, rel=1e-4, abs=1e-6)


def test_gradient_reaches_the_student_and_never_the_teacher():
    torch.manual_seed(0)
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16])
    teacher = models.build("resnet18", 1, 4, 8, width=8)
    objective = build_method("dist", student, teacher, temperature=4.0).train()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    _, terms = objective.forward_train(x, y, BatchContext(torch.arange(6), 0))
    (terms["inter"] + terms["intra"]).backward()  # the relation terms alone reach the student
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert {id(p) for p in objective.trainable_parameters()} == {id(p) for p in student.parameters()}
