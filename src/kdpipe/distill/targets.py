"""Where the teacher's logits for a batch come from: the teacher run online, or a cache of
its logits on exactly the views the student sees (see the teacher_targets stage)."""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.distill.base import BatchContext, FrozenTeacher


class TeacherLogits(nn.Module):
    """Interface: ``targets(images, batch) -> teacher logits`` for the student's batch."""

    def forward(self, images: torch.Tensor, batch: BatchContext) -> torch.Tensor:
        raise NotImplementedError


class OnlineTeacher(TeacherLogits):
    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)

    def forward(self, images, batch):
        return self.teacher(images)
