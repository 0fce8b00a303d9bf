"""kdpipe.distill.multi_teacher: KD towards the average of several teachers' softened outputs;
extra teachers are kdpipe model files, fed the batch in their own normalisation and size."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kdpipe import models
from kdpipe.distill import METHODS, BatchContext, FrozenTeacher, OnlineTeacher
from kdpipe.distill.losses import soft_kl
from kdpipe.distill.multi_teacher import (MultiTeacherKD, MultiTeacherSettings, ensemble_log_probs,
                                          load_extra_teachers, multi_teacher, soft_kl_log_target)
from kdpipe.errors import KdpipeError
from kdpipe.validation import derived_fields
from tests import kd_reference as ref
from tests.conftest import build_method

T = torch.tensor([[1.0, 1.5, -0.5, 0.2], [2.0, -1.0, 0.0, 0.5], [0.0, 2.0, 2.5, -1.0]])
Y = torch.tensor([0, 3, 2])
BATCH = BatchContext(indices=torch.arange(3), epoch=0)
META = {"class_names": ["a", "b", "c", "d"], "channels": 1, "image_size": 8, "mean": [0.3], "std": [0.3]}


def test_multi_teacher_is_registered_with_the_shared_values_it_reads():
    plugin = METHODS.get("multi_teacher")
    assert plugin.factory is multi_teacher and plugin.settings is MultiTeacherSettings
    assert set(derived_fields(MultiTeacherSettings)) == {"temperature", "alpha", "teacher_targets", "teacher_flip"}


# ---- the losses -------------------------------------------------------------------------------


def test_ensemble_target_is_the_average_of_softened_outputs():
    t2 = T.flip(1)
    got = ensemble_log_probs([T, t2], 3.0).exp()
    expected = torch.tensor([[(a + b) / 2 for a, b in zip(ref.probs(r1, 3.0), ref.probs(r2, 3.0))]
                             for r1, r2 in zip(T.tolist(), t2.tolist())])
    assert torch.allclose(got, expected, atol=1e-6)
    # one teacher, or K identical teachers: plain Hinton KD
    assert torch.allclose(ensemble_log_probs([T, T, T], 2.0), F.log_softmax(T / 2.0, 1), atol=1e-6)
    assert ensemble_log_probs([T.bfloat16()], 2.0).dtype == torch.float32


def test_soft_kl_log_target_is_soft_kl_against_given_log_probabilities():
    s = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for temperature in (1.0, 4.0):
        target = F.log_softmax(T / temperature, 1)
        assert soft_kl_log_target(s, target, temperature).item() == pytest.approx(
            ref.soft_kl(s, T, temperature), rel=1e-5)
        assert soft_kl_log_target(s, target, temperature).item() == pytest.approx(
            soft_kl(s, T, temperature).item(), rel=1e-6)


# ---- the objective ----------------------------------------------------------------------------


def test_objective_loss_and_limits():
    torch.manual_seed(0)
    student = models.build("student_cnn", 1, 4, 8, widths=[8])
    t1 = models.build("student_cnn", 1, 4, 8, widths=[8]).eval()
    t2 = models.build("student_cnn", 1, 4, 8, widths=[12]).eval()
    x = torch.randn(3, 1, 8, 8)
    obj = MultiTeacherKD(student, OnlineTeacher(t1), [t2], temperature=4.0, alpha=0.9).eval()
    logits, terms = obj.forward_train(x, Y, BATCH)
    with torch.no_grad():
        z1, z2 = t1(x), t2(x)
    assert terms["kd"].item() == pytest.approx(0.9 * ref.ensemble_kl(logits.detach(), [z1, z2], 4.0), rel=1e-4)
    assert terms["ce"].item() == pytest.approx(0.1 * F.cross_entropy(logits, Y).item(), rel=1e-5)
    for alpha in (0.0, 1.0):
        _, t = MultiTeacherKD(student, OnlineTeacher(t1), [t2], 4.0, alpha).eval().forward_train(x, Y, BATCH)
        assert t["ce" if alpha == 1.0 else "kd"].item() == 0.0
    same = MultiTeacherKD(student, OnlineTeacher(copy.deepcopy(student)), [copy.deepcopy(student)], 4.0, 0.9).eval()
    assert same.forward_train(x, Y, BATCH)[1]["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_objective_without_the_pipeline_teacher_uses_the_extra_ones_and_freezes_them():
    student = models.build("student_cnn", 1, 4, 8, widths=[8])
    extra = models.build("student_cnn", 1, 4, 8, widths=[12]).train()
    obj = MultiTeacherKD(student, None, [extra], 2.0, 1.0)
    obj.train()
    assert isinstance(obj.extra[0], FrozenTeacher) and not extra.training
    assert not any(p.requires_grad for p in extra.parameters())
    x = torch.randn(3, 1, 8, 8)
    logits, terms = obj.eval().forward_train(x, Y, BATCH)
    with torch.no_grad():
        z = extra(x)
    assert terms["kd"].item() == pytest.approx(ref.soft_kl(logits.detach(), z, 2.0), rel=1e-5)
    with pytest.raises(KdpipeError, match="at least one teacher"):
        MultiTeacherKD(student, None, [], 2.0, 0.5)


def test_with_teacher_flip_the_extra_teachers_are_averaged_with_their_mirror_images_too():
    student = models.build("student_cnn", 1, 4, 8, widths=[8])
    extra = models.build("student_cnn", 1, 4, 8, widths=[12]).eval()
    x = torch.randn(3, 1, 8, 8)
    flipped = MultiTeacherKD(student, None, [extra], 2.0, 1.0, flip=True)
    with torch.no_grad():
        expected = (extra(x) + extra(x.flip(3))) / 2
    [got] = flipped.teacher_logits(x, BATCH)
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, extra(x).detach(), atol=1e-4)
    [plain] = MultiTeacherKD(student, None, [extra], 2.0, 1.0).teacher_logits(x, BATCH)
    assert torch.equal(plain, extra(x).detach())


# ---- extra teachers from model files ----------------------------------------------------------


def _save(path, model, arch, arch_params, meta):
    path.parent.mkdir(parents=True, exist_ok=True)
    models.save(path, model, arch, arch_params, meta)
    return str(path)


def test_extra_teachers_see_the_batch_in_their_own_normalisation_and_size(tmp_path):
    """A teacher trained on 16×16 images normalised with mean 0.5 / std 0.25 gets this data
    set's 8×8 batch (mean 0.3 / std 0.3) re-normalised and resized to what it expects."""
    torch.manual_seed(0)
    teacher = models.build("student_cnn", 1, 4, 16, widths=[8, 8]).eval()
    own = {**META, "image_size": 16, "mean": [0.5], "std": [0.25]}
    path = _save(tmp_path / "t.pt", teacher, "student_cnn", {"widths": [8, 8], "dropout": 0.2}, own)
    (loaded,) = load_extra_teachers([path], META)
    raw = torch.rand(2, 1, 8, 8)  # pixels in 0..1
    with torch.no_grad():
        got = loaded((raw - 0.3) / 0.3)
        resized = F.interpolate((raw - 0.5) / 0.25, size=(16, 16), mode="bilinear", align_corners=False)
        expected = teacher(resized)
    assert torch.allclose(got, expected, atol=1e-5)


