"""Hinton KD: alpha · soft term + (1 - alpha) · cross-entropy on the labels.

With ``kd.logit.logit_standardization`` (Sun et al., CVPR 2024) the soft term is taken between
the z-scored logits of student and teacher (:func:`kdpipe.distill.losses.standardize`) at the
same ``kd.temperature``; the label term always uses the raw logits. The paper pairs standardised
logits with a lower base temperature (T = 2 was typical on CIFAR-100); kdpipe keeps
``kd.temperature``, so set it with ``-S kd.temperature=2`` when comparing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdpipe.distill.base import METHODS, MethodInputs, MethodSettings, Objective
from kdpipe.distill.losses import label_ce, soft_kl, standardized_pair
from kdpipe.validation import derived


@dataclass(frozen=True)
class LogitSettings(MethodSettings):
    logit_standardization: bool = False  # z-score each sample's logits before the softmax (Sun et al. 2024)
    temperature: float = derived()
    alpha: float = derived()
    teacher_targets: Literal["cached", "online"] = derived()
    teacher_flip: bool = derived()


@METHODS.register("logit", LogitSettings)
class LogitKD(Objective):
    def __init__(self, inputs: MethodInputs, settings: LogitSettings) -> None:
        super().__init__(inputs.student)
        self.targets = inputs.teacher
        self.temperature, self.alpha = settings.temperature, settings.alpha
        self.standardize = settings.logit_standardization
        self.label_smoothing = inputs.label_smoothing

    def forward_train(self, images, labels, batch):
        logits = self.student(images)
        teacher_logits = self.targets(images, batch)
        s, t = standardized_pair(logits, teacher_logits, self.standardize)
        return logits, {
            "kd": self.alpha * soft_kl(s, t, self.temperature),
            "ce": (1 - self.alpha) * label_ce(logits, labels, self.label_smoothing),
        }
