"""In-memory batches: the data set stays a uint8 tensor; each batch is gathered,
augmented with :mod:`kdpipe.data.views` and normalised in a few tensor ops."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kdpipe.data.prepare import Split
from kdpipe.data.views import apply_views, make_views


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled order of one epoch: a function of (seed, epoch) only."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=gen)


@dataclass
class Normalizer:
    mean: torch.Tensor  # 1×C×1×1, 0..1 scale
    std: torch.Tensor

    @classmethod
    def from_meta(cls, mean: list[float], std: list[float], device: torch.device | str = "cpu") -> "Normalizer":
        shape = (1, len(mean), 1, 1)
        return cls(
            torch.tensor(mean, device=device).view(shape) * 255.0,
            torch.tensor(std, device=device).view(shape) * 255.0,
        )

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() - self.mean) / self.std


@dataclass
class Batch:
    indices: torch.Tensor  # positions in the split, for reproducing views
    images: torch.Tensor  # normalised float N×C×H×W
    labels: torch.Tensor


def train_batches(
    split: Split,
    batch_size: int,
    seed: int,
    epoch: int,
    pad: int,
    flip: bool,
    normalize: Normalizer,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Iterator[Batch]:
    """Shuffled, augmented batches of one epoch; deterministic in (seed, epoch)."""
    order = epoch_order(seed, epoch, len(split))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        dev_idx = idx.to(split.images.device)
        raw = split.images[dev_idx]
        if pad > 0 or flip:
            raw = apply_views(raw, make_views(seed, epoch, idx, pad, flip), pad)
        x = normalize(raw).contiguous(memory_format=memory_format)
        yield Batch(idx, x, split.labels[dev_idx])


def eval_batches(
    split: Split,
    batch_size: int,
    normalize: Normalizer,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Iterator[Batch]:
    """Unaugmented batches in order."""
    for start in range(0, len(split), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(split)))
        x = normalize(split.images[start : start + batch_size]).contiguous(memory_format=memory_format)
        yield Batch(idx, x, split.labels[start : start + batch_size])
