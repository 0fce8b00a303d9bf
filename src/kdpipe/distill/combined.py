"""Logit KD + attention transfer: Hinton's logit KD (``kd.alpha`` soft term at
``kd.temperature`` + ``1 - kd.alpha`` labels) plus the attention-transfer term of
:mod:`kdpipe.distill.attention` with this method's own ``kd.combined.beta`` and ``p``.

The teacher runs live for its feature maps. Its logits come from the teacher targets when
they are cached, else from that same live pass (no second teacher forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdpipe.distill.base import METHODS, MethodInputs, MethodSettings, Objective
from kdpipe.distill.features import AttentionTerms, AttentionTermSettings
from kdpipe.distill.losses import label_ce, soft_kl
from kdpipe.validation import derived


@dataclass(frozen=True)
class CombinedSettings(AttentionTermSettings, MethodSettings):
    """``kd.combined``: the attention term's beta and p, plus the shared values logit KD reads."""

    temperature: float = derived()
    alpha: float = derived()
    teacher_targets: Literal["cached", "online"] = derived()


@METHODS.register("combined", CombinedSettings, needs_teacher_module=True)
class CombinedKD(Objective):
    def __init__(self, inputs: MethodInputs, settings: CombinedSettings) -> None:
        super().__init__(inputs.student)
        self.targets = inputs.teacher
        self.terms = AttentionTerms(inputs.student, inputs.teacher.require_module("combined"),
                                    settings.beta, settings.p)
        self.temperature, self.alpha = settings.temperature, settings.alpha
        self.label_smoothing = inputs.label_smoothing

    def forward_train(self, images, labels, batch):
        logits, t_logits, at = self.terms(self.student, images)
        if self.targets.precomputed:
            t_logits = self.targets(images, batch)
        return logits, {
            "kd": self.alpha * soft_kl(logits, t_logits, self.temperature),
            "ce": (1 - self.alpha) * label_ce(logits, labels, self.label_smoothing),
            "at": at,
        }
