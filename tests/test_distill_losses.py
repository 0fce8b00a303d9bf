"""kdpipe.distill.losses, the losses every method may use, against values computed
independently (by hand, or in float64 plain Python: tests/kd_reference.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdpipe.distill.losses import label_ce, resize_map, soft_kl, standardize
from tests import kd_reference as ref

S = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, -0.4], [-1.0, 3.0, 0.5, 1.0]])
T = torch.tensor([[1.0, 1.5, -0.5, 0.2], [2.0, -1.0, 0.0, 0.5], [0.0, 2.0, 2.5, -1.0]])


# ---- soft_kl ----------------------------------------------------------------------------------


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
    assert soft_kl(s, t, temperature).item() == pytest.approx(ref.soft_kl(s, t, temperature), rel=1e-5)
    # and on a fixed small table
    assert soft_kl(S, T, temperature).item() == pytest.approx(ref.soft_kl(S, T, temperature), rel=1e-5)


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
    assert out.item() == pytest.approx(ref.soft_kl(s.bfloat16().float(), t.bfloat16().float(), 3.0), rel=1e-5)


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


# ---- label_ce ---------------------------------------------------------------------------------


def test_label_ce_hand_computed_value_and_label_smoothing():
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p = [3/4, 1/4]
    labels = torch.tensor([0])
    assert label_ce(logits, labels).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    # smoothing ε: the target is (1 − ε)·one_hot + ε/K
    eps = 0.2
    expected = -((1 - eps + eps / 2) * math.log(0.75) + (eps / 2) * math.log(0.25))
    assert label_ce(logits, labels, eps).item() == pytest.approx(expected, rel=1e-6)


def test_label_ce_is_computed_in_float32_for_low_precision_logits():
    logits, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    out = label_ce(logits.bfloat16(), labels, 0.1)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(F.cross_entropy(logits.bfloat16().float(), labels, label_smoothing=0.1).item(),
                                       rel=1e-6)


# ---- standardize ------------------------------------------------------------------------------


def test_standardize_hand_computed_value():
    # [1, 2, 3, 6]: mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    out = standardize(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))
    sd = math.sqrt(3.5)
    assert out.flatten().tolist() == pytest.approx([-2 / sd, -1 / sd, 0.0, 3 / sd], rel=1e-6)


def test_standardize_gives_zero_mean_and_unit_population_std_per_row():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 10, generator=gen) * 5 + 3
    out = standardize(z)
    assert out.shape == z.shape and out.dtype == torch.float32
    assert torch.allclose(out.mean(1), torch.zeros(6), atol=1e-6)
    assert torch.allclose(out.std(1, correction=0), torch.ones(6), atol=1e-5)
    expected = [ref.standardize(row) for row in z.double().tolist()]
    assert out.tolist() == [pytest.approx(row, rel=1e-5, abs=1e-6) for row in expected]


def test_standardize_is_invariant_to_shift_and_positive_scale_of_each_row():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, generator=gen)
    shift = torch.randn(5, 1, generator=gen) * 10
    scale = torch.rand(5, 1, generator=gen) * 20 + 0.1
    assert torch.allclose(standardize(z * scale + shift), standardize(z), atol=1e-5)
    assert torch.allclose(standardize(-z), -standardize(z), atol=1e-6)  # a negative scale flips the sign
    # so a loss on standardised logits no longer sees the logits' scale: that is what the option is for
    assert soft_kl(standardize(3 * z + 1), standardize(z), 2.0).item() == pytest.approx(0.0, abs=1e-5)


def test_standardize_keeps_equal_logits_finite_and_low_precision_in_float32():
    assert torch.equal(standardize(torch.full((2, 4), 3.0)), torch.zeros(2, 4))
    z = torch.randn(3, 6)
    out = standardize(z.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, standardize(z.bfloat16().float()))


# ---- resize_map -------------------------------------------------------------------------------


def test_resize_map_is_a_no_op_at_the_same_size():
    x = torch.randn(2, 3, 4, 5)
    assert resize_map(x, (4, 5)) is x


def test_resize_map_shrinks_by_area_averaging():
    x = torch.arange(2 * 16, dtype=torch.float32).view(1, 2, 4, 4)
    out = resize_map(x, (2, 2))
    expected = torch.tensor([[[x[0, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean().item() for j in range(2)]
                              for i in range(2)] for c in range(2)]).unsqueeze(0)
    assert torch.allclose(out, expected)
    # uneven: 3×3 → 1×1 is the mean of all nine cells
    y = torch.randn(1, 1, 3, 3)
    assert resize_map(y, (1, 1)).item() == pytest.approx(y.mean().item(), rel=1e-6)


def test_resize_map_enlarges_bilinearly():
    x = torch.tensor([[[[0.0, 4.0]]]])  # 1×2 → 1×4, half-pixel centres: 0, 1, 3, 4
    out = resize_map(x, (1, 4))
    assert out.flatten().tolist() == pytest.approx([0.0, 1.0, 3.0, 4.0])
    assert torch.equal(out, F.interpolate(x, size=(1, 4), mode="bilinear", align_corners=False))
