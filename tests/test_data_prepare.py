"""Seeded stratified splits (kdpipe.data.prepare). The prepared on-disk format written by the
prepare stage on real data is checked in test_data_pipeline.py."""

from __future__ import annotations

import pytest
import torch

from kdpipe.data.prepare import Split, channel_stats, split_dataset, stratified_split
from kdpipe.data.sources import RawDataset
from kdpipe.errors import KdpipeError
from tests.data_fixtures import sklearn_digits


def test_stratified_split_is_seeded_and_disjoint():
    labels = torch.arange(500) % 7
    a = stratified_split(labels, [0.2, 0.1], seed=3)
    b = stratified_split(labels, [0.2, 0.1], seed=3)
    c = stratified_split(labels, [0.2, 0.1], seed=4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    joined = torch.cat(a)
    assert len(joined) == len(set(joined.tolist())) == 500  # disjoint, and nothing lost


def test_split_dataset_same_seed_same_images_other_seed_different():
    _, labels = sklearn_digits()
    gen = torch.Generator().manual_seed(0)
    raw = RawDataset(torch.randint(0, 256, (len(labels), 1, 8, 8), generator=gen, dtype=torch.uint8),
                     torch.from_numpy(labels), [str(i) for i in range(10)], flip=False)
    first = split_dataset(raw, 0.15, 0.15, seed=42)
    again = split_dataset(raw, 0.15, 0.15, seed=42)
    other = split_dataset(raw, 0.15, 0.15, seed=43)
    for name in ("train", "val", "test"):
        assert torch.equal(first[name].images, again[name].images)
        assert torch.equal(first[name].labels, again[name].labels)
    assert not torch.equal(first["test"].images, other["test"].images)


def test_split_dataset_keeps_an_official_test_split():
    labels = torch.arange(100) % 4
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 4, 4).contiguous()
    test = Split(torch.full((12, 1, 4, 4), 255, dtype=torch.uint8), torch.arange(12) % 4)
    raw = RawDataset(images, labels, list("abcd"), flip=True, test_images=test.images, test_labels=test.labels)
    splits = split_dataset(raw, 0.2, 0.5, seed=0)
    assert torch.equal(splits["test"].images, test.images)
    assert len(splits["val"]) == 20 and len(splits["train"]) == 80


def test_split_dataset_refuses_an_empty_split():
    raw = RawDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2]), list("abc"), flip=False)
    with pytest.raises(KdpipeError, match="split is empty"):
        split_dataset(raw, 0.1, 0.1, seed=0)


def _float64_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """The statistics as they used to be computed: a float64 copy of every image."""
    x = images.to(torch.float64).div_(255.0)
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def test_channel_stats_in_chunks_equal_the_float64_statistics():
    gen = torch.Generator().manual_seed(0)
    cases = [torch.zeros(5, 3, 4, 4, dtype=torch.uint8), torch.full((3, 1, 2, 2), 255, dtype=torch.uint8)]
    cases += [torch.randint(0, top + 1, (n, c, 8, 8), generator=gen, dtype=torch.uint8)
              for n, c, top in [(2, 1, 1), (1500, 3, 255), (2500, 1, 16), (3000, 3, 200)]]  # > 1 chunk of 1024
    for images in cases:
        assert channel_stats(images) == _float64_stats(images)
