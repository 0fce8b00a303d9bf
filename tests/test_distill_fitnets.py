"""kdpipe.distill.fitnets: the hint (MSE of the regressed student map against the teacher's,
resized) and the objective's regressor between the paired middle stages."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdpipe import models
from kdpipe.distill import METHODS, BatchContext, CachedTeacher
from kdpipe.distill.fitnets import FitNets, FitnetsSettings, hint_loss
from kdpipe.errors import KdpipeError
from kdpipe.models import FeatureTap
from kdpipe.validation import derived_fields
from tests.conftest import build_method

Y = torch.tensor([0, 3, 2])
BATCH = BatchContext(indices=torch.arange(3), epoch=0)


def test_fitnets_reads_no_shared_kd_value_and_needs_the_live_teacher():
    plugin = METHODS.get("fitnets")
    assert plugin.factory is FitNets and plugin.settings is FitnetsSettings
    assert derived_fields(FitnetsSettings) == ()
    assert plugin.info["needs_teacher_module"] is True


def test_hint_loss_matches_explicit_mse_with_resize():
    gen = torch.Generator().manual_seed(2)
    r, ft = torch.randn(2, 3, 2, 2, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    pooled = F.avg_pool2d(ft, 2)
    expected = sum((r[i, c, y, x] - pooled[i, c, y, x]).item() ** 2
                   for i in range(2) for c in range(3) for y in range(2) for x in range(2)) / 24
    assert hint_loss(r, ft).item() == pytest.approx(expected, rel=1e-5)
    assert hint_loss(ft, ft).item() == 0.0
    assert hint_loss(r.bfloat16(), ft.bfloat16()).dtype == torch.float32


def test_regressor_maps_the_middle_student_stage_to_its_teacher_stage():
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32])
    teacher = models.build("resnet18", 1, 4, 8).eval()
    obj = build_method("fitnets", student, teacher, input_shape=(1, 8, 8), fitnets={"beta": 100.0})
    assert (obj.student_layer, obj.teacher_layer) == ("blocks.1", "layer3")
    conv = obj.regressor[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (16, 256, (1, 1))
    assert {id(p) for p in obj.regressor.parameters()} <= {id(p) for p in obj.trainable_parameters()}


def test_hint_term_is_beta_times_the_hint_of_the_regressed_map():
    torch.manual_seed(0)
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32])
    teacher = models.build("resnet18", 1, 4, 8, width=8).eval()
    obj = build_method("fitnets", student, teacher, fitnets={"beta": 7.0}).eval()
    x = torch.randn(3, 1, 8, 8)
    logits, terms = obj.forward_train(x, Y, BATCH)
    assert set(terms) == {"ce", "hint"}
    with torch.no_grad(), FeatureTap(student, ["blocks.1"]) as ts, FeatureTap(teacher, ["layer3"]) as tt:
        student(x), teacher(x)
        regressed = obj.regressor(ts.features[0])
    assert terms["hint"].item() == pytest.approx(7.0 * F.mse_loss(regressed, tt.features[0]).item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, Y).item(), rel=1e-6)


def test_the_student_as_teacher_with_an_identity_regressor_gives_zero_hint():
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32])
    twin = build_method("fitnets", student, copy.deepcopy(student), fitnets={"beta": 100.0}).eval()
    with torch.no_grad():
        twin.regressor[0].weight.copy_(torch.eye(16).view(16, 16, 1, 1))
    _, terms = twin.forward_train(torch.randn(3, 1, 8, 8), Y, BATCH)
    assert terms["hint"].item() == pytest.approx(0.0, abs=1e-6)


def test_precomputed_logits_alone_are_refused():
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32])
    with pytest.raises(KdpipeError, match="'fitnets' reads the teacher's feature maps"):
        build_method("fitnets", student, CachedTeacher(torch.zeros(1, 3, 4)))
