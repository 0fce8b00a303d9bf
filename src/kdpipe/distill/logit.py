"""Hinton KD: alpha · soft term + (1 - alpha) · cross-entropy on the labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdpipe.distill.base import METHODS, MethodInputs, MethodSettings, Objective
from kdpipe.distill.losses import label_ce, soft_kl
from kdpipe.validation import derived


@dataclass(frozen=True)
class LogitSettings(MethodSettings):
    temperature: float = derived()
    alpha: float = derived()
    teacher_targets: Literal["cached", "online"] = derived()


@METHODS.register("logit", LogitSettings)
class LogitKD(Objective):
    def __init__(self, inputs: MethodInputs, settings: LogitSettings) -> None:
        super().__init__(inputs.student)
        self.targets = inputs.teacher
        self.temperature, self.alpha = settings.temperature, settings.alpha
        self.label_smoothing = inputs.label_smoothing

    def forward_train(self, images, labels, batch):
        logits = self.student(images)
        teacher_logits = self.targets(images, batch)
        return logits, {
            "kd": self.alpha * soft_kl(logits, teacher_logits, self.temperature),
            "ce": (1 - self.alpha) * label_ce(logits, labels, self.label_smoothing),
        }
