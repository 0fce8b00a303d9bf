"""Data: the digits source, the prepared format, seeded stratified splits and deterministic views."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe import paths
from kdpipe.config import parse_params
from kdpipe.data import pipeline
from kdpipe.data.images import resize_uint8
from kdpipe.data.loader import Normalizer, epoch_order, train_batches
from kdpipe.data.prepare import Split, load_prepared, split_dataset, stratified_split
from kdpipe.data.sources import RawDataset
from kdpipe.data.views import Views, apply_views, make_views
from kdpipe.errors import ConfigError, KdpipeError


def sklearn_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


@pytest.fixture(scope="module")
def digits_project(tmp_path_factory):
    """Run the real download and prepare steps of the pipeline in an empty directory."""
    root = tmp_path_factory.mktemp("digits_project")
    params = parse_params({"seed": 7, "data": {"name": "digits", "val_fraction": 0.15, "test_fraction": 0.2}})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        info = pipeline.download(params)
        summary = pipeline.prepare(params)
    return root, params, info, summary


def test_download_writes_the_raw_digits(digits_project):
    root, _, info, _ = digits_project
    assert info["images"] == 1797
    raw = np.load(root / paths.RAW_DIR / "digits" / "digits.npz", allow_pickle=False)
    images, labels = sklearn_digits()
    assert raw["images"].dtype == np.uint8 and raw["images"].shape == (1797, 1, 8, 8)
    # 0..16 pixel values stretched to 0..255
    np.testing.assert_array_equal(raw["images"][:, 0], np.rint(images * 255.0 / 16.0).astype(np.uint8))
    np.testing.assert_array_equal(raw["labels"], labels)
    assert list(raw["class_names"]) == [str(i) for i in range(10)]


def test_prepared_splits_are_uint8_nchw_and_partition_the_data(digits_project):
    root, _, _, _ = digits_project
    data = load_prepared(root / paths.PREPARED_DIR)
    total = 0
    seen: Counter = Counter()
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8
        assert split.images.shape[1:] == (1, 8, 8)
        assert split.labels.dtype == torch.int64
        assert len(split.images) == len(split.labels)
        total += len(split)
        seen.update((img.numpy().tobytes(), int(y)) for img, y in zip(split.images, split.labels))
    images, labels = sklearn_digits()
    original = Counter((np.rint(img * 255.0 / 16.0).astype(np.uint8)[None].tobytes(), int(y))
                       for img, y in zip(images, labels))
    assert total == 1797
    assert seen == original  # every image exactly once, with its own label
    assert data.num_classes == 10
    assert sorted(torch.unique(data.train.labels).tolist()) == list(range(10))


def test_split_is_stratified_to_within_one_image(digits_project):
    root, params, _, summary = digits_project
    data = load_prepared(root / paths.PREPARED_DIR)
    _, labels = sklearn_digits()
    totals = np.bincount(labels, minlength=10)
    targets = {"test": params.data.test_fraction, "val": params.data.val_fraction,
               "train": 1 - params.data.test_fraction - params.data.val_fraction}
    for name, frac in targets.items():
        counts = np.bincount(getattr(data, name).labels.numpy(), minlength=10)
        assert np.all(np.abs(counts - frac * totals) <= 1), (name, counts, frac * totals)
        assert summary["per_class"][name] == {str(c): int(n) for c, n in enumerate(counts)}
        assert summary[f"{name}_images"] == int(counts.sum())


def test_meta_json_describes_the_prepared_data(digits_project):
    root, _, _, _ = digits_project
    meta = json.loads((root / paths.PREPARED_DIR / "meta.json").read_text())
    data = load_prepared(root / paths.PREPARED_DIR)
    train = data.train.images.double() / 255.0
    assert meta["dataset"] == "digits"
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["channels"] == 1 and meta["image_size"] == 8
    assert meta["flip"] is False  # a mirrored digit is not a digit
    assert meta["sizes"] == {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
    assert meta["mean"] == pytest.approx([train.mean().item()], abs=1e-6)
    assert meta["std"] == pytest.approx([train.std().item()], abs=1e-6)
    metrics = json.loads((root / "metrics" / "data.json").read_text())
    assert metrics["classes"] == 10 and metrics["image_shape"] == [1, 8, 8]


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


def test_unknown_source_is_a_config_error():
    from kdpipe.data.sources import get_source

    with pytest.raises(ConfigError, match="data.name='mnist'"):
        get_source("mnist")


# --------------------------------------------------------------------------- resize


def pil_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    out = []
    for img in images:
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        res = np.array(pil.resize((size, size), Image.BILINEAR))
        out.append(torch.from_numpy(res.reshape(size, size, -1)).permute(2, 0, 1))
    return torch.stack(out)


@pytest.mark.parametrize(("channels", "size"), [(1, 4), (1, 5), (3, 16), (3, 13)])
def test_resize_uint8_matches_pil_bilinear(channels, size):
    gen = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (5, channels, 8, 8), generator=gen, dtype=torch.uint8)
    out = resize_uint8(images, size)
    assert out.dtype == torch.uint8 and out.shape == (5, channels, size, size)
    assert (out.int() - pil_resize(images, size).int()).abs().max() <= 1


def test_resize_uint8_identity_constant_and_empty():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert resize_uint8(images, 8) is images
    flat = torch.full((2, 1, 8, 8), 200, dtype=torch.uint8)
    assert torch.equal(resize_uint8(flat, 4), torch.full((2, 1, 4, 4), 200, dtype=torch.uint8))
    assert torch.equal(resize_uint8(flat, 20), torch.full((2, 1, 20, 20), 200, dtype=torch.uint8))
    empty = resize_uint8(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), 4)
    assert empty.shape == (0, 3, 4, 4) and empty.dtype == torch.uint8


# --------------------------------------------------------------------------- views


def reference_view(image: torch.Tensor, dy: int, dx: int, flip: bool, pad: int) -> torch.Tensor:
    """One image, the obvious way: zero-pad, crop the original size at (dy, dx), mirror."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=image.dtype)
    padded[:, pad:pad + h, pad:pad + w] = image
    crop = padded[:, dy:dy + h, dx:dx + w]
    return crop.flip(-1) if flip else crop


