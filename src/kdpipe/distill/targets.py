"""Where the teacher's logits for a batch come from: the teacher run online, or a cache of
its logits on exactly the views the student sees (see the teacher_targets stage).

Both go through :meth:`OnlineTeacher.forward`: the teacher_targets stage computes the cache
by calling an :class:`OnlineTeacher` on the very batches distillation will draw (same
order, views, batch size, memory format and precision), so :class:`CachedTeacher` returns,
bit for bit, what the online teacher would have returned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from kdpipe.distill.base import BatchContext, FrozenTeacher
from kdpipe.errors import KdpipeError

if TYPE_CHECKING:
    from kdpipe.runtime import Runtime


class TeacherLogits(nn.Module):
    """Interface: ``targets(images, batch) -> teacher logits`` for the student's batch."""

    def forward(self, images: torch.Tensor, batch: BatchContext) -> torch.Tensor:
        raise NotImplementedError


class OnlineTeacher(TeacherLogits):
    """Runs the frozen teacher on the student's batch.

    With a ``runtime``, the teacher runs in the precision :meth:`Runtime.for_model` picks
    for *the teacher* (e.g. bf16 for ResNet-18 on 32×32 images while the small student
    trains in float32), whatever autocast the caller is in, and returns float32 logits.
    Without one it runs under the caller's autocast (and returns the dtype it produced).
    """

    def __init__(self, teacher: nn.Module, runtime: Runtime | None = None) -> None:
        super().__init__()
        self.teacher = teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        self.runtime = runtime
        self._teacher_runtime: Runtime | None = None

    def teacher_runtime(self, input_shape) -> Runtime | None:
        if self.runtime is not None and self._teacher_runtime is None:
            self._teacher_runtime = self.runtime.for_model(self.teacher.model, tuple(input_shape))
        return self._teacher_runtime

    def forward(self, images, batch):
        runtime = self.teacher_runtime(images.shape[1:])
        if runtime is None:
            return self.teacher(images)
        with runtime.precision():
            return self.teacher(images).float()


class CachedTeacher(TeacherLogits):
    """Teacher logits looked up by (epoch, indices) in an epochs × N × classes float32 table.

    ``logits`` may be a memory-mapped numpy array (``np.load(..., mmap_mode="r")``): a batch
    reads only its own rows.
    """

    def __init__(self, logits: np.ndarray | torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.epochs, self.size, self.num_classes = (int(d) for d in logits.shape)

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
