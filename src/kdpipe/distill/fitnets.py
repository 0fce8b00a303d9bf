"""FitNets (Romero et al., ICLR 2015), in one stage as in mdistiller: the cross-entropy on the
labels plus a *hint* on one intermediate layer,

    hint = β · mean((BN(W ∗ f_s) − f_t)²)        W: a learned 1×1 convolution C_s → C_t

The guided student stage is the middle one of its ``feature_names`` (``(S-1)//2``: ``blocks.1``
for the default three-block student); the hint stage is the teacher stage paired with it by
:func:`kdpipe.distill.features.pair_stages` (``layer3`` for ResNet-18, same resolution). The
regressor's parameters are part of the objective, so ``trainable_parameters`` hands them to the
optimiser; they are not saved with the student. Spatial mismatch: the teacher's map is resized
to the student's (area when shrinking, bilinear when enlarging). β is ``kd.fitnets.beta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.distill.base import METHODS, MethodInputs, MethodSettings, Objective
from kdpipe.distill.features import forward_with_features, pair_stages, probe_channels
from kdpipe.distill.losses import label_ce, resize_map
from kdpipe.validation import fail


@dataclass(frozen=True)
class FitnetsSettings(MethodSettings):
    beta: float = 100.0  # weight of the hint (MSE) term

    def check(self, key: str) -> None:
        if self.beta < 0:
            fail(f"{key}.beta", self.beta, "a number >= 0")


def hint_loss(regressed_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets' hint: mean squared error between the regressed student features and the
    teacher's (resized to the student's spatial size), averaged over every element."""
    target = resize_map(teacher_features.float(), tuple(regressed_student.shape[-2:]))
    return F.mse_loss(regressed_student.float(), target)

@METHODS.register("fitnets", FitnetsSettings, needs_teacher_module=True)
class FitNets(Objective):
    def __init__(self, inputs: MethodInputs, settings: FitnetsSettings) -> None:
        super().__init__(inputs.student)
        student = inputs.student
        self.teacher = inputs.teacher.require_module("fitnets")
        self.beta = settings.beta
        pairs = pair_stages(student.feature_names, self.teacher.model.feature_names)
        self.student_layer, self.teacher_layer = pairs[(len(pairs) - 1) // 2]
        (c_s,) = probe_channels(student, [self.student_layer], inputs.input_shape)
        (c_t,) = probe_channels(self.teacher, [self.teacher_layer], inputs.input_shape)
        self.regressor = nn.Sequential(nn.Conv2d(c_s, c_t, kernel_size=1, bias=False), nn.BatchNorm2d(c_t))
        self.label_smoothing = inputs.label_smoothing

    def forward_train(self, images, labels, batch):
        logits, (f_s,) = forward_with_features(self.student, images, [self.student_layer])
        _, (f_t,) = forward_with_features(self.teacher, images, [self.teacher_layer])
        return logits, {
            "ce": label_ce(logits, labels, self.label_smoothing),
            "hint": self.beta * hint_loss(self.regressor(f_s), f_t),
        }
