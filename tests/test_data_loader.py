"""In-memory batches (kdpipe.data.loader): one deterministic shuffled, augmented, normalised
pipeline per run, replayable from (seed, epoch) alone."""

from __future__ import annotations

import numpy as np
import torch

from kdpipe.config import AugmentConfig
from kdpipe.data.loader import Normalizer, TrainingBatches, augmentation, epoch_order, train_batches
from kdpipe.data.prepare import Split
from kdpipe.data.views import apply_views, make_views
from kdpipe.runtime import Runtime
from tests.conftest import make_prepared


def test_epoch_order_is_a_deterministic_permutation():
    order = epoch_order(42, 3, 1000)
    assert sorted(order.tolist()) == list(range(1000))
    assert torch.equal(order, epoch_order(42, 3, 1000))
    assert not torch.equal(order, epoch_order(42, 4, 1000))
    assert not torch.equal(order, epoch_order(43, 3, 1000))


def test_train_batches_cover_the_epoch_once_with_the_documented_views():
    gen = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (37, 1, 6, 6), generator=gen, dtype=torch.uint8), torch.arange(37) % 3)
    norm = Normalizer.from_meta([0.5], [0.25])
    batches = list(train_batches(split, 10, seed=8, epoch=2, pad=1, flip=True, normalize=norm))
    assert [len(b.indices) for b in batches] == [10, 10, 10, 7]
    idx = torch.cat([b.indices for b in batches])
    assert torch.equal(idx, epoch_order(8, 2, 37))
    for b in batches:
        views = make_views(8, 2, b.indices, 1, True)
        expected = (apply_views(split.images[b.indices], views, 1).float() - 127.5) / 63.75
        assert torch.allclose(b.images, expected)
        assert torch.equal(b.labels, split.labels[b.indices])


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


def test_augmentation_flips_only_where_the_data_set_allows():
    assert augmentation(AugmentConfig(crop_padding=3, flip=True), {"flip": True}) == (3, True)
    assert augmentation(AugmentConfig(crop_padding=3, flip=True), {"flip": False}) == (3, False)  # digits
    assert augmentation(AugmentConfig(crop_padding=0, flip=False), {"flip": True}) == (0, False)


def test_training_batches_of_a_run_are_train_batches_with_its_settings():
    data = make_prepared(n_train=45, channels=3, flip=True)
    runtime = Runtime(torch.device("cpu"), threads=1, amp_dtype=None, channels_last=True, compile=False)
    batches = TrainingBatches.for_run(data, 10, AugmentConfig(crop_padding=2, flip=True), 5, runtime)
    assert batches.steps == 5  # 45 images in batches of 10
    assert batches.describe() == {"seed": 5, "batch_size": 10, "crop_padding": 2, "flip": True,
                                  "channels_last": True, "device": "cpu"}
    norm = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    for epoch in (0, 1):
        got = list(batches.epoch(epoch))
        expected = list(train_batches(data.train, 10, 5, epoch, 2, True, norm, torch.channels_last))
        assert len(got) == batches.steps == len(expected)
        for a, b in zip(got, expected):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.images, b.images) and a.images.is_contiguous(memory_format=torch.channels_last)
    digits_like = make_prepared(n_train=45, flip=False)
    no_flip = TrainingBatches.for_run(digits_like, 10, AugmentConfig(crop_padding=1, flip=True), 5, runtime)
    assert (no_flip.pad, no_flip.flip) == (1, False)  # the data set refuses flips
