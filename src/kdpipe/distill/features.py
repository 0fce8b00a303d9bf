"""What feature-based methods share: which student stage learns from which teacher stage,
and running a model with :class:`~kdpipe.models.FeatureTap` on the named stages.

Stage pairing (``pair_stages``): models list their stages shallow→deep in ``feature_names``
(StudentCNN ``blocks.0..``, ResNet-18 ``layer1..layer4``, MobileNetV2 the ends of its stride
4/8/16/32 groups). With S student and T teacher stages:

* S ≤ T: the student's stages are aligned with the teacher's **deepest** S stages,
  student ``i`` ↔ teacher ``T - S + i``. Both the student and the small-image ResNets halve the
  resolution at each stage, so this pairs maps of the same size: on 32×32 CIFAR the default
  student's 16/8/4 maps meet ``layer2/3/4``'s 16/8/4; on 8×8 digits 4/2/1 meet 4/2/1.
* S > T: student stages are spread evenly over the teacher's, ``round(i·(T-1)/(S-1))``.

Maps that still differ in size (MobileNetV2 at its own input size, odd sizes) are matched by
resizing the teacher's map to the student's (:func:`kdpipe.distill.losses.resize_map`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdpipe.distill.base import FrozenTeacher
from kdpipe.distill.targets import OnlineTeacher, TeacherLogits
from kdpipe.errors import KdpipeError
from kdpipe.models.features import FeatureTap


def pair_stages(student_names: Sequence[str], teacher_names: Sequence[str]) -> list[tuple[str, str]]:
    s, t = len(student_names), len(teacher_names)
    if s == 0 or t == 0:
        raise KdpipeError("feature-based distillation needs models that name their stages (feature_names).")
    if s <= t:
        idx = [t - s + i for i in range(s)]
    else:
        idx = [round(i * (t - 1) / (s - 1)) for i in range(s)]
    return [(student_names[i], teacher_names[j]) for i, j in enumerate(idx)]


def frozen_teacher(teacher: nn.Module | None, targets: TeacherLogits | None) -> FrozenTeacher:
    """The teacher as a :class:`FrozenTeacher`, shared with an online ``targets`` when it has one."""
    if isinstance(targets, OnlineTeacher) and (teacher is None or targets.teacher.model is teacher):
        return targets.teacher
    if teacher is None:
        raise KdpipeError("this distillation method needs the teacher model itself (it reads its feature maps).")
    return teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)


def forward_with_features(model: nn.Module, images: torch.Tensor,
                          names: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``model(images)`` plus the outputs of the named submodules, in the order of ``names``.

    For a :class:`FrozenTeacher` the hooks go on the wrapped model and everything runs
    without gradients, in eval mode."""
    target = model.model if isinstance(model, FrozenTeacher) else model
    with FeatureTap(target, names) as tap:
        logits = model(images)
    return logits, tap.features


@torch.no_grad()
def probe_channels(model: nn.Module, names: Sequence[str], input_shape: Sequence[int]) -> list[int]:
    """Channel counts of the named feature maps, from one forward pass on a zero image in eval
    mode (BatchNorm statistics are not touched)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, *input_shape, device=param.device)
        _, feats = forward_with_features(model, x, names)
    finally:
        model.train(was_training)
    return [f.shape[1] for f in feats]
