"""Deterministic views: a pure function of (seed, epoch, index) that covers the augmentation
space with the expected frequencies, applied exactly like a per-image crop and flip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.data.loader import Normalizer, train_batches
from kdpipe.data.prepare import Split
from kdpipe.data.views import apply_views, make_views


def test_views_are_a_pure_function_of_seed_epoch_index():
    idx = torch.arange(500)
    a, b = make_views(7, 3, idx, pad=4, flip=True), make_views(7, 3, idx, pad=4, flip=True)
    assert torch.equal(a.dy, b.dy) and torch.equal(a.dx, b.dx) and torch.equal(a.flip, b.flip)
    # an image's view does not depend on which batch it is in or where
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(0))
    c = make_views(7, 3, perm, pad=4, flip=True)
    assert torch.equal(c.dy, a.dy[perm]) and torch.equal(c.dx, a.dx[perm]) and torch.equal(c.flip, a.flip[perm])
    other_epoch, other_seed = make_views(7, 4, idx, 4, True), make_views(8, 3, idx, 4, True)
    for other in (other_epoch, other_seed):
        assert (other.dy != a.dy).float().mean() > 0.5 and (other.flip != a.flip).float().mean() > 0.3


@pytest.mark.parametrize("pad", [1, 4])
def test_views_cover_the_augmentation_space_uniformly(pad):
    n, span = 40_000, 2 * pad + 1
    views = make_views(42, 0, torch.arange(n), pad=pad, flip=True)
    for offsets in (views.dy, views.dx):
        freq = torch.bincount(offsets, minlength=span).double() / n
        assert offsets.min() == 0 and offsets.max() == 2 * pad
        assert torch.allclose(freq, torch.full((span,), 1 / span, dtype=torch.float64), atol=0.012)
    assert abs(views.flip.double().mean().item() - 0.5) < 0.012
    # offsets and flips are independent: every (dy, dx, flip) cell is about equally frequent
    cells = torch.bincount((views.dy * span + views.dx) * 2 + views.flip.long(), minlength=span * span * 2)
    expected = n / (span * span * 2)
    chi2 = (((cells.double() - expected) ** 2) / expected).sum().item()
    dof = span * span * 2 - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5


def test_no_flip_and_no_padding_mean_identity_views():
    views = make_views(1, 2, torch.arange(1000), pad=0, flip=False)
    assert not views.flip.any() and (views.dy == 0).all() and (views.dx == 0).all()


def test_apply_views_equals_per_image_crop_then_flip():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=gen)
    pad = 2
    views = make_views(3, 1, torch.arange(64), pad=pad, flip=True)
    out = apply_views(images, views, pad)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    for i in range(64):
        dy, dx = int(views.dy[i]), int(views.dx[i])
        expected = padded[i, :, dy:dy + 8, dx:dx + 8]
        if views.flip[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)


def test_train_batches_visit_every_image_once_and_replay_exactly():
    gen = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=gen), torch.arange(50) % 5)
    norm = Normalizer.from_meta([0.5] * 3, [0.25] * 3)
    first = list(train_batches(split, 16, 9, 2, 1, True, norm, torch.channels_last))
    again = list(train_batches(split, 16, 9, 2, 1, True, norm))
    assert [len(b.indices) for b in first] == [16, 16, 16, 2]
    assert sorted(torch.cat([b.indices for b in first]).tolist()) == list(range(50))
    for a, b in zip(first, again):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.images)  # same values whatever the memory format
        assert a.images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a.labels, split.labels[a.indices])
    next_epoch = torch.cat([b.indices for b in train_batches(split, 16, 9, 3, 1, True, norm)])
    assert not torch.equal(next_epoch, torch.cat([b.indices for b in first]))
    assert np.isfinite(torch.cat([b.images for b in first]).numpy()).all()
