"""Hinton KD: alpha · soft term + (1 - alpha) · cross-entropy on the labels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdpipe.distill.base import Objective, register
from kdpipe.distill.losses import soft_kl
from kdpipe.distill.targets import TeacherLogits


@register("logit")
class LogitKD(Objective):
    def __init__(self, student: nn.Module, targets: TeacherLogits, temperature: float, alpha: float,
                 label_smoothing: float = 0.0, **_: object) -> None:
        super().__init__(student)
        self.targets = targets
        self.temperature, self.alpha, self.label_smoothing = temperature, alpha, label_smoothing

    def forward_train(self, images, labels, batch):
        logits = self.student(images)
        teacher_logits = self.targets(images, batch)
        return logits, {
            "kd": self.alpha * soft_kl(logits, teacher_logits, self.temperature),
            "ce": (1 - self.alpha) * F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing),
        }
