"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017) and logit KD + attention (``combined``).

For each stage pair ``(s, t)`` (see :func:`kdpipe.distill.features.pair_stages`) the spatial
attention map ``a = mean_c |f|^p`` is flattened and L2-normalised, ``q = a / ‖a‖₂``, and

    at = β/2 · Σ_pairs mean_n mean_j (q_s[n, j] − q_t[n, j])²

— the paper's ``β/2 Σ ‖q_s − q_t‖`` with the reduction of the authors' code (squared
difference averaged over batch and positions), for which β = 1000 (``kd.attention.beta``)
was tuned. ``attention`` adds it to the cross-entropy on the labels; ``combined`` adds it to
Hinton's logit KD (``kd.alpha`` soft term + ``1 - kd.alpha`` labels). The teacher runs online
on the same batch because its feature maps are needed.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdpipe.config import AttentionConfig
from kdpipe.distill.base import Objective, register
from kdpipe.distill.features import forward_with_features, frozen_teacher, pair_stages
from kdpipe.distill.losses import attention_transfer_loss, soft_kl
from kdpipe.distill.targets import OnlineTeacher, TeacherLogits


@register("attention")
class AttentionTransfer(Objective):
    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, targets: TeacherLogits | None = None,
                 beta: float | None = None, p: float | None = None, kd=None, label_smoothing: float = 0.0,
                 **_: object) -> None:
        super().__init__(student)
        cfg = kd.attention if kd is not None else AttentionConfig()
        self.beta = cfg.beta if beta is None else beta
        self.p = cfg.p if p is None else p
        self.teacher = frozen_teacher(teacher, targets)
        self.pairs = pair_stages(student.feature_names, self.teacher.model.feature_names)
        self.label_smoothing = label_smoothing

    def attention_terms(self, images):
        """Student logits, teacher logits and the weighted attention-transfer term."""
        s_names, t_names = zip(*self.pairs)
        logits, s_feats = forward_with_features(self.student, images, s_names)
        t_logits, t_feats = forward_with_features(self.teacher, images, t_names)
        at = sum(attention_transfer_loss(fs, ft, self.p) for fs, ft in zip(s_feats, t_feats))
        return logits, t_logits, self.beta / 2 * at

    def forward_train(self, images, labels, batch):
        logits, _, at = self.attention_terms(images)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return logits, {"ce": ce, "at": at}


@register("combined")
class CombinedKD(AttentionTransfer):
    """Logit KD + attention transfer. Teacher logits come from ``targets`` (cached or online);
    when they are online they are taken from the teacher pass that produced the features."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, targets: TeacherLogits | None = None,
                 temperature: float = 4.0, alpha: float = 0.9, **kwargs) -> None:
        super().__init__(student, teacher=teacher, targets=targets, **kwargs)
        self.targets = targets
        self.temperature, self.alpha = temperature, alpha

    def forward_train(self, images, labels, batch):
        logits, t_logits, at = self.attention_terms(images)
        if self.targets is not None and not (isinstance(self.targets, OnlineTeacher) and
                                             self.targets.teacher is self.teacher):
            t_logits = self.targets(images, batch)
        return logits, {
            "kd": self.alpha * soft_kl(logits, t_logits, self.temperature),
            "ce": (1 - self.alpha) * F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing),
            "at": at,
        }
