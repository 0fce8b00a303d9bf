"""Batches gathered by index: the data set stays a uint8 tensor (on the CPU: mapped from
data/prepared, so it need not fit in memory); each batch is gathered, augmented with
:mod:`kdpipe.data.views` (crop, flip and, with ``data.augment.mix``, MixUp or CutMix with soft
labels) and normalised in a few tensor ops."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kdpipe.data.prepare import Split
from kdpipe.distributed import SINGLE, Distributed
from kdpipe.data.views import MIX_KINDS, apply_mix, apply_views, epoch_order, make_mix, make_views, mix_labels


def place_split(split: Split, device: torch.device, max_share: float = 0.25) -> Split:
    """The whole split on ``device`` when it fits (on a GPU: at most ``max_share`` of the free
    memory), else left where it is on the CPU (for prepared data: mapped from its file, never
    copied whole into memory): each batch is then gathered there and copied through pinned
    memory without blocking (see :func:`train_batches`)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if split.images.numel() * split.images.element_size() > max_share * free:
            return Split(split.images.cpu(), split.labels.cpu())
    return Split(split.images.to(device), split.labels.to(device))


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
    labels: torch.Tensor  # class indices (N, int64), or soft targets (N×K float32) when mixing
    total: int = 0  # images in the global batch this one is a share of (runtime.nproc > 1); 0: this batch


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
    mix: str = "none",
    mix_alpha: float = 1.0,
    num_classes: int | None = None,
    group: Distributed = SINGLE,
) -> Iterator[Batch]:
    """Shuffled, augmented batches of one epoch; deterministic in (seed, epoch).

    Every view of the epoch is drawn up front in one vectorised hash (views depend only on
    (seed, epoch, index), so this equals drawing them batch by batch). Images stay uint8
    until the last step: the gather, crop and flip move a quarter of the bytes float would.
    When ``split`` lives on the CPU and ``device`` is a GPU, each uint8 batch is copied
    through pinned memory without blocking (augmentation then runs on the GPU).

    With ``mix`` ``"mixup"`` or ``"cutmix"`` each image is mixed with its partner's view of
    the same epoch (:func:`kdpipe.data.views.make_mix`, also drawn up front: a function of
    (seed, epoch, index) only) and the labels are soft targets over ``num_classes`` classes.

    In a training group (``group``, ``runtime.nproc`` > 1) every process walks the same order
    and yields only its share of each global batch of ``batch_size`` images.
    """
    if mix not in MIX_KINDS:
        raise ValueError(f"mix must be one of {', '.join(MIX_KINDS)}, got {mix!r}")
    if mix != "none" and not num_classes:
        raise ValueError("mixing needs num_classes for its soft labels")
    device = torch.device(device) if device is not None else split.images.device
    source = split.images.device
    order = epoch_order(seed, epoch, len(split))

    def at_source(idx: torch.Tensor) -> torch.Tensor:
        return idx if source.type == "cpu" else idx.to(source)  # one copy per epoch, not per batch

    def fetch(src_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, labels = split.images[src_idx], split.labels[src_idx]
        if source.type == "cpu" and device.type == "cuda":  # data did not fit on the GPU
            return raw.pin_memory().to(device, non_blocking=True), labels.pin_memory().to(device, non_blocking=True)
        if source.type != device.type:
            return raw.to(device), labels.to(device)
        return raw, labels

    def on_device(x):
        return x if x is None or device.type == "cpu" else x.to(device)

    order_at_source = at_source(order)
    augmenting = pad > 0 or flip
    views = on_device(make_views(seed, epoch, order, pad, flip) if augmenting else None)
    mixing = on_device(make_mix(seed, epoch, order, len(split), mix, mix_alpha, tuple(split.images.shape[-2:]))
                       if mix != "none" else None)
    if mixing is not None:
        partner_at_source = at_source(mixing.partner)
        partner_views = on_device(make_views(seed, epoch, mixing.partner, pad, flip) if augmenting else None)
    for start in range(0, len(order), batch_size):
        total = min(batch_size, len(order) - start)
        rows = group.shard(torch.arange(start, start + total)) if group.active else slice(start, start + batch_size)
        idx = order[rows]
        raw, labels = fetch(order_at_source[rows])
        if views is not None:
            raw = apply_views(raw, views[rows], pad)
        if mixing is not None:
            other, other_labels = fetch(partner_at_source[rows])
            if partner_views is not None:
                other = apply_views(other, partner_views[rows], pad)
            mixed = mixing[rows]
            raw, labels = apply_mix(raw, other, mixed), mix_labels(labels, other_labels, mixed, num_classes)
        x = normalize(raw.contiguous(memory_format=memory_format))
        yield Batch(idx, x, labels, total)


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
    mix: str = "none"  # none | mixup | cutmix (data.augment.mix)
    mix_alpha: float = 1.0  # λ ~ Beta(mix_alpha, mix_alpha)
    num_classes: int = 0  # for the soft labels of mixed batches
    group: Distributed = SINGLE  # the training processes sharing each batch (runtime.nproc)

    @classmethod
    def for_run(cls, data, batch_size: int, augment, seed: int, runtime, place: bool = True,
                group: Distributed = SINGLE) -> "TrainingBatches":
        """The batches a run with ``batch_size``, ``augment`` (data.augment) and ``seed`` trains on
        (``data``: :class:`~kdpipe.data.prepare.PreparedData`; ``runtime``: its device and layout).
        ``place=False`` leaves the images where they are: enough for :meth:`describe`."""
        pad, flip = augmentation(augment, data.meta)
        split = place_split(data.train, runtime.device) if place else data.train
        return cls(split, batch_size, seed, pad, flip,
                   Normalizer.from_meta(data.meta["mean"], data.meta["std"], runtime.device),
                   runtime.memory_format, runtime.device, augment.mix, float(augment.mix_alpha), data.num_classes,
                   group)

    @property
    def steps(self) -> int:
        """Batches per epoch (global batches: the same for every process of a group)."""
        return -(-len(self.split) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        return train_batches(self.split, self.batch_size, self.seed, epoch, self.pad, self.flip, self.normalize,
                             self.memory_format, self.device, self.mix, self.mix_alpha, self.num_classes, self.group)

    def describe(self) -> dict:
        """Everything that decides the batches, besides the training images themselves
        (``mix_alpha`` only when mixing: null otherwise, as it then decides nothing)."""
        return {"seed": self.seed, "batch_size": self.batch_size, "crop_padding": self.pad, "flip": self.flip,
                "mix": self.mix, "mix_alpha": self.mix_alpha if self.mix != "none" else None,
                "channels_last": self.memory_format == torch.channels_last, "device": self.device.type}
