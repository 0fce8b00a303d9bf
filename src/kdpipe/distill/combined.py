"""Logit KD + attention transfer: Hinton's logit KD (``kd.alpha`` soft term at
``kd.temperature`` + ``1 - kd.alpha`` labels) plus the attention-transfer term of
:mod:`kdpipe.distill.attention` with this method's own ``kd.combined.beta`` and ``p``.

The teacher runs live for its feature maps. Its logits come from the teacher targets, cached
or online (online, that is a second teacher pass, in the teacher's own precision, so cached
and online distillation train the same student bit for bit).
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
    teacher_flip: bool = derived()


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
        logits, _, at = self.terms(self.student, images)
        # the logits through the teacher-logits source, cached or online: both run the teacher in
        # its own precision (the live feature pass runs in the student's), so the two agree bit for bit
        t_logits = self.targets(images, batch)
        return logits, {
            "kd": self.alpha * soft_kl(logits, t_logits, self.temperature),
            "ce": (1 - self.alpha) * label_ce(logits, labels, self.label_smoothing),
            "at": at,
        }