def test_extra_teachers_must_predict_the_same_classes_from_the_same_channels(tmp_path):
    model = models.build("student_cnn", 1, 3, 8, widths=[8]).eval()
    other_classes = _save(tmp_path / "classes.pt", model, "student_cnn", {"widths": [8]},
                          {**META, "class_names": ["x", "y", "z"]})
    with pytest.raises(KdpipeError, match="predicts classes"):
        load_extra_teachers([other_classes], META)
    rgb = models.build("student_cnn", 3, 4, 8, widths=[8]).eval()
    other_channels = _save(tmp_path / "rgb.pt", rgb, "student_cnn", {"widths": [8]},
                           {**META, "channels": 3, "mean": [0.3] * 3, "std": [0.3] * 3})
    with pytest.raises(KdpipeError, match="3-channel images"):
        load_extra_teachers([other_channels], META)


def test_factory_builds_the_ensemble_from_kd_multi_teacher_teachers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    extra = models.build("student_cnn", 1, 4, 8, widths=[12]).eval()
    _save(tmp_path / "teachers/ensemble/e.pt", extra, "student_cnn", {"widths": [12], "dropout": 0.2}, META)
    student = models.build("student_cnn", 1, 4, 8, widths=[8])
    teacher = models.build("student_cnn", 1, 4, 8, widths=[16]).eval()
    obj = build_method("multi_teacher", student, teacher, meta=META, temperature=3.0, alpha=0.8,
                       multi_teacher={"teachers": ["teachers/ensemble/e.pt"]}).eval()
    assert len(obj.extra) == 1
    x = torch.randn(3, 1, 8, 8)
    logits, terms = obj.forward_train(x, Y, BATCH)
    with torch.no_grad():
        z1, z2 = teacher(x), extra(x)
    assert terms["kd"].item() == pytest.approx(0.8 * ref.ensemble_kl(logits.detach(), [z1, z2], 3.0), rel=1e-4)
