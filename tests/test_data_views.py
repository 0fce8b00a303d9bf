"""Deterministic views (kdpipe.data.views): a pure function of (seed, epoch, index) that covers
the augmentation space with the expected frequencies, applied exactly like a per-image crop and
flip; mixed views (MixUp, CutMix: partner, λ, box, soft labels) are pure in the same way. The
batches built from them are tested in test_data_loader.py."""

from __future__ import annotations

import pytest
import torch

from kdpipe.data.views import (Mix, Views, apply_mix, apply_views, epoch_order, make_mix, make_views, mix_labels,
                               mix_lambdas, mix_partners)


def reference_view(image: torch.Tensor, dy: int, dx: int, flip: bool, pad: int) -> torch.Tensor:
    """One image, the obvious way: zero-pad, crop the original size at (dy, dx), mirror."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=image.dtype)
    padded[:, pad:pad + h, pad:pad + w] = image
    crop = padded[:, dy:dy + h, dx:dx + w]
    return crop.flip(-1) if flip else crop


def test_views_are_a_pure_function_of_seed_epoch_index():
    idx = torch.arange(500)
    a, b = make_views(7, 3, idx, pad=4, flip=True), make_views(7, 3, idx, pad=4, flip=True)
    assert torch.equal(a.dy, b.dy) and torch.equal(a.dx, b.dx) and torch.equal(a.flip, b.flip)
    few = torch.tensor([0, 5, 17, 1000, 3])  # any indices, not only a range
    c, d = make_views(1, 2, few, pad=2, flip=True), make_views(1, 2, few.clone(), pad=2, flip=True)
    for field in ("dy", "dx", "flip"):
        assert torch.equal(getattr(c, field), getattr(d, field))
    # an image's view does not depend on which batch it is in or where
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(0))
    e = make_views(7, 3, perm, pad=4, flip=True)
    assert torch.equal(e.dy, a.dy[perm]) and torch.equal(e.dx, a.dx[perm]) and torch.equal(e.flip, a.flip[perm])
    other_epoch, other_seed = make_views(7, 4, idx, 4, True), make_views(8, 3, idx, 4, True)
    for other in (other_epoch, other_seed):
        assert (other.dy != a.dy).float().mean() > 0.5 and (other.dx != a.dx).float().mean() > 0.5
        assert (other.flip != a.flip).float().mean() > 0.3


def test_views_do_not_depend_on_batch_composition():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 6, 6), generator=gen, dtype=torch.uint8)
    idx = torch.randperm(50, generator=gen)[:20]
    batch = apply_views(images[idx], make_views(11, 4, idx, 2, True), 2)
    for pos, i in enumerate(idx.tolist()):
        alone = apply_views(images[i:i + 1], make_views(11, 4, torch.tensor([i]), 2, True), 2)
        assert torch.equal(batch[pos], alone[0])
    # and in another order, split in two batches
    rev = idx.flip(0)
    first = apply_views(images[rev[:7]], make_views(11, 4, rev[:7], 2, True), 2)
    second = apply_views(images[rev[7:]], make_views(11, 4, rev[7:], 2, True), 2)
    assert torch.equal(torch.cat([first, second]).flip(0), batch)


@pytest.mark.parametrize("pad", [1, 2, 4])
def test_views_cover_the_augmentation_space_uniformly(pad):
    n, span = 40_000, 2 * pad + 1
    views = make_views(42, 0, torch.arange(n), pad=pad, flip=True)
    for offsets in (views.dy, views.dx):
        freq = torch.bincount(offsets, minlength=span).double() / n
        assert offsets.min() == 0 and offsets.max() == 2 * pad
        assert set(offsets.tolist()) == set(range(span))  # every offset occurs
        assert torch.allclose(freq, torch.full((span,), 1 / span, dtype=torch.float64), atol=0.012)
    assert abs(views.flip.double().mean().item() - 0.5) < 0.012
    # offsets and flips are independent: every (dy, dx, flip) cell is about equally frequent
    assert (views.dy == views.dx).double().mean() < 0.5  # dy and dx not tied together
    cells = torch.bincount((views.dy * span + views.dx) * 2 + views.flip.long(), minlength=span * span * 2)
    expected = n / (span * span * 2)
    chi2 = (((cells.double() - expected) ** 2) / expected).sum().item()
    dof = span * span * 2 - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5
    # turning flips off changes nothing else: the same crops, no flips
    no_flip = make_views(42, 0, torch.arange(n), pad=pad, flip=False)
    assert not no_flip.flip.any()
    assert torch.equal(no_flip.dy, views.dy) and torch.equal(no_flip.dx, views.dx)


def test_no_flip_and_no_padding_mean_identity_views():
    views = make_views(1, 2, torch.arange(1000), pad=0, flip=False)
    assert not views.flip.any() and (views.dy == 0).all() and (views.dx == 0).all()


@pytest.mark.parametrize(("pad", "flip", "shape"), [
    (0, True, (2, 5, 7)), (1, False, (2, 5, 7)), (2, True, (2, 5, 7)), (3, True, (2, 5, 7)),  # not square on purpose
    (2, True, (3, 8, 8)),  # RGB, square
])
def test_apply_views_equals_the_per_image_reference(pad, flip, shape):
    gen = torch.Generator().manual_seed(pad)
    images = torch.randint(1, 256, (64, *shape), generator=gen, dtype=torch.uint8)
    idx = torch.arange(100, 164)
    views = make_views(3, 1, idx, pad, flip)
    out = apply_views(images, views, pad)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i in range(len(images)):
        ref = reference_view(images[i], int(views.dy[i]), int(views.dx[i]), bool(views.flip[i]), pad)
        assert torch.equal(out[i], ref), i
    if pad:
        assert (out == 0).any()  # some crops reach into the zero padding


def test_apply_views_hand_example():
    image = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)
    # pad 1, shift to the bottom-right corner, no flip: the top-left 2x2 moves out, zeros come in
    out = apply_views(image, Views(torch.tensor([2]), torch.tensor([2]), torch.tensor([False])), 1)
    assert out[0, 0].tolist() == [[5, 6, 0], [8, 9, 0], [0, 0, 0]]
    out = apply_views(image, Views(torch.tensor([1]), torch.tensor([1]), torch.tensor([True])), 1)
    assert out[0, 0].tolist() == [[3, 2, 1], [6, 5, 4], [9, 8, 7]]


# ---- mixed views ------------------------------------------------------------------------------

MIX = pytest.mark.parametrize("kind", ["mixup", "cutmix"])


def _same_mix(a: Mix, b: Mix) -> bool:
    return (a.kind == b.kind and torch.equal(a.partner, b.partner) and torch.equal(a.weight, b.weight)
            and torch.equal(a.box, b.box))


@MIX
def test_mix_is_a_pure_function_of_seed_epoch_index(kind):
    """Partner, λ and box of an image do not depend on the other images asked for with it, on
    their order, or on how an epoch is cut into batches."""
    n, size = 300, (6, 7)
    whole = make_mix(7, 3, torch.arange(n), n, kind, 0.7, size)
    assert _same_mix(whole, make_mix(7, 3, torch.arange(n), n, kind, 0.7, size))  # and across calls
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert _same_mix(make_mix(7, 3, perm, n, kind, 0.7, size), whole[perm])
    for i in (0, 5, 299):  # one image alone
        assert _same_mix(make_mix(7, 3, torch.tensor([i]), n, kind, 0.7, size), whole[i:i + 1])
    for batch_size in (1, 16, 128):  # an epoch drawn batch by batch, in its shuffled order
        order = epoch_order(7, 3, n)
        parts = [make_mix(7, 3, order[s:s + batch_size], n, kind, 0.7, size) for s in range(0, n, batch_size)]
        for field in ("partner", "weight", "box"):
            assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole[order], field))
    for seed, epoch in ((7, 4), (8, 3)):
        other = make_mix(seed, epoch, torch.arange(n), n, kind, 0.7, size)
        assert (other.partner != whole.partner).float().mean() > 0.9
        assert (other.weight != whole.weight).float().mean() > 0.5


def test_partners_are_the_next_image_of_the_epoch_order():
    n = 1000
    for seed, epoch in ((42, 0), (42, 1), (3, 0)):
        order = epoch_order(seed, epoch, n)
        partner = mix_partners(seed, epoch, torch.arange(n), n)
        assert torch.equal(partner[order], order.roll(-1))  # image k of the order mixes with image k + 1
        assert sorted(partner.tolist()) == list(range(n))  # everyone is a partner exactly once an epoch
        assert not (partner == torch.arange(n)).any()  # and never its own
    assert not torch.equal(mix_partners(42, 0, torch.arange(n), n), mix_partners(42, 1, torch.arange(n), n))
    assert mix_partners(1, 0, torch.tensor([0]), 1).tolist() == [0]  # a single image mixes with itself


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_mix_lambdas_follow_beta_alpha_alpha(alpha):
    n = 40_000
    lam = mix_lambdas(42, 0, torch.arange(n), alpha)
    assert lam.dtype == torch.float64 and lam.shape == (n,)
    assert ((lam > 0) & (lam < 1)).all()
    assert ((lam.float() > 0) & (lam.float() < 1)).all()  # in float32 too
    # Beta(α, α): mean α / (2α) = ½, variance 1 / (4(2α + 1)); standard errors at n = 40,000 < 0.003
    assert lam.mean().item() == pytest.approx(alpha / (2 * alpha), abs=0.01)
    assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.03)
    assert (lam < 0.5).double().mean().item() == pytest.approx(0.5, abs=0.01)  # symmetric
    if alpha == 1.0:  # Beta(1, 1) is uniform: every tenth of (0, 1) equally frequent
        freq = torch.histc(lam, bins=10, min=0, max=1) / n
        assert torch.allclose(freq, torch.full((10,), 0.1, dtype=torch.float64), atol=0.01)
    # a pure function of (seed, epoch, index); seed and epoch matter
    assert torch.equal(mix_lambdas(42, 0, torch.tensor([17, 3]), alpha), lam[[17, 3]])
    for other in (mix_lambdas(42, 1, torch.arange(n), alpha), mix_lambdas(43, 0, torch.arange(n), alpha)):
        assert (other != lam).double().mean() > 0.99  # (α = 0.2: a few are clamped to 2⁻²⁴ in both)


def test_mix_lambdas_need_a_positive_alpha():
    with pytest.raises(ValueError, match="mix_alpha"):
        mix_lambdas(1, 0, torch.arange(3), 0.0)


def test_cutmix_boxes_lie_in_the_image_and_weigh_the_labels_by_area():
    n, (h, w) = 20_000, (8, 10)
    mix = make_mix(5, 2, torch.arange(n), n, "cutmix", 1.0, (h, w))
    y0, y1, x0, x1 = mix.box.unbind(1)
    assert ((0 <= y0) & (y0 <= y1) & (y1 <= h) & (0 <= x0) & (x0 <= x1) & (x1 <= w)).all()
    area = ((y1 - y0) * (x1 - x0)).double()
    assert torch.equal(mix.weight, (1 - area / (h * w)).float())
    assert ((mix.weight >= 0) & (mix.weight <= 1)).all()
    # a box not clipped by the border has round(H·√(1−λ)) × round(W·√(1−λ)) pixels
    lam = mix_lambdas(5, 2, torch.arange(n), 1.0)
    ratio = (1 - lam).sqrt()
    inside = (y0 > 0) & (y1 < h) & (x0 > 0) & (x1 < w)
    assert inside.sum() > 1000
    assert torch.equal((y1 - y0)[inside], torch.floor(h * ratio + 0.5).long()[inside])
    assert torch.equal((x1 - x0)[inside], torch.floor(w * ratio + 0.5).long()[inside])
    # centres cover the image: boxes start and end everywhere
    assert set(y0.tolist()) == set(range(h)) and set(range(1, w + 1)) <= set(x1.tolist())
    # mixup: the weight is λ itself
    mixup = make_mix(5, 2, torch.arange(n), n, "mixup", 1.0, (h, w))
    assert torch.equal(mixup.weight, lam.float()) and torch.equal(mixup.partner, mix.partner)


def test_apply_mix_equals_the_per_image_reference():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (40, 3, 6, 7), generator=gen, dtype=torch.uint8)
    b = torch.randint(0, 256, (40, 3, 6, 7), generator=gen, dtype=torch.uint8)
    idx = torch.arange(100, 140)
    mixup = make_mix(2, 1, idx, 200, "mixup", 0.5, (6, 7))
    out = apply_mix(a, b, mixup)
    assert out.dtype == torch.float32
    cutmix = make_mix(2, 1, idx, 200, "cutmix", 0.5, (6, 7))
    cut = apply_mix(a, b, cutmix)
    assert cut.dtype == torch.uint8
    for i in range(40):
        lam = mixup.weight[i]
        assert torch.equal(out[i], a[i].float() * lam + b[i].float() * (1 - lam))
        y0, y1, x0, x1 = cutmix.box[i].tolist()
        ref = a[i].clone()
        ref[:, y0:y1, x0:x1] = b[i][:, y0:y1, x0:x1]
        assert torch.equal(cut[i], ref), i
        assert (cut[i] == b[i]).all(0).float().mean() >= 1 - cutmix.weight[i] - 1e-6  # the box is the partner's


def test_mix_labels_are_soft_targets_that_sum_to_one():
    n, k = 500, 5
    mix = make_mix(9, 0, torch.arange(n), n, "mixup", 1.0, (4, 4))
    labels = torch.arange(n) % k
    soft = mix_labels(labels, labels[mix.partner], mix, k)
    assert soft.shape == (n, k) and soft.dtype == torch.float32
    assert torch.allclose(soft.sum(1), torch.ones(n))
    assert (soft >= 0).all()
    own = soft.gather(1, labels[:, None]).squeeze(1)
    same = labels == labels[mix.partner]
    assert torch.allclose(own[~same], mix.weight[~same]) and torch.allclose(own[same], torch.ones(int(same.sum())))
    other = soft.gather(1, labels[mix.partner][:, None]).squeeze(1)
    assert torch.allclose(other[~same], 1 - mix.weight[~same])
    # the dominant label is the image's own one where its weight is above ½
    assert torch.equal(soft.argmax(1)[mix.weight > 0.5], labels[mix.weight > 0.5])
