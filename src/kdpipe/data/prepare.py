"""Seeded stratified splits, normalisation statistics and the one prepared on-disk format.

``data/prepared/`` holds, for each split (train, val, test), ``<split>_images.npy`` (uint8
N×C×H×W) and ``<split>_labels.npy`` (int64 N), plus ``meta.json`` (class names, channels, size,
mean/std, whether a horizontal flip keeps the label). Every later stage reads only this.

The images are written a chunk at a time and read memory-mapped (:mod:`kdpipe.data.store`):
neither preparing nor training needs the data set to fit in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.data.sources import RawDataset
from kdpipe.data import store
from kdpipe.data.store import ImageRows, open_images, take, write_npy
from kdpipe.errors import KdpipeError
from kdpipe.io import atomic_dir, read_json, write_json

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    # uint8 N×C×H×W: loaded, a tensor (mapped from data/prepared, or in memory); while being
    # prepared, possibly ImageRows still in the scratch store
    images: torch.Tensor
    labels: torch.Tensor  # int64 N

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class PreparedData:
    train: Split
    val: Split
    test: Split
    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])


def stratified_split(
    labels: torch.Tensor, fractions: list[float], seed: int
) -> list[torch.Tensor]:
    """Split indices of ``labels`` into len(fractions)+1 parts, class by class.

    Part i gets round(fraction_i × class count) of every class; the last part gets the
    rest. Deterministic for a given seed.
    """
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        start = 0
        for i, frac in enumerate(fractions):
            take = int(round(frac * len(idx)))
            parts[i].append(idx[start : start + take])
            start += take
        parts[-1].append(idx[start:])
    return [torch.sort(torch.cat(p)).values for p in parts]


def split_dataset(raw: RawDataset, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Split]:
    """Train/val/test splits: a split the source gives (an official test split, a user's val/
    folder) is kept; the missing ones are drawn from ``train``, class by class.

    Tensors are gathered now; :class:`~kdpipe.data.store.ImageRows` only select their rows
    (read when the split is written)."""
    images, labels = raw.train_images, raw.train_labels
    has_test = raw.test_images is not None and raw.test_labels is not None
    has_val = raw.val_images is not None and raw.val_labels is not None
    if has_test and has_val:
        splits = {"test": Split(raw.test_images, raw.test_labels), "val": Split(raw.val_images, raw.val_labels)}
        train_idx = torch.arange(len(labels))
    elif has_test:
        val_idx, train_idx = stratified_split(labels, [val_fraction], seed)
        splits = {"test": Split(raw.test_images, raw.test_labels), "val": Split(take(images, val_idx), labels[val_idx])}
    elif has_val:
        test_idx, train_idx = stratified_split(labels, [test_fraction], seed)
        splits = {"test": Split(take(images, test_idx), labels[test_idx]), "val": Split(raw.val_images, raw.val_labels)}
    else:
        test_idx, val_idx, train_idx = stratified_split(labels, [test_fraction, val_fraction], seed)
        splits = {"test": Split(take(images, test_idx), labels[test_idx]),
                  "val": Split(take(images, val_idx), labels[val_idx])}
    splits["train"] = Split(take(images, train_idx), labels[train_idx])
    for name in SPLITS:
        if len(splits[name]) == 0:
            raise KdpipeError(
                f"the {name} split is empty; use more data or change data.val_fraction/data.test_fraction."
            )
    return splits


class ChannelSums:
    """Exact per-channel sums of uint8 pixels and of their squares, added a block at a time."""

    def __init__(self) -> None:
        self.totals: list[int] = []
        self.squares: list[int] = []
        self.pixels = 0  # per channel

    def add(self, images: torch.Tensor | np.ndarray) -> None:
        x = torch.as_tensor(images)
        n, channels, height, width = x.shape
        if not self.totals:
            self.totals, self.squares = [0] * channels, [0] * channels
        # widened to int64 a piece at a time: at most a chunk's worth of bytes (store.CHUNK_BYTES)
        for piece in x.split(max(1, store.CHUNK_BYTES // 8 // max(1, channels * height * width))):
            wide = piece.to(torch.int64)
            for c in range(channels):
                self.totals[c] += int(wide[:, c].sum())
                self.squares[c] += int(wide[:, c].square().sum())
        self.pixels += n * height * width

    def stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (sample) std, in the 0..1 range, rounded to 6 decimals."""
        n = self.pixels
        mean = [t / (n * 255) for t in self.totals]
        # Python integers: n*Σx² − (Σx)² is exact, so the variance is as exact as one division
        std = [max(math.sqrt((n * q - t * t) / (n * (n - 1))) / 255, 1e-3) for t, q in zip(self.totals, self.squares)]
        return [round(m, 6) for m in mean], [round(s, 6) for s in std]


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (sample) std of uint8 images, in the 0..1 range.

    Exact integer sums taken piece by piece: a float64 copy of the images would need 8× their
    memory (1.4 GB for 14,000 training images of 3×64×64), twice over for the std.
    """
    sums = ChannelSums()
    sums.add(images)
    return sums.stats()


def class_counts(labels: torch.Tensor, class_names: list[str]) -> dict[str, int]:
    counts = torch.bincount(labels, minlength=len(class_names)).tolist()
    return {name: int(c) for name, c in zip(class_names, counts)}


def images_file(folder: Path, split: str) -> Path:
    return folder / f"{split}_images.npy"


def labels_file(folder: Path, split: str) -> Path:
    return folder / f"{split}_labels.npy"


def _write_split(folder: Path, name: str, split: Split, sums: ChannelSums | None = None) -> None:
    write_npy(images_file(folder, name), split.images, on_chunk=sums.add if sums is not None else None)
    np.save(labels_file(folder, name), np.ascontiguousarray(split.labels.numpy().astype(np.int64, copy=False)))


def save_prepared(out_dir: Path, splits: dict[str, Split], raw: RawDataset, dataset: str) -> dict[str, Any]:
    """Write the prepared format, a chunk at a time, and return ``meta`` (also written as
    meta.json). The folder is replaced as a whole, and only once everything is written."""
    _, channels, height, _ = ImageRows.of(splits["train"].images).shape
    sums = ChannelSums()
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:  # train first: its statistics are summed on the way to the disk
            _write_split(tmp, name, splits[name], sums if name == "train" else None)
        mean, std = sums.stats()
        meta = {
            "dataset": dataset,
            "class_names": raw.class_names,
            "channels": int(channels),
            "image_size": int(height),
            "mean": mean,
            "std": std,
            "flip": bool(raw.flip),
            "sizes": {name: len(splits[name]) for name in SPLITS},
        }
        write_json(tmp / "meta.json", meta)
    return meta


def write_prepared(out_dir: str | Path, data: PreparedData) -> None:
    """``data`` (in memory) in the prepared format, as the prepare stage would leave it."""
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            _write_split(tmp, name, getattr(data, name))
        write_json(tmp / "meta.json", data.meta)


def _load_labels(path: Path, rebuild: str) -> torch.Tensor:
    if not path.is_file():
        raise KdpipeError(f"{path} not found; {rebuild}.")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise KdpipeError(f"{path} is truncated or corrupt ({str(exc).splitlines()[0][:120]}); {rebuild}.") from None
    if labels.dtype != np.int64 or labels.ndim != 1:
        raise KdpipeError(f"{path} does not hold int64 labels (found {labels.dtype} {labels.shape}); {rebuild}.")
    return torch.from_numpy(labels)


def load_prepared(prepared_dir: str | Path) -> PreparedData:
    """The prepared data: labels in memory, images mapped from their files (read when used)."""
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "meta.json").exists():
        raise KdpipeError(f"{prepared_dir}/meta.json not found; run the prepare stage first (dvc repro prepare).")
    splits = {}
    rebuild = "rebuild it with `dvc repro -f -s prepare`"
    if (prepared_dir / "train.pt").exists() and not images_file(prepared_dir, "train").exists():
        raise KdpipeError(f"{prepared_dir} is in the format of an older kdpipe (train.pt); {rebuild}.")
    for name in SPLITS:
        images = open_images(images_file(prepared_dir, name), rebuild)
        labels = _load_labels(labels_file(prepared_dir, name), rebuild)
        if labels.shape != images.shape[:1]:
            raise KdpipeError(f"{images_file(prepared_dir, name)} holds {images.shape[0]} images but "
                              f"{labels_file(prepared_dir, name)} {labels.shape[0]} labels; {rebuild}.")
        splits[name] = Split(images, labels)
    try:
        meta = read_json(prepared_dir / "meta.json")
    except (ValueError, UnicodeDecodeError) as exc:
        raise KdpipeError(f"{prepared_dir / 'meta.json'} is not valid JSON ({exc}); {rebuild}.") from None
    return PreparedData(meta=meta, **splits)
