"""kdpipe.distill.attention: attention transfer = CE on the labels + β/2 · Σ AT over the
stage pairs, with the live teacher's feature maps (its logits are not read)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdpipe import models
from kdpipe.distill import METHODS, BatchContext, CachedTeacher
from kdpipe.distill.attention import AttentionSettings, AttentionTransfer
from kdpipe.errors import KdpipeError
from kdpipe.models import FeatureTap
from kdpipe.validation import derived_fields
from tests import kd_reference as ref
from tests.conftest import build_method, method_settings

Y = torch.tensor([0, 3, 2])
BATCH = BatchContext(indices=torch.arange(3), epoch=0)


def test_attention_reads_no_shared_kd_value_and_needs_the_live_teacher():
    plugin = METHODS.get("attention")
    assert plugin.factory is AttentionTransfer and plugin.settings is AttentionSettings
    assert derived_fields(AttentionSettings) == ()
    assert plugin.info["needs_teacher_module"] is True
    assert method_settings("attention", temperature=1.5, alpha=0.2) == method_settings("attention")


def test_objective_terms_and_beta():
    torch.manual_seed(0)
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32])
    teacher = models.build("resnet18", 1, 4, 8).eval()
    x = torch.randn(3, 1, 8, 8)
    obj = build_method("attention", student, teacher, attention={"beta": 1000.0, "p": 2}).eval()
    logits, terms = obj.forward_train(x, Y, BATCH)
    assert set(terms) == {"ce", "at"}
    with models.FeatureTap(student, ["blocks.0", "blocks.1", "blocks.2"]) as ts, \
            FeatureTap(teacher, ["layer2", "layer3", "layer4"]) as tt:
        student(x), teacher(x)
    expected = 500.0 * sum(ref.attention_transfer(a, b) for a, b in zip(ts.features, tt.features))
    assert terms["at"].item() == pytest.approx(expected, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, Y).item(), rel=1e-6)
    zero = build_method("attention", student, teacher, attention={"beta": 0.0}).eval()
    assert zero.forward_train(x, Y, BATCH)[1]["at"].item() == 0.0
    same = build_method("attention", student, copy.deepcopy(student), attention={"beta": 1000.0}).eval()
    assert same.forward_train(x, Y, BATCH)[1]["at"].item() == pytest.approx(0.0, abs=1e-6)


def test_p_changes_the_attention_maps():
    torch.manual_seed(1)
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32]).eval()
    teacher = models.build("resnet18", 1, 4, 8, width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    with FeatureTap(student, ["blocks.0", "blocks.1", "blocks.2"]) as ts, \
            FeatureTap(teacher, ["layer2", "layer3", "layer4"]) as tt:
        student(x), teacher(x)
    obj = build_method("attention", student, teacher, attention={"beta": 2.0, "p": 1}).eval()
    expected = sum(ref.attention_transfer(a, b, 1) for a, b in zip(ts.features, tt.features))
    assert obj.forward_train(x, Y, BATCH)[1]["at"].item() == pytest.approx(expected, rel=1e-4)


def test_label_smoothing_of_the_student_recipe_is_applied():
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16]).eval()
    teacher = models.build("student_cnn", 1, 4, 8, widths=[8, 16]).eval()
    x = torch.randn(3, 1, 8, 8)
    logits, terms = build_method("attention", student, teacher, label_smoothing=0.2).eval().forward_train(x, Y, BATCH)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, Y, label_smoothing=0.2).item(), rel=1e-6)


def test_precomputed_logits_alone_are_refused():
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16])
    with pytest.raises(KdpipeError, match="'attention' reads the teacher's feature maps"):
        build_method("attention", student, CachedTeacher(torch.zeros(1, 3, 4)))
