"""kdpipe.models.adapt: the exact per-channel affine map from one normalisation to another, and
the input adapter (channel repeat, affine map, resize) in front of a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdpipe.models.adapt import InputAdapter, renormalize_affine


def test_renormalize_affine_maps_one_normalisation_onto_the_other():
    mean_a, std_a, mean_b, std_b = [0.3, 0.5], [0.2, 0.4], [0.485, 0.456], [0.229, 0.224]
    scale, shift = renormalize_affine(mean_a, std_a, mean_b, std_b)
    raw = torch.rand(100, 2)
    a = (raw - torch.tensor(mean_a)) / torch.tensor(std_a)
    b = (raw - torch.tensor(mean_b)) / torch.tensor(std_b)
    assert torch.allclose(a * scale + shift, b, atol=1e-6)
    # hand values: scale = std_a / std_b, shift = (mean_a - mean_b) / std_b
    assert scale.tolist() == pytest.approx([0.2 / 0.229, 0.4 / 0.224], rel=1e-6)
    assert shift.tolist() == pytest.approx([(0.3 - 0.485) / 0.229, (0.5 - 0.456) / 0.224], rel=1e-6)
    same = renormalize_affine(mean_a, std_a, mean_a, std_a)
    assert torch.equal(same[0], torch.ones(2)) and torch.equal(same[1], torch.zeros(2))


def test_adapter_applies_the_affine_map_and_keeps_the_size():
    adapter = InputAdapter(torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0]), size=8)
    x = torch.randn(3, 2, 8, 8)
    expected = x * torch.tensor([2.0, 0.5]).view(1, 2, 1, 1) + torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    assert torch.equal(adapter(x), expected)
    assert InputAdapter(torch.ones(2), torch.zeros(2), size=None)(x).shape == x.shape
    assert adapter.state_dict() == {}  # not saved: model files stay loadable across versions


def test_adapter_resizes_bilinearly_with_antialiasing_only_when_shrinking():
    adapter = InputAdapter(torch.ones(1), torch.zeros(1), size=16)
    small, large = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 32, 32)
    assert torch.equal(adapter(small), F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False))
    assert torch.equal(adapter(large), F.interpolate(large, size=(16, 16), mode="bilinear", align_corners=False,
                                                     antialias=True))
    # antialiasing matters when shrinking: a pixel-level checkerboard averages out
    board = (torch.arange(32).view(1, 32) + torch.arange(32).view(32, 1)) % 2
    out = adapter(board.float().view(1, 1, 32, 32))
    assert out.std().item() < 0.05 and out.mean().item() == pytest.approx(0.5, abs=0.01)


def test_adapter_repeats_one_channel_to_rgb_before_the_affine_map():
    scale, shift = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.1, 0.2])
    adapter = InputAdapter(scale, shift, size=None, repeat_to=3)
    x = torch.randn(2, 1, 4, 4)
    out = adapter(x)
    assert out.shape == (2, 3, 4, 4)
    for c in range(3):
        assert torch.equal(out[:, c], x[:, 0] * scale[c] + shift[c])
    rgb = torch.randn(2, 3, 4, 4)  # a 3-channel input is not repeated
    assert torch.equal(adapter(rgb), rgb * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1))


def test_adapter_keeps_the_input_dtype_and_runs_under_cpu_bf16_autocast():
    adapter = InputAdapter(torch.tensor([2.0]), torch.tensor([1.0]), size=16)
    assert adapter(torch.randn(1, 1, 8, 8).bfloat16()).dtype == torch.bfloat16
    shrink = InputAdapter(torch.tensor([2.0]), torch.tensor([1.0]), size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # how a bf16 teacher runs it: float32 images in
        assert shrink(torch.randn(1, 1, 8, 8)).dtype == torch.float32
