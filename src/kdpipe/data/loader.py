"""In-memory batches: the data set stays a uint8 tensor; each batch is gathered,
augmented with :mod:`kdpipe.data.views` and normalised in a few tensor ops."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kdpipe.data.prepare import Split
from kdpipe.data.views import apply_views, make_views


def place_split(split: Split, device: torch.device, max_share: float = 0.25) -> Split:
    """The whole split on ``device`` when it fits (on a GPU: at most ``max_share`` of the free
    memory), else in pinned CPU memory, from which batches are copied without blocking."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if split.images.numel() * split.images.element_size() > max_share * free:
            return Split(split.images.cpu().pin_memory(), split.labels.cpu().pin_memory())
    return Split(split.images.to(device), split.labels.to(device))


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
    indices: torch.Tensor  # positions in the split (CPU int64), for reproducing views
    images: torch.Tensor  # normalised float N×C×H×W
    labels: torch.Tensor


def augmentation(augment, meta: dict) -> tuple[int, bool]:
    """(crop padding, flip) actually applied: a flip only where it keeps the label."""
    return int(augment.crop_padding), bool(augment.flip and meta["flip"])


def train_batches(
    split: Split,
    batch_size: int,
    seed: int,
    epoch: int,
    pad: int,
    flip: bool,
    normalize: Normalizer,
    memory_format: torch.memory_format = torch.contiguous_format,
    device: torch.device | str | None = None,
) -> Iterator[Batch]:
    """Shuffled, augmented batches of one epoch; deterministic in (seed, epoch).

    Every view of the epoch is drawn up front in one vectorised hash (views depend only on
    (seed, epoch, index), so this equals drawing them batch by batch). Images stay uint8
    until the last step: the gather, crop and flip move a quarter of the bytes float would.
    When ``split`` lives on the CPU and ``device`` is a GPU, each uint8 batch is copied
    through pinned memory without blocking (augmentation then runs on the GPU).
    """
    device = torch.device(device) if device is not None else split.images.device
    source = split.images.device
    order = epoch_order(seed, epoch, len(split))
    order_at_source = order if source.type == "cpu" else order.to(source)  # one copy per epoch, not per batch
    views = make_views(seed, epoch, order, pad, flip) if pad > 0 or flip else None
    if views is not None and device.type != "cpu":
        views = views.to(device)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        src_idx = order_at_source[start : start + batch_size]
        raw, labels = split.images[src_idx], split.labels[src_idx]
        if source.type == "cpu" and device.type == "cuda":  # data did not fit on the GPU
            raw, labels = raw.pin_memory().to(device, non_blocking=True), labels.pin_memory().to(device, non_blocking=True)
        elif source.type != device.type:
            raw, labels = raw.to(device), labels.to(device)
        if views is not None:
            raw = apply_views(raw, views[start : start + batch_size], pad)
        x = normalize(raw.contiguous(memory_format=memory_format))
        yield Batch(idx, x, labels)


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


@dataclass(frozen=True)
class TrainingBatches:
    """The one batch pipeline of training: every epoch's shuffled, augmented, normalised
    batches for a run, placed on its device in its memory format.

    The training engine and the teacher_targets stage both draw their batches from here, so
    the cached teacher logits are computed on exactly the batches distillation trains on;
    :meth:`describe` is what the cache records and checks.
    """

    split: Split  # the training split, placed on (or pinned for) the device
    batch_size: int
    seed: int
    pad: int  # crop padding actually applied
    flip: bool  # flips actually applied (only where they keep the label)
    normalize: Normalizer
    memory_format: torch.memory_format
    device: torch.device

    @classmethod
    def for_run(cls, data, batch_size: int, augment, seed: int, runtime) -> "TrainingBatches":
        """The batches a run with ``batch_size``, ``augment`` (data.augment) and ``seed`` trains on
        (``data``: :class:`~kdpipe.data.prepare.PreparedData`; ``runtime``: its device and layout)."""
        pad, flip = augmentation(augment, data.meta)
        return cls(place_split(data.train, runtime.device), batch_size, seed, pad, flip,
                   Normalizer.from_meta(data.meta["mean"], data.meta["std"], runtime.device),
                   runtime.memory_format, runtime.device)

    @property
    def steps(self) -> int:
        """Batches per epoch."""
        return -(-len(self.split) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        return train_batches(self.split, self.batch_size, self.seed, epoch, self.pad, self.flip, self.normalize,
                             self.memory_format, self.device)

    def describe(self) -> dict:
        """Everything that decides the batches, besides the training images themselves."""
        return {"seed": self.seed, "batch_size": self.batch_size, "crop_padding": self.pad, "flip": self.flip,
                "channels_last": self.memory_format == torch.channels_last, "device": self.device.type}
