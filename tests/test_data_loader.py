"""In-memory batches (kdpipe.data.loader): one deterministic shuffled, augmented, normalised
pipeline per run, replayable from (seed, epoch) alone, mixed views included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.config import AugmentConfig
from kdpipe.data.loader import Normalizer, TrainingBatches, augmentation, epoch_order, train_batches
from kdpipe.data.prepare import Split
from kdpipe.data.views import apply_mix, apply_views, make_mix, make_views, mix_labels
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
                                  "mix": "none", "mix_alpha": None, "channels_last": True, "device": "cpu"}
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


# ---- mixed views ------------------------------------------------------------------------------


def _split(n: int = 37, classes: int = 3) -> Split:
    gen = torch.Generator().manual_seed(1)
    return Split(torch.randint(0, 256, (n, 2, 6, 5), generator=gen, dtype=torch.uint8), torch.arange(n) % classes)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_batches_mix_each_view_with_its_partners_view(kind):
    """Each image is mixed with its partner's view of the same epoch, its label with the
    partner's: mix(view(i), view(partner(i))), exactly as kdpipe.data.views documents it."""
    split, norm = _split(), Normalizer.from_meta([0.5, 0.4], [0.25, 0.2])
    batches = list(train_batches(split, 10, 8, 2, 1, True, norm, mix=kind, mix_alpha=0.4, num_classes=3))
    assert [len(b.indices) for b in batches] == [10, 10, 10, 7]
    assert torch.equal(torch.cat([b.indices for b in batches]), epoch_order(8, 2, 37))
    for b in batches:
        mix = make_mix(8, 2, b.indices, 37, kind, 0.4, (6, 5))
        own = apply_views(split.images[b.indices], make_views(8, 2, b.indices, 1, True), 1)
        other = apply_views(split.images[mix.partner], make_views(8, 2, mix.partner, 1, True), 1)
        assert torch.equal(b.images, norm(apply_mix(own, other, mix)))
        assert torch.equal(b.labels, mix_labels(split.labels[b.indices], split.labels[mix.partner], mix, 3))
        assert b.labels.shape == (len(b.indices), 3) and torch.allclose(b.labels.sum(1), torch.ones(len(b.indices)))
    # mixing really happened: the images are not the plain views
    plain = list(train_batches(split, 10, 8, 2, 1, True, norm))
    assert all(torch.equal(p.indices, b.indices) for p, b in zip(plain, batches))
    assert not torch.equal(plain[0].images, batches[0].images)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_a_mixed_view_does_not_depend_on_the_batch_size(kind):
    split, norm = _split(), Normalizer.from_meta([0.5, 0.4], [0.25, 0.2])

    def by_index(batch_size):
        rows = {}
        for b in train_batches(split, batch_size, 4, 1, 2, True, norm, mix=kind, num_classes=3):
            rows.update({i: (x, y) for i, x, y in zip(b.indices.tolist(), b.images, b.labels)})
        return rows

    one, seven, all_at_once = by_index(1), by_index(7), by_index(37)
    assert sorted(one) == list(range(37))
    for i in range(37):
        for other in (seven, all_at_once):
            assert torch.equal(one[i][0], other[i][0]) and torch.equal(one[i][1], other[i][1])


def test_mixing_needs_a_known_kind_and_the_class_count():
    split, norm = _split(), Normalizer.from_meta([0.5, 0.4], [0.25, 0.2])
    with pytest.raises(ValueError, match="num_classes"):
        next(train_batches(split, 10, 8, 2, 1, True, norm, mix="mixup"))
    with pytest.raises(ValueError, match="mix must be one of"):
        next(train_batches(split, 10, 8, 2, 1, True, norm, mix="mosaic", num_classes=3))


def test_training_batches_of_a_mixing_run_describe_and_draw_the_mixed_batches():
    data = make_prepared(n_train=45, channels=3, flip=True)
    runtime = Runtime(torch.device("cpu"), threads=1, amp_dtype=None, channels_last=False, compile=False)
    augment = AugmentConfig(crop_padding=1, flip=True, mix="cutmix", mix_alpha=0.5)
    batches = TrainingBatches.for_run(data, 10, augment, 5, runtime)
    assert batches.describe() == {"seed": 5, "batch_size": 10, "crop_padding": 1, "flip": True, "mix": "cutmix",
                                  "mix_alpha": 0.5, "channels_last": False, "device": "cpu"}
    norm = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    got = list(batches.epoch(1))
    expected = list(train_batches(data.train, 10, 5, 1, 1, True, norm, mix="cutmix", mix_alpha=0.5, num_classes=4))
    assert len(got) == len(expected) == batches.steps
    for a, b in zip(got, expected):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.labels.shape == (len(a.indices), data.num_classes)
    # without mixing, mix_alpha decides nothing and is not part of the description
    plain = TrainingBatches.for_run(data, 10, AugmentConfig(mix_alpha=0.5), 5, runtime).describe()
    assert plain["mix"] == "none" and plain["mix_alpha"] is None


@pytest.mark.parametrize(("augment", "key", "shown"), [
    ({"mix": "mosaic"}, "data.augment.mix", "'mosaic'"),
    ({"mix": None}, "data.augment.mix", "None"),
    ({"mix": "mixup", "mix_alpha": 0}, "data.augment.mix_alpha", "=0.0 "),
    ({"mix_alpha": -1.0}, "data.augment.mix_alpha", "=-1.0 "),
    ({"mix_alpha": "big"}, "data.augment.mix_alpha", "'big'"),
])
def test_the_mixing_settings_are_validated_at_load(augment, key, shown):
    from kdpipe.config import parse_params
    from kdpipe.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_params({"data": {"augment": augment}})
    assert key in str(info.value) and shown in str(info.value), str(info.value)
    parsed = parse_params({"data": {"augment": {"mix": "cutmix", "mix_alpha": 0.2}}}).data.augment
    assert (parsed.mix, parsed.mix_alpha) == ("cutmix", 0.2)
