"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): the cross-entropy on the labels plus

    at = β/2 · Σ_pairs mean_n mean_j (q_s[n, j] − q_t[n, j])²

for each stage pair ``(s, t)`` (:func:`kdpipe.distill.features.pair_stages`), where the spatial
attention map ``a = mean_c |f|^p`` is flattened and L2-normalised, ``q = a / ‖a‖₂`` — the
paper's ``β/2 Σ ‖q_s − q_t‖`` with the reduction of the authors' code (squared difference
averaged over batch and positions), for which β = 1000 (``kd.attention.beta``) was tuned. The
teacher runs live on the same batch because its feature maps are needed; its logits are not
used, so ``kd.temperature``, ``kd.alpha`` and ``kd.teacher_targets`` are not read.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdpipe.distill.base import METHODS, MethodInputs, MethodSettings, Objective
from kdpipe.distill.features import AttentionTerms, AttentionTermSettings
from kdpipe.distill.losses import label_ce


@dataclass(frozen=True)
class AttentionSettings(AttentionTermSettings, MethodSettings):
    """``kd.attention``: beta (β/2 · Σ of AT terms) and p; none of the shared kd values."""


@METHODS.register("attention", AttentionSettings, needs_teacher_module=True)
class AttentionTransfer(Objective):
    def __init__(self, inputs: MethodInputs, settings: AttentionSettings) -> None:
        super().__init__(inputs.student)
        self.terms = AttentionTerms(inputs.student, inputs.teacher.require_module("attention"),
                                    settings.beta, settings.p)
        self.label_smoothing = inputs.label_smoothing

    def forward_train(self, images, labels, batch):
        logits, _, at = self.terms(self.student, images)
        return logits, {"ce": label_ce(logits, labels, self.label_smoothing), "at": at}
