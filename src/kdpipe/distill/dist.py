"""DIST, knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022):

    loss = CE(labels) + β · inter + γ · intra

with ``p_s = softmax(s/T)`` and ``p_t = softmax(t/T)`` (B×C, ``T = kd.temperature``):

* inter-class relation: ``T² · mean_i (1 − ρ(p_s[i, :], p_t[i, :]))``, each sample's class
  probabilities correlated across the classes;
* intra-class relation: ``T² · mean_j (1 − ρ(p_s[:, j], p_t[:, j]))``, each class's
  probabilities correlated across the batch;

``ρ`` the Pearson correlation (:func:`pearson`). Only the ranking/relations of the teacher's
predictions are matched, not their exact values, which the paper argues suits a teacher much
stronger than the student. β = ``kd.dist.beta``, γ = ``kd.dist.gamma``; ``kd.alpha`` is not
read. Teacher logits come from the teacher targets (cached or online). With
``kd.dist.logit_standardization`` (Sun et al., CVPR 2024) both relation terms are computed
from the z-scored logits (:func:`kdpipe.distill.losses.standardize`) at the same
``kd.temperature``; the label term uses the raw logits.

The intra-class term needs a batch of at least two samples: for one sample every class column
is constant, its correlation is taken as 0 and the term is a constant ``T²`` (no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from kdpipe.distill.base import METHODS, MethodInputs, MethodSettings, Objective
from kdpipe.distill.losses import label_ce, standardized_pair
from kdpipe.validation import derived, fail

PEARSON_EPS = 1e-8  # added to the product of the norms, as in the authors' code


@dataclass(frozen=True)
class DistSettings(MethodSettings):
    # β = γ = 1, Huang et al. 2022: the authors' code (hunto/image_classification_sota,
    # lib/models/losses/kd_loss.py) builds its DIST loss with beta = gamma = 1 whatever the data
    # set, CIFAR-100 included (a recipe may still scale the whole KD term; kdpipe has no such weight)
    beta: float = 1.0  # weight of the inter-class relation term
    gamma: float = 1.0  # weight of the intra-class relation term
    logit_standardization: bool = False  # z-score each sample's logits before the softmax (Sun et al. 2024)
    temperature: float = derived()
    teacher_targets: Literal["cached", "online"] = derived()
    teacher_flip: bool = derived()

    def check(self, key: str) -> None:
        for name in ("beta", "gamma"):
            if getattr(self, name) < 0:
                fail(f"{key}.{name}", getattr(self, name), "a number >= 0")


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """The Pearson correlation of each row of ``a`` with the same row of ``b``, in float32:
    ``Σ (a − ā)(b − b̄) / (‖a − ā‖ · ‖b − b̄‖ + eps)``. A constant row gives 0."""
    a, b = a.float(), b.float()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's inter- and intra-class relation losses, each scaled by ``T²`` (see the module)."""
    t = temperature
    p_s = F.softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    inter = (1 - pearson(p_s, p_t)).mean() * (t * t)
    intra = (1 - pearson(p_s.T, p_t.T)).mean() * (t * t)
    return inter, intra


@METHODS.register("dist", DistSettings)
class DIST(Objective):
    def __init__(self, inputs: MethodInputs, settings: DistSettings) -> None:
        super().__init__(inputs.student)
        self.targets, self.temperature = inputs.teacher, settings.temperature
        self.label_smoothing = inputs.label_smoothing
        self.beta, self.gamma = settings.beta, settings.gamma
        self.standardize = settings.logit_standardization

    def forward_train(self, images, labels, batch):
        logits = self.student(images)
        teacher_logits = self.targets(images, batch)
        s, t = standardized_pair(logits, teacher_logits, self.standardize)
        inter, intra = dist_terms(s, t, self.temperature)
        return logits, {
            "ce": label_ce(logits, labels, self.label_smoothing),
            "inter": self.beta * inter,
            "intra": self.gamma * intra,
        }
