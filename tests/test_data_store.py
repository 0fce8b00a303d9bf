"""The image store (kdpipe.data.store) and the bounded-memory prepare built on it: images
decoded a chunk at a time into a scratch file, the splits streamed into data/prepared/*.npy
and mapped back read-only. The streamed store must hold exactly what a one-shot, in-memory
prepare of the same source gives (same tensors, same splits, same statistics)."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe import paths
from kdpipe.config import parse_params
from kdpipe.data import pipeline, store
from kdpipe.data.images import map_in_order, to_channels
from kdpipe.data.prepare import SPLITS, channel_stats, load_prepared, split_dataset, write_prepared
from kdpipe.data.sources import SOURCES, Source, image_size
from kdpipe.data.store import ImageRows, ImageStore, open_images, write_npy
from tests.conftest import make_prepared
from tests.data_fixtures import make_cifar_archive, make_intel_zip, md5


def _images(n: int, c: int = 3, side: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, side, side), generator=gen, dtype=torch.uint8)


# ---- the store's parts --------------------------------------------------------------------------


def test_streamed_npy_holds_the_bytes_np_save_writes_and_maps_back(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "CHUNK_BYTES", 200)  # 2 images of 3×5×5 per chunk: many chunks
    images = _images(37)
    seen = []
    write_npy(tmp_path / "streamed.npy", images, on_chunk=lambda block: seen.append(len(block)))
    np.save(tmp_path / "saved.npy", images.numpy())
    assert (tmp_path / "streamed.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()
    assert seen == [2] * 18 + [1]
    mapped = open_images(tmp_path / "streamed.npy", "rebuild it")
    assert mapped.dtype == torch.uint8 and torch.equal(mapped, images)
    if Path("/proc/self/maps").exists():  # Linux: the tensor reads the file's pages, it holds no copy
        assert str((tmp_path / "streamed.npy").resolve()) in Path("/proc/self/maps").read_text()
    gathered = mapped[torch.tensor([5, 0, 36])]  # a batch is a gathered copy, writable as any tensor
    gathered += 1
    assert torch.equal(mapped[0], images[0])


def test_image_rows_select_and_convert_lazily_in_any_chunking(tmp_path, monkeypatch):
    images = _images(50, seed=1)
    writer = ImageStore(tmp_path).writer((3, 5, 5))
    writer.append(images[:7].numpy())  # a block
    for image in images[7:]:
        writer.append(image.numpy())  # one at a time
    rows = writer.finish()
    assert isinstance(rows, ImageRows) and rows.shape == (50, 3, 5, 5)
    index = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:31]
    view = rows.take(index).take(torch.arange(30, -1, -1)).to_channels(1)  # composed, nothing read yet
    expected = to_channels(images[index].flip(0), 1)
    for chunk_bytes in (1, 40, 75, 10_000):
        monkeypatch.setattr(store, "CHUNK_BYTES", chunk_bytes)
        assert torch.equal(torch.from_numpy(np.concatenate(list(view.chunks()))), expected)
    assert torch.equal(view.tensor(), expected) and view.shape == (31, 1, 5, 5)
    in_memory = ImageRows.of(images).take(index).to_channels(1)
    assert torch.equal(in_memory.tensor(), to_channels(images[index], 1))


def test_a_writer_in_memory_gives_a_tensor_and_repeats_a_grey_image_into_every_channel():
    writer = ImageStore().writer((3, 4, 4))
    grey = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    writer.append(grey)
    images = writer.finish()
    assert isinstance(images, torch.Tensor) and images.shape == (1, 3, 4, 4)
    assert all(torch.equal(images[0, c], torch.from_numpy(grey[0])) for c in range(3))
    assert ImageStore().writer((3, 4, 4)).finish().shape == (0, 3, 4, 4)


def test_map_in_order_keeps_the_order_and_only_a_window_of_results_waiting():
    started, lock = [0], threading.Lock()

    def work(x: int) -> int:
        with lock:
            started[0] += 1
        return x * x

    window = 5
    for consumed, value in enumerate(map_in_order(work, range(200), window, workers=4), start=1):
        assert value == (consumed - 1) ** 2
        with lock:
            assert started[0] <= consumed + window  # never more than a window decoded ahead


def test_a_source_whose_load_takes_no_store_is_read_without_one(tmp_path):
    seen = []

    def small(raw_dir, settings, size):  # the documented minimal contract: tensors in memory
        seen.append("small")
        return "raw"

    def large(raw_dir, settings, size, store=None):
        seen.append(store)
        return "raw"

    target = ImageStore(tmp_path)
    assert Source(None, small, 8).read(tmp_path, None, 8, target) == "raw"
    assert Source(None, large, 8).read(tmp_path, None, 8, target) == "raw"
    assert seen == ["small", target]


def test_write_prepared_then_load_prepared_round_trips(tmp_path):
    data = make_prepared(n_train=20, n_val=6, n_test=5, channels=3, size=6)
    write_prepared(tmp_path / "prepared", data)
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == sorted(
        ["meta.json"] + [f"{s}_{kind}.npy" for s in SPLITS for kind in ("images", "labels")])
    loaded = load_prepared(tmp_path / "prepared")
    for name in SPLITS:
        assert torch.equal(getattr(loaded, name).images, getattr(data, name).images)
        assert torch.equal(getattr(loaded, name).labels, getattr(data, name).labels)
    assert loaded.meta == data.meta


# ---- every source: the streamed store equals a one-shot prepare ------------------------------------


def _one_shot(params) -> tuple[dict, tuple[list[float], list[float]]]:
    """What prepare gave before the store: everything decoded into memory at once, split by
    gathering tensors, statistics over the whole training tensor."""
    source = SOURCES.get(params.data.name).factory
    raw = source.load(pipeline.raw_dir(params), params.data.source, image_size(params.data, source))  # no store
    raw = pipeline.with_channels(raw, params.data.channels)
    assert isinstance(raw.train_images, torch.Tensor)
    splits = split_dataset(raw, params.data.val_fraction, params.data.test_fraction, params.seed)
    return splits, channel_stats(splits["train"].images)


def _grey_and_broken_folder(root: Path) -> Path:
    """train/ and val/ class folders of greyscale PNGs of many sizes, and one unreadable file."""
    rng = np.random.default_rng(5)
    for split, n in (("train", 9), ("val", 2)):
        for label in ("a", "b", "c"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(6, 30, 2))
                Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(root / split / label / f"{i}.png")
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


SOURCE_CASES = {
    "digits": lambda tmp: {"seed": 7, "data": {"name": "digits", "image_size": 12, "channels": 3}},
    "cifar10": lambda tmp: {"data": {"name": "cifar10", "image_size": 24, "cifar10": {
        "url": str(make_cifar_archive(tmp / "cifar.tar.gz", per_batch=30)), "md5": md5(tmp / "cifar.tar.gz")}}},
    "intel": lambda tmp: {"data": {"name": "intel", "image_size": 16, "channels": 1, "intel": {
        "zip_path": str(make_intel_zip(tmp / "intel.zip"))}}},
    "imagefolder": lambda tmp: {"data": {"name": "imagefolder", "image_size": 10, "imagefolder": {
        "path": str(_grey_and_broken_folder(tmp / "folder"))}}},
}


@pytest.mark.parametrize("name", sorted(SOURCE_CASES))
def test_the_streamed_store_holds_what_a_one_shot_prepare_gives(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(store, "CHUNK_BYTES", 1500)  # a few images per chunk: every boundary crossed
    params = parse_params(SOURCE_CASES[name](tmp_path))
    pipeline.download(params)
    summary = pipeline.prepare(params)
    assert not list((tmp_path / "data").glob(".*")), "the scratch store is removed"
    data = load_prepared(paths.PREPARED_DIR)
    expected, (mean, std) = _one_shot(params)
    for split in SPLITS:
        assert torch.equal(getattr(data, split).images, expected[split].images), split
        assert torch.equal(getattr(data, split).labels, expected[split].labels), split
    assert (data.meta["mean"], data.meta["std"]) == (mean, std)
    assert summary["image_shape"] == list(data.train.images.shape[1:])


# ---- bounded memory: a data set several times the limit prepares under it -----------------------


def _peak_growth(work) -> int:
    """How far ``work()`` raises this process's peak resident set (bytes) above what it holds now.

    Measured in this process (a fresh one would spend seconds importing torch): glibc first gives
    its free heap pages back to the system (``malloc_trim``), so that memory reused by ``work`` is
    counted when touched again, then Linux restarts the peak (VmHWM) from the current resident set."""
    import ctypes
    import ctypes.util

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak resident set")
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("needs glibc's malloc_trim to measure memory reuse")

    def status(key: str) -> int:
        with open("/proc/self/status") as fh:
            return int(fh.read().split(key + ":")[1].split()[0]) * 1024

    trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    start = status("VmRSS")
    work()
    return status("VmHWM") - start


def _bmp_folder(root: Path, count: int, side: int) -> tuple[Path, torch.Tensor]:
    """``count`` different side×side RGB BMPs in 4 class folders (BMP: written in no time), and
    the images they hold (N×3×side×side): one random picture whose bottom-left pixels carry the
    image's number (blue: low byte, green: high byte) and its class (the next pixel's green)."""
    picture = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "BMP")
    template = bytearray(buffer.getvalue())
    pixels = int.from_bytes(template[10:14], "little")  # rows bottom-up, pixels as B, G, R
    for label in range(4):
        (root / f"c{label}").mkdir(parents=True)
    for i in range(count):
        data = bytearray(template)
        data[pixels:pixels + 5] = bytes([i & 255, i >> 8, 0, 0, 60 * (i % 4)])
        (root / f"c{i % 4}" / f"{i:05d}.bmp").write_bytes(data)
    expected = torch.from_numpy(picture).permute(2, 0, 1).repeat(count, 1, 1, 1)
    number = torch.arange(count)
    expected[:, :, side - 1, 0] = torch.stack([number * 0, number >> 8, number & 255], dim=1).to(torch.uint8)
    expected[:, 1, side - 1, 1], expected[:, 2, side - 1, 1] = (60 * (number % 4)).to(torch.uint8), 0
    return root, expected


def test_prepare_keeps_its_memory_bounded_whatever_the_size_of_the_data_set(tmp_path, monkeypatch):
    """1,500 images of 3×96×96 (41 MB decoded) prepared with 256 kB chunks: the peak resident
    memory grows by less than 10 MB (the one-shot prepare held the set three times over; decoding
    into memory instead of into the store grows it by over 100 MB), and every image is in the
    prepared store exactly once, with its label."""
    count, side, limit = 1500, 96, 10 << 20
    assert count * 3 * side * side > 3.9 * limit  # the decoded set is several times the limit
    big, expected = _bmp_folder(tmp_path / "big", count, side)
    small, _ = _bmp_folder(tmp_path / "small", 16, side)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(store, "CHUNK_BYTES", 256 << 10)

    def prepare(folder: Path) -> None:
        params = parse_params({"data": {"name": "imagefolder", "image_size": side, "imagefolder": {"path": str(folder)}}})
        pipeline.download(params)
        pipeline.prepare(params)

    prepare(small)  # warm-up: every module and code path prepare uses is loaded before measuring
    growth = _peak_growth(lambda: prepare(big))
    assert growth < limit, f"prepare's peak resident memory grew by {growth / 2**20:.1f} MB"

    data = load_prepared(paths.PREPARED_DIR)
    seen = []
    for split in SPLITS:
        images, labels = getattr(data, split).images, getattr(data, split).labels
        number = images[:, 2, side - 1, 0].long() + 256 * images[:, 1, side - 1, 0].long()
        assert torch.equal(images, expected[number]) and torch.equal(labels, number % 4), split
        seen += number.tolist()
    assert sorted(seen) == list(range(count))
