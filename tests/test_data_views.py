"""Deterministic views (kdpipe.data.views): a pure function of (seed, epoch, index) that covers
the augmentation space with the expected frequencies, applied exactly like a per-image crop and
flip. The batches built from them are tested in test_data_loader.py."""

from __future__ import annotations

import pytest
import torch

from kdpipe.data.views import Views, apply_views, make_views


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
