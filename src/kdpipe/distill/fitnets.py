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

from collections.abc import Sequence

import torch.nn.functional as F
from torch import nn

from kdpipe.config import FitnetsConfig
from kdpipe.distill.base import Objective, register
from kdpipe.distill.features import forward_with_features, frozen_teacher, pair_stages, probe_channels
from kdpipe.distill.losses import hint_loss
from kdpipe.distill.targets import TeacherLogits
from kdpipe.errors import KdpipeError


@register("fitnets")
class FitNets(Objective):
    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, targets: TeacherLogits | None = None,
                 input_shape: Sequence[int] | None = None, beta: float | None = None, kd=None,
                 label_smoothing: float = 0.0, **_: object) -> None:
        super().__init__(student)
        if input_shape is None:
            raise KdpipeError("fitnets needs the input shape (C, H, W) to size its regressor.")
        self.teacher = frozen_teacher(teacher, targets)
        self.beta = (kd.fitnets if kd is not None else FitnetsConfig()).beta if beta is None else beta
        pairs = pair_stages(student.feature_names, self.teacher.model.feature_names)
        self.student_layer, self.teacher_layer = pairs[(len(pairs) - 1) // 2]
        (c_s,) = probe_channels(student, [self.student_layer], input_shape)
        (c_t,) = probe_channels(self.teacher, [self.teacher_layer], input_shape)
        self.regressor = nn.Sequential(nn.Conv2d(c_s, c_t, kernel_size=1, bias=False), nn.BatchNorm2d(c_t))
        self.label_smoothing = label_smoothing

    def forward_train(self, images, labels, batch):
        logits, (f_s,) = forward_with_features(self.student, images, [self.student_layer])
        _, (f_t,) = forward_with_features(self.teacher, images, [self.teacher_layer])
        return logits, {
            "ce": F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing),
            "hint": self.beta * hint_loss(self.regressor(f_s), f_t),
        }
