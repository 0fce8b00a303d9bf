"""Seeded stratified splits, normalisation statistics and the one prepared on-disk format.

``data/prepared/`` holds ``train.pt``, ``val.pt``, ``test.pt`` (uint8 N×C×H×W images and
int64 labels) and ``meta.json`` (class names, channels, size, mean/std, whether a
horizontal flip keeps the label). Every later stage reads only this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdpipe.data.sources import RawDataset
from kdpipe.errors import KdpipeError
from kdpipe.io import load_torch, read_json, save_torch, write_json

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: torch.Tensor  # uint8 N×C×H×W
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
    folder) is kept; the missing ones are drawn from ``train``, class by class."""
    images, labels = raw.train_images, raw.train_labels
    has_test = raw.test_images is not None and raw.test_labels is not None
    has_val = raw.val_images is not None and raw.val_labels is not None
    if has_test and has_val:
        splits = {"test": Split(raw.test_images, raw.test_labels), "val": Split(raw.val_images, raw.val_labels)}
        train_idx = torch.arange(len(labels))
    elif has_test:
        val_idx, train_idx = stratified_split(labels, [val_fraction], seed)
        splits = {"test": Split(raw.test_images, raw.test_labels), "val": Split(images[val_idx], labels[val_idx])}
    elif has_val:
        test_idx, train_idx = stratified_split(labels, [test_fraction], seed)
        splits = {"test": Split(images[test_idx], labels[test_idx]), "val": Split(raw.val_images, raw.val_labels)}
    else:
        test_idx, val_idx, train_idx = stratified_split(labels, [test_fraction, val_fraction], seed)
        splits = {"test": Split(images[test_idx], labels[test_idx]), "val": Split(images[val_idx], labels[val_idx])}
    splits["train"] = Split(images[train_idx], labels[train_idx])
    for name in SPLITS:
        if len(splits[name]) == 0:
            raise KdpipeError(
                f"the {name} split is empty; use more data or change data.val_fraction/data.test_fraction."
            )
    return splits


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (sample) std of uint8 images, in the 0..1 range.

    Exact integer sums taken chunk by chunk: a float64 copy of the images would need 8× their
    memory (1.4 GB for 14,000 training images of 3×64×64), twice over for the std.
    """
    n = images.shape[0] * images.shape[2] * images.shape[3]
    totals, squares = [0] * images.shape[1], [0] * images.shape[1]
    for chunk in images.split(1024):
        x = chunk.to(torch.int64)
        for c in range(images.shape[1]):
            totals[c] += int(x[:, c].sum())
            squares[c] += int(x[:, c].square().sum())
    mean = [t / (n * 255) for t in totals]
    # Python integers: n*Σx² − (Σx)² is exact, so the variance is as exact as one division
    std = [max(math.sqrt((n * q - t * t) / (n * (n - 1))) / 255, 1e-3) for t, q in zip(totals, squares)]
    return [round(m, 6) for m in mean], [round(s, 6) for s in std]


def class_counts(labels: torch.Tensor, class_names: list[str]) -> dict[str, int]:
    counts = torch.bincount(labels, minlength=len(class_names)).tolist()
    return {name: int(c) for name, c in zip(class_names, counts)}


def save_prepared(out_dir: Path, splits: dict[str, Split], raw: RawDataset, dataset: str) -> dict[str, Any]:
    """Write the prepared format and return ``meta`` (also written as meta.json)."""
    mean, std = channel_stats(splits["train"].images)
    _, channels, height, width = splits["train"].images.shape
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
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        save_torch(out_dir / f"{name}.pt", {"images": splits[name].images.contiguous(), "labels": splits[name].labels})
    write_json(out_dir / "meta.json", meta)
    return meta


def load_prepared(prepared_dir: str | Path) -> PreparedData:
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "meta.json").exists():
        raise KdpipeError(f"{prepared_dir}/meta.json not found; run the prepare stage first (dvc repro prepare).")
    splits = {}
    rebuild = "rebuild it with `dvc repro -f -s prepare`"
    for name in SPLITS:
        path = prepared_dir / f"{name}.pt"
        raw = load_torch(path, rebuild)
        images, labels = (raw.get("images"), raw.get("labels")) if isinstance(raw, dict) else (None, None)
        if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor) and images.dtype == torch.uint8
                and images.ndim == 4 and labels.shape == images.shape[:1]):
            raise KdpipeError(f"{path} is not a prepared split (uint8 N×C×H×W images and N labels); {rebuild}.")
        splits[name] = Split(images, labels)
    try:
        meta = read_json(prepared_dir / "meta.json")
    except (ValueError, UnicodeDecodeError) as exc:
        raise KdpipeError(f"{prepared_dir / 'meta.json'} is not valid JSON ({exc}); {rebuild}.") from None
    return PreparedData(meta=meta, **splits)
