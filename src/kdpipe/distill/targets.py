"""Where the teacher's logits for a batch come from: the teacher run online, or a cache of
its logits on exactly the views the student sees (see the teacher_targets stage).

Every source is a :class:`TeacherLogits`: ``targets(images, batch)`` gives the logits, and
``targets.module`` is the live (frozen) teacher when one runs, ``None`` for a cache. Methods
that read feature maps need the live teacher (:meth:`TeacherLogits.require_module`).

Both sources go through :meth:`OnlineTeacher.forward`: the teacher_targets stage computes the
cache by calling an :class:`OnlineTeacher` on the very batches distillation will draw (same
order, views, batch size, memory format and precision: :class:`kdpipe.data.loader.TrainingBatches`), so
:class:`CachedTeacher` returns, bit for bit, what the online teacher would have returned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from kdpipe.errors import KdpipeError

if TYPE_CHECKING:
    from kdpipe.distill.base import BatchContext
    from kdpipe.runtime import Runtime


class FrozenTeacher(nn.Module):
    """A teacher that stays in eval mode and never receives gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def flip_mean(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model``'s float32 logits averaged over each image and its mirror image (one pass over
    both): a teacher that is better on data whose classes survive a left-right flip (on the
    CIFAR-10 slice's validation split, 76.9% against 74.4% for the fast_cnn teacher alone)."""
    n = images.shape[0]
    both = model(torch.cat([images, images.flip(-1)])).float()
    return (both[:n] + both[n:]) / 2


class TeacherLogits(nn.Module):
    """Interface: ``targets(images, batch) -> teacher logits`` for the student's batch, and
    ``module``: the live teacher, or None when the logits are precomputed."""

    def __init__(self, module: nn.Module | None = None) -> None:
        super().__init__()
        self.module: FrozenTeacher | None = None
        if module is not None:
            self.module = module if isinstance(module, FrozenTeacher) else FrozenTeacher(module)

    @property
    def precomputed(self) -> bool:
        return self.module is None

    def require_module(self, method: str) -> FrozenTeacher:
        if self.module is None:
            raise KdpipeError(f"kd method {method!r} reads the teacher's feature maps, so the teacher must run "
                              "during distillation; it was given only precomputed logits.")
        return self.module

    def forward(self, images: torch.Tensor, batch: BatchContext) -> torch.Tensor:
        raise NotImplementedError


class OnlineTeacher(TeacherLogits):
    """Runs the frozen teacher on the student's batch.

    With a ``runtime``, the teacher runs in the precision :meth:`Runtime.for_model` picks
    for *the teacher* (e.g. bf16 for ResNet-18 on 32×32 images while the small student
    trains in float32), whatever autocast the caller is in, and returns float32 logits.
    Without one it runs under the caller's autocast (and returns the dtype it produced).
    With ``flip``, its logits are :func:`flip_mean`'s (``kd.teacher_flip``), in float32.
    """

    def __init__(self, teacher: nn.Module, runtime: Runtime | None = None, flip: bool = False) -> None:
        super().__init__(teacher)
        self.runtime = runtime
        self.flip = flip
        self._teacher_runtime: Runtime | None = None

    @property
    def teacher(self) -> FrozenTeacher:
        return self.module

    def teacher_runtime(self, input_shape) -> Runtime | None:
        if self.runtime is not None and self._teacher_runtime is None:
            self._teacher_runtime = self.runtime.for_model(self.module.model, tuple(input_shape))
        return self._teacher_runtime

    def _teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return flip_mean(self.module, images) if self.flip else self.module(images)

    def forward(self, images, batch):
        runtime = self.teacher_runtime(images.shape[1:])
        if runtime is None:
            return self._teacher_logits(images)
        with runtime.precision():
            return self._teacher_logits(images).float()


class CachedTeacher(TeacherLogits):
    """Teacher logits looked up by (epoch, indices) in an epochs × N × classes float32 table.

    ``logits`` may be a memory-mapped numpy array (``np.load(..., mmap_mode="r")``): a batch
    reads only its own rows. ``module`` optionally carries the live teacher too, for methods
    that read its feature maps but take its logits from the cache.
    """

    def __init__(self, logits: np.ndarray | torch.Tensor, module: nn.Module | None = None) -> None:
        super().__init__(module)
        self.logits = logits
        self.epochs, self.size, self.num_classes = (int(d) for d in logits.shape)

    @property
    def precomputed(self) -> bool:
        return True

    def forward(self, images, batch):
        if not 0 <= batch.epoch < self.epochs:
            raise KdpipeError(
                f"the cached teacher targets cover epochs 0..{self.epochs - 1}, not epoch {batch.epoch}; "
                "re-run the teacher_targets stage (dvc repro) for the student's epochs."
            )
        idx = batch.indices.cpu()
        if isinstance(self.logits, torch.Tensor):
            rows = self.logits[batch.epoch].index_select(0, idx)
        else:
            rows = torch.from_numpy(np.ascontiguousarray(self.logits[batch.epoch][idx.numpy()]))
        if images.device.type == "cuda":
            return rows.pin_memory().to(images.device, non_blocking=True)
        return rows.to(images.device)
