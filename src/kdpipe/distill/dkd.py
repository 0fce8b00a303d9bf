"""Decoupled knowledge distillation (Zhao et al., CVPR 2022):

    loss = CE(labels) + w(epoch) · (α · TCKD + β · NCKD)

TCKD and NCKD (:func:`kdpipe.distill.losses.dkd_terms`) are each ``T² · KL`` averaged over the
batch at ``kd.temperature``; α = ``kd.dkd.alpha``, β = ``kd.dkd.beta`` (paper, CIFAR-100: 1 and
8). ``w`` is the paper's linear warm-up, ``min((epoch + 1) / warmup_epochs, 1)`` with the
0-based ``batch.epoch`` (mdistiller counts epochs from 1), ``1`` when ``warmup_epochs`` is 0.
``kd.alpha`` is not used. Teacher logits come from ``targets`` (cached or online).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdpipe.config import DkdConfig
from kdpipe.distill.base import Objective, register
from kdpipe.distill.losses import dkd_terms
from kdpipe.distill.targets import TeacherLogits


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


@register("dkd")
class DKD(Objective):
    def __init__(self, student: nn.Module, targets: TeacherLogits, temperature: float, kd=None,
                 dkd_alpha: float | None = None, dkd_beta: float | None = None, warmup_epochs: int | None = None,
                 label_smoothing: float = 0.0, **_: object) -> None:
        """Weights come from ``kd.dkd`` unless given explicitly (``alpha``, logit KD's weight, is ignored)."""
        super().__init__(student)
        cfg = kd.dkd if kd is not None else DkdConfig()
        self.targets, self.temperature, self.label_smoothing = targets, temperature, label_smoothing
        self.dkd_alpha = cfg.alpha if dkd_alpha is None else dkd_alpha
        self.dkd_beta = cfg.beta if dkd_beta is None else dkd_beta
        self.warmup_epochs = cfg.warmup_epochs if warmup_epochs is None else warmup_epochs

    def forward_train(self, images, labels, batch):
        logits = self.student(images)
        tckd, nckd = dkd_terms(logits, self.targets(images, batch), labels, self.temperature)
        w = warmup_factor(batch.epoch, self.warmup_epochs)
        return logits, {
            "ce": F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing),
            "tckd": w * self.dkd_alpha * tckd,
            "nckd": w * self.dkd_beta * nckd,
        }
