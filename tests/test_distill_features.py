"""kdpipe.distill.features: which student stage learns from which teacher stage, running a
model with feature taps, probing channel counts, and the attention-transfer term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdpipe import models
from kdpipe.distill import FrozenTeacher
from kdpipe.distill.features import (AttentionTerms, attention_map, attention_transfer_loss, forward_with_features,
                                     pair_stages, probe_channels)
from kdpipe.errors import KdpipeError
from kdpipe.models import FeatureTap
from tests import kd_reference as ref

Y = torch.tensor([0, 3, 2])
ARCHS = {"resnet18": {"width": 16}, "vea_resnet18": {"width": 16}, "mobilenet_v2": {"input_size": 32},
         "student_cnn": {"widths": [16, 32, 64]}, "fast_cnn": {"widths": [16, 32, 64], "stem_width": 8}}


# ---- pair_stages ------------------------------------------------------------------------------


def test_stage_pairing():
    assert pair_stages(["s0", "s1", "s2"], ["t1", "t2", "t3", "t4"]) == [("s0", "t2"), ("s1", "t3"), ("s2", "t4")]
    assert pair_stages(["s0", "s1"], ["t1", "t2"]) == [("s0", "t1"), ("s1", "t2")]
    # more student stages than teacher stages: spread evenly, first to first and last to last
    assert [t for _, t in pair_stages(list("abcde"), ["t1", "t2", "t3"])] == ["t1", "t1", "t2", "t3", "t3"]
    with pytest.raises(KdpipeError, match="feature_names"):
        pair_stages([], ["t1"])


@pytest.mark.parametrize("widths", [[16, 32, 64], [32, 64, 128], [48, 96, 256]])
def test_seed_student_family_pairs_with_every_teacher_at_the_same_resolution(widths):
    """On 32×32 images each student stage meets a ResNet stage of its own spatial size."""
    student = models.build("student_cnn", 3, 10, 32, widths=widths).eval()
    x = torch.randn(1, 3, 32, 32)
    for arch in ("resnet18", "vea_resnet18", "mobilenet_v2"):
        teacher = models.build(arch, 3, 10, 32, **ARCHS[arch]).eval()
        pairs = pair_stages(student.feature_names, teacher.feature_names)
        assert [s for s, _ in pairs] == list(student.feature_names)
        if arch != "mobilenet_v2":  # MobileNetV2 runs at its own input size; its maps are resized
            with torch.no_grad():
                _, fs = forward_with_features(student, x, [s for s, _ in pairs])
                _, ft = forward_with_features(teacher, x, [t for _, t in pairs])
            assert [f.shape[-2:] for f in fs] == [f.shape[-2:] for f in ft]


# ---- forward_with_features / probe_channels ---------------------------------------------------


def test_forward_with_features_returns_the_logits_and_the_named_maps_in_order():
    model = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32]).eval()
    x = torch.randn(2, 1, 8, 8)
    logits, feats = forward_with_features(model, x, ["blocks.2", "blocks.0"])
    with torch.no_grad(), FeatureTap(model, ["blocks.2", "blocks.0"]) as tap:
        expected = model(x)
    assert torch.equal(logits, expected)
    assert [f.shape[1] for f in feats] == [32, 8]
    assert all(torch.equal(a, b) for a, b in zip(feats, tap.features))
    assert logits.requires_grad  # a trainable model keeps its graph


def test_forward_with_features_taps_a_frozen_teacher_without_gradients():
    teacher = FrozenTeacher(models.build("resnet18", 1, 4, 8, width=8))
    logits, (f,) = forward_with_features(teacher, torch.randn(2, 1, 8, 8), ["layer3"])
    assert f.shape == (2, 32, 2, 2)
    assert not logits.requires_grad and not f.requires_grad
    assert not any(m._forward_hooks for m in teacher.modules())  # hooks removed


@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32)])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_probe_channels_matches_a_real_forward_and_touches_nothing(arch, channels, size):
    model = models.build(arch, channels, 10, size, **ARCHS[arch]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), FeatureTap(model, model.feature_names) as tap:
        model.eval()(torch.randn(2, channels, size, size))
    model.train()
    assert probe_channels(model, model.feature_names, (channels, size, size)) == [f.shape[1] for f in tap.features]
    assert model.training  # the mode is restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched


# ---- attention transfer -----------------------------------------------------------------------


def test_attention_map_is_the_channel_mean_of_abs_power():
    f = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # N=1, C=2, 1×2
    assert attention_map(f, 2).tolist() == [[[5.0, 2.0]]]  # (1 + 9)/2, (4 + 0)/2
    assert attention_map(f, 1).tolist() == [[[2.0, 1.0]]]
    assert attention_map(f.bfloat16()).dtype == torch.float32


def test_attention_loss_hand_computed_value():
    fs = torch.tensor([[[[1.0, 0.0]]]])  # one channel, a 1×2 map: q_s = [1, 0]
    ft = torch.tensor([[[[0.0, 3.0]]]])  # q_t = [0, 1]
    assert attention_transfer_loss(fs, ft).item() == pytest.approx(1.0)  # ((1-0)² + (0-1)²) / 2


def test_attention_loss_matches_loops_and_handles_channels_and_p():
    gen = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 3, 3, 3, generator=gen), torch.randn(2, 5, 3, 3, generator=gen)
    for p in (1, 2, 3):
        assert attention_transfer_loss(fs, ft, p).item() == pytest.approx(ref.attention_transfer(fs, ft, p), rel=1e-5)
    assert attention_transfer_loss(fs, fs * 7).item() == pytest.approx(0.0, abs=1e-7)  # scale-free


def test_attention_loss_resizes_the_teacher_map_by_area():
    gen = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(2, 3, 2, 2, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    a_t = ft.pow(2).mean(1)
    pooled = torch.stack([torch.stack([a_t[:, 2 * y:2 * y + 2, 2 * x:2 * x + 2].mean((1, 2)) for x in range(2)], 1)
                          for y in range(2)], 1)  # explicit 2×2 block means
    # a 1-channel teacher feature whose squared map is the pooled map
    expected = ref.attention_transfer(fs, pooled.sqrt().unsqueeze(1))
    assert attention_transfer_loss(fs, ft).item() == pytest.approx(expected, rel=1e-5)
    # enlarging works too (student larger than teacher): bilinear
    up = F.interpolate(fs.pow(2).mean(1, keepdim=True), size=(4, 4), mode="bilinear", align_corners=False)
    assert attention_transfer_loss(ft, fs).item() == pytest.approx(ref.attention_transfer(ft, up.sqrt()), rel=1e-5)


def test_attention_terms_sum_every_stage_pair_times_half_beta():
    torch.manual_seed(0)
    student = models.build("student_cnn", 1, 4, 8, widths=[8, 16, 32]).eval()
    teacher = models.build("resnet18", 1, 4, 8, width=8).eval()
    terms = AttentionTerms(student, FrozenTeacher(teacher), beta=1000.0, p=2)
    assert terms.pairs == [("blocks.0", "layer2"), ("blocks.1", "layer3"), ("blocks.2", "layer4")]
    x = torch.randn(3, 1, 8, 8)
    logits, t_logits, at = terms(student, x)
    with torch.no_grad(), FeatureTap(student, ["blocks.0", "blocks.1", "blocks.2"]) as ts, \
            FeatureTap(teacher, ["layer2", "layer3", "layer4"]) as tt:
        s_out, t_out = student(x), teacher(x)
    assert torch.equal(logits, s_out) and torch.equal(t_logits, t_out)
    expected = 500.0 * sum(ref.attention_transfer(a, b) for a, b in zip(ts.features, tt.features))
    assert at.item() == pytest.approx(expected, rel=1e-4)