def test_views_are_a_function_of_seed_epoch_index():
    idx = torch.tensor([0, 5, 17, 1000, 3])
    a = make_views(1, 2, idx, pad=2, flip=True)
    b = make_views(1, 2, idx.clone(), pad=2, flip=True)
    for field in ("dy", "dx", "flip"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    big = torch.arange(400)
    base = make_views(1, 2, big, 2, True)
    other_epoch = make_views(1, 3, big, 2, True)
    other_seed = make_views(9, 2, big, 2, True)
    assert not torch.equal(base.dy, other_epoch.dy) and not torch.equal(base.dx, other_seed.dx)


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
def test_views_cover_every_offset_and_flip_half_the_time(pad):
    idx = torch.arange(4000)
    views = make_views(5, 0, idx, pad, flip=True)
    assert set(views.dy.tolist()) == set(range(2 * pad + 1))
    assert set(views.dx.tolist()) == set(range(2 * pad + 1))
    # roughly uniform offsets (each value ~4000/(2p+1)); dy and dx not tied together
    for offsets in (views.dy, views.dx):
        counts = torch.bincount(offsets, minlength=2 * pad + 1).double()
        assert counts.min() > 0.8 * 4000 / (2 * pad + 1) and counts.max() < 1.2 * 4000 / (2 * pad + 1)
    assert (views.dy == views.dx).double().mean() < 0.5
    rate = views.flip.double().mean().item()
    assert abs(rate - 0.5) < 0.03  # 4000 draws: ±0.03 is more than 3.5 standard deviations
    no_flip = make_views(5, 0, idx, pad, flip=False)
    assert not no_flip.flip.any()
    assert torch.equal(no_flip.dy, views.dy)  # flipping does not change the crops


@pytest.mark.parametrize(("pad", "flip"), [(0, True), (1, False), (2, True), (3, True)])
def test_apply_views_equals_the_per_image_reference(pad, flip):
    gen = torch.Generator().manual_seed(pad)
    images = torch.randint(1, 256, (64, 2, 5, 7), generator=gen, dtype=torch.uint8)  # not square on purpose
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
