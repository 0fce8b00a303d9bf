"""kdpipe.distill.combined: logit KD plus attention transfer, with its own kd.combined section;
its teacher logits come from the cache when there is one, else from the live pass."""

from __future__ import annotations

import pytest
import torch

from kdpipe import models
from kdpipe.distill import METHODS, BatchContext, CachedTeacher, OnlineTeacher
from kdpipe.distill.combined import CombinedKD, CombinedSettings
from kdpipe.distill.features import AttentionTerms
from kdpipe.errors import KdpipeError
from kdpipe.validation import derived_fields
from tests import kd_reference as ref
from tests.conftest import build_method, method_settings

Y = torch.tensor([0, 3, 2])
BATCH = BatchContext(indices=torch.arange(3), epoch=0)


def _pair():
    torch.manual_seed(0)
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16])
    teacher = models.build("student_cnn", 1, 4, 8, widths=[16, 32]).eval()
    return student, teacher


def test_combined_has_its_own_section_and_reads_the_logit_kd_values():
    plugin = METHODS.get("combined")
    assert plugin.factory is CombinedKD and plugin.settings is CombinedSettings
    assert plugin.info["needs_teacher_module"] is True
    assert set(derived_fields(CombinedSettings)) == {"temperature", "alpha", "teacher_targets", "teacher_flip"}
    settings = method_settings("combined", temperature=3.0, alpha=0.7, attention={"beta": 5.0}, combined={"beta": 10.0})
    assert (settings.beta, settings.p, settings.temperature, settings.alpha) == (10.0, 2, 3.0, 0.7)


def test_combined_is_logit_kd_plus_attention():
    student, teacher = _pair()
    x = torch.randn(3, 1, 8, 8)
    targets = OnlineTeacher(teacher)
    kd = {"temperature": 3.0, "alpha": 0.7}
    _, c = build_method("combined", student, targets, combined={"beta": 10.0}, **kd).eval().forward_train(x, Y, BATCH)
    _, l = build_method("logit", student, targets, **kd).eval().forward_train(x, Y, BATCH)
    _, a = build_method("attention", student, targets, attention={"beta": 10.0}).eval().forward_train(x, Y, BATCH)
    assert set(c) == {"kd", "ce", "at"}
    for k in ("kd", "ce"):
        assert c[k].item() == pytest.approx(l[k].item(), rel=1e-6)
    assert c["at"].item() == pytest.approx(a["at"].item(), rel=1e-6)


def test_cached_logits_replace_the_live_teachers_logits_but_not_its_feature_maps():
    student, teacher = _pair()
    student.eval()
    x = torch.randn(3, 1, 8, 8)
    table = torch.randn(2, 10, 4)
    indices = torch.tensor([9, 2, 4])
    cached = CachedTeacher(table, module=teacher)
    obj = build_method("combined", student, cached, temperature=2.0, alpha=0.5, combined={"beta": 10.0}).eval()
    logits, terms = obj.forward_train(x, Y, BatchContext(indices, 1))
    assert terms["kd"].item() == pytest.approx(0.5 * ref.soft_kl(logits.detach(), table[1, indices], 2.0), rel=1e-5)
    _, _, at = AttentionTerms(student, cached.module, 10.0, 2)(student, x)
    assert terms["at"].item() == pytest.approx(at.item(), rel=1e-6)


def test_precomputed_logits_alone_are_refused():
    student, _ = _pair()
    with pytest.raises(KdpipeError, match="'combined' reads the teacher's feature maps"):
        build_method("combined", student, CachedTeacher(torch.zeros(1, 3, 4)))
