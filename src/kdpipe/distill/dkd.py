"""Decoupled knowledge distillation (Zhao et al., CVPR 2022):

    loss = CE(labels) + w(epoch) · (α · TCKD + β · NCKD)

TCKD and NCKD (:func:`dkd_terms`) are each ``T² · KL`` averaged over the batch at
``kd.temperature``; α = ``kd.dkd.alpha``, β = ``kd.dkd.beta`` (paper, CIFAR-100: 1 and 8).
``w`` is the paper's linear warm-up, ``min((epoch + 1) / warmup_epochs, 1)`` with the 0-based
``batch.epoch`` (mdistiller counts epochs from 1), ``1`` when ``warmup_epochs`` is 0.
``kd.alpha`` is not read. Teacher logits come from the teacher targets (cached or online).
With ``kd.dkd.logit_standardization`` (Sun et al., CVPR 2024) TCKD and NCKD are computed from the
z-scored logits of student and teacher (:func:`kdpipe.distill.losses.standardize`) at the same
``kd.temperature`` (the paper used a lower base temperature with them, T = 2 typical on CIFAR-100);
the label term uses the raw logits.

With mixed views (``data.augment.mix``) the labels are soft (N×K): the CE term uses them as
they are, while TCKD/NCKD split the classes at the dominant label (``labels.argmax(1)``, the
image whose weight is ≥ ½; at exactly ½ the lower class index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from kdpipe.distill.base import METHODS, MethodInputs, MethodSettings, Objective
from kdpipe.distill.losses import label_ce, standardized_pair
from kdpipe.validation import derived, fail


@dataclass(frozen=True)
class DkdSettings(MethodSettings):
    alpha: float = 1.0  # weight of TCKD
    beta: float = 1.0  # weight of NCKD (paper: 8 on CIFAR-100, 0.5 on ImageNet; 8 diverges on digits at lr 0.1)
    warmup_epochs: int = 5  # linear warm-up of the DKD terms
    logit_standardization: bool = False  # z-score each sample's logits before the softmax (Sun et al. 2024)
    temperature: float = derived()
    teacher_targets: Literal["cached", "online"] = derived()
    teacher_flip: bool = derived()

    def check(self, key: str) -> None:
        for name in ("alpha", "beta", "warmup_epochs"):
            if getattr(self, name) < 0:
                fail(f"{key}.{name}", getattr(self, name), "a number >= 0")


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD's two terms (Zhao et al., CVPR 2022), each ``T² · KL`` averaged over the batch:

    * TCKD: KL between the binary distributions ``[p_target, 1 - p_target]`` of teacher and student;
    * NCKD: KL between the distributions over the non-target classes alone (softmax of the
      non-target logits, i.e. ``p_i / (1 - p_target)``).

    Computed from log-sum-exps, so it stays finite for confident teachers and large T.
    Soft ``labels`` (N×K, mixed views) count as their dominant class (the argmax).
    """
    if labels.ndim == 2:
        labels = labels.argmax(1)
    t = temperature
    s, z = student_logits.float() / t, teacher_logits.float() / t
    target = F.one_hot(labels, s.shape[1]).bool()

    def binary_log_probs(x: torch.Tensor) -> torch.Tensor:
        total = torch.logsumexp(x, dim=1)
        on = x.gather(1, labels[:, None]).squeeze(1)
        off = torch.logsumexp(x.masked_fill(target, float("-inf")), dim=1)
        return torch.stack([on - total, off - total], dim=1)

    tckd = F.kl_div(binary_log_probs(s), binary_log_probs(z), reduction="batchmean", log_target=True) * (t * t)
    n, k = s.shape
    s_other = F.log_softmax(s[~target].view(n, k - 1), dim=1)
    z_other = F.log_softmax(z[~target].view(n, k - 1), dim=1)
    nckd = F.kl_div(s_other, z_other, reduction="batchmean", log_target=True) * (t * t)
    return tckd, nckd


@METHODS.register("dkd", DkdSettings)
class DKD(Objective):
    def __init__(self, inputs: MethodInputs, settings: DkdSettings) -> None:
        super().__init__(inputs.student)
        self.targets, self.temperature = inputs.teacher, settings.temperature
        self.label_smoothing = inputs.label_smoothing
        self.dkd_alpha, self.dkd_beta, self.warmup_epochs = settings.alpha, settings.beta, settings.warmup_epochs
        self.standardize = settings.logit_standardization

    def forward_train(self, images, labels, batch):
        logits = self.student(images)
        teacher_logits = self.targets(images, batch)
        s, t = standardized_pair(logits, teacher_logits, self.standardize)
        tckd, nckd = dkd_terms(s, t, labels, self.temperature)
        w = warmup_factor(batch.epoch, self.warmup_epochs)
        return logits, {
            "ce": label_ce(logits, labels, self.label_smoothing),
            "tckd": w * self.dkd_alpha * tckd,
            "nckd": w * self.dkd_beta * nckd,
        }
