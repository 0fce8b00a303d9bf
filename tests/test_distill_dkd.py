"""kdpipe.distill.dkd: decoupled KD's TCKD / NCKD against explicit target / non-target
probabilities, the decomposition of Hinton's KD, the warm-up and the objective's weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdpipe import models
from kdpipe.distill import METHODS, BatchContext
from kdpipe.distill.dkd import DKD, DkdSettings, dkd_terms, warmup_factor
from kdpipe.distill.losses import soft_kl
from kdpipe.validation import derived_fields
from tests import kd_reference as ref
from tests.conftest import build_method, method_settings

S = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, -0.4], [-1.0, 3.0, 0.5, 1.0]])
T = torch.tensor([[1.0, 1.5, -0.5, 0.2], [2.0, -1.0, 0.0, 0.5], [0.0, 2.0, 2.5, -1.0]])
Y = torch.tensor([0, 3, 2])
BATCH = BatchContext(indices=torch.arange(3), epoch=0)


@pytest.mark.parametrize("t", [1.0, 4.0, 50.0])
def test_dkd_terms_match_explicit_probabilities(t):
    tckd, nckd = dkd_terms(S, T, Y, t)
    e_tckd, e_nckd = ref.dkd_terms(S.tolist(), T.tolist(), Y.tolist(), t)
    assert tckd.item() == pytest.approx(e_tckd, rel=2e-3, abs=1e-7)
    assert nckd.item() == pytest.approx(e_nckd, rel=2e-3, abs=1e-7)


def test_dkd_terms_decompose_kd():
    # Zhao et al. eq. (4): KD = TCKD + (1 - p_t^T) · NCKD, per sample
    t = 2.0
    for i in range(3):
        tckd, nckd = dkd_terms(S[i:i + 1], T[i:i + 1], Y[i:i + 1], t)
        p_target = torch.softmax(T[i] / t, 0)[Y[i]].item()
        assert soft_kl(S[i:i + 1], T[i:i + 1], t).item() == pytest.approx(
            tckd.item() + (1 - p_target) * nckd.item(), rel=1e-4)


def test_dkd_terms_stay_finite_for_confident_logits_and_vanish_for_identical_ones():
    assert torch.isfinite(torch.stack(list(dkd_terms(S * 100, T * 100, Y, 1.0)))).all()
    tckd, nckd = dkd_terms(S, S.clone(), Y, 4.0)
    assert tckd.item() == pytest.approx(0.0, abs=1e-6) and nckd.item() == pytest.approx(0.0, abs=1e-6)


def test_warmup_factor_is_linear_in_the_zero_based_epoch():
    assert [warmup_factor(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_dkd_reads_its_own_alpha_not_kd_alpha():
    plugin = METHODS.get("dkd")
    assert plugin.factory is DKD and plugin.settings is DkdSettings
    assert set(derived_fields(DkdSettings)) == {"temperature", "teacher_targets", "teacher_flip"}
    settings = method_settings("dkd", alpha=0.1, temperature=3.0, dkd={"alpha": 2.0, "beta": 8.0, "warmup_epochs": 0})
    assert (settings.alpha, settings.beta, settings.warmup_epochs, settings.temperature) == (2.0, 8.0, 0, 3.0)
    assert settings.logit_standardization is False


def _dkd(student, teacher, **dkd):
    return build_method("dkd", student, teacher, temperature=4.0, dkd=dkd).eval()


def test_objective_terms_are_ce_plus_weighted_tckd_and_nckd():
    torch.manual_seed(0)
    student = models.build("student_cnn", 1, 4, 8, widths=[8])
    teacher = models.build("student_cnn", 1, 4, 8, widths=[8]).eval()
    x = torch.randn(3, 1, 8, 8)
    logits, terms = _dkd(student, teacher, alpha=0.5, beta=8.0, warmup_epochs=0).forward_train(x, Y, BATCH)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    tckd, nckd = ref.dkd_terms(s.tolist(), t.tolist(), Y.tolist(), 4.0)
    assert set(terms) == {"ce", "tckd", "nckd"}
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, Y).item(), rel=1e-5)
    assert terms["tckd"].item() == pytest.approx(0.5 * tckd, rel=2e-3, abs=1e-7)
    assert terms["nckd"].item() == pytest.approx(8.0 * nckd, rel=2e-3, abs=1e-7)
    for a, b in ((0.0, 8.0), (1.0, 0.0)):
        _, terms = _dkd(student, teacher, alpha=a, beta=b, warmup_epochs=0).forward_train(x, Y, BATCH)
        assert (terms["tckd"].item() == 0.0) == (a == 0.0)
        assert (terms["nckd"].item() == 0.0) == (b == 0.0)


def test_logit_standardization_takes_tckd_and_nckd_between_standardized_logits():
    torch.manual_seed(0)
    student = models.build("student_cnn", 1, 4, 8, widths=[8])
    teacher = models.build("student_cnn", 1, 4, 8, widths=[8]).eval()
    x = torch.randn(3, 1, 8, 8)
    objective = _dkd(student, teacher, alpha=0.5, beta=8.0, warmup_epochs=0, logit_standardization=True)
    logits, terms = objective.forward_train(x, Y, BATCH)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    assert torch.equal(logits, s)
    tckd, nckd = ref.dkd_terms(ref.standardize_rows(s).tolist(), ref.standardize_rows(t).tolist(), Y.tolist(), 4.0)
    assert terms["tckd"].item() == pytest.approx(0.5 * tckd, rel=2e-3, abs=1e-7)
    assert terms["nckd"].item() == pytest.approx(8.0 * nckd, rel=2e-3, abs=1e-7)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, Y).item(), rel=1e-5)  # on the raw logits
    plain_tckd, plain_nckd = ref.dkd_terms(s.tolist(), t.tolist(), Y.tolist(), 4.0)
    assert (terms["tckd"].item(), terms["nckd"].item()) != pytest.approx((0.5 * plain_tckd, 8.0 * plain_nckd),
                                                                          rel=1e-2)


def test_objective_warms_the_dkd_terms_up_by_epoch():
    student = models.build("student_cnn", 1, 4, 8, widths=[8])
    teacher = models.build("student_cnn", 1, 4, 8, widths=[8]).eval()
    x = torch.randn(3, 1, 8, 8)
    obj = _dkd(student, teacher, alpha=1.0, beta=8.0, warmup_epochs=4)
    _, early = obj.forward_train(x, Y, BatchContext(torch.arange(3), 0))
    _, late = obj.forward_train(x, Y, BatchContext(torch.arange(3), 7))
    assert early["nckd"].item() == pytest.approx(late["nckd"].item() / 4, rel=1e-5)
    assert early["tckd"].item() == pytest.approx(late["tckd"].item() / 4, rel=1e-5)
    assert early["ce"].item() == pytest.approx(late["ce"].item(), rel=1e-6)  # the label term is not warmed up


def test_the_student_as_its_own_teacher_has_nothing_to_distil():
    student = models.build("student_cnn", 1, 4, 8, widths=[8])
    _, terms = _dkd(student, copy.deepcopy(student), warmup_epochs=0).forward_train(torch.randn(3, 1, 8, 8), Y, BATCH)
    assert terms["tckd"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["nckd"].item() == pytest.approx(0.0, abs=1e-6)
