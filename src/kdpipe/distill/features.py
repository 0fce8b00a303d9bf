"""What feature-based methods share: which student stage learns from which teacher stage,
running a model with :class:`~kdpipe.models.FeatureTap` on the named stages, and the
attention-transfer term (used by ``attention`` and ``combined``).

Stage pairing (``pair_stages``): models list their stages shallow→deep in ``feature_names``
(StudentCNN ``blocks.0..``, ResNet-18 ``layer1..layer4``, MobileNetV2 the ends of its stride
4/8/16/32 groups). With S student and T teacher stages:

* S ≤ T: the student's stages are aligned with the teacher's **deepest** S stages,
  student ``i`` ↔ teacher ``T - S + i``. Both the student and the small-image ResNets halve the
  resolution at each stage, so this pairs maps of the same size: on 32×32 CIFAR the default
  student's 16/8/4 maps meet ``layer2/3/4``'s 16/8/4; on 8×8 digits 4/2/1 meet 4/2/1.
* S > T: student stages are spread evenly over the teacher's, ``round(i·(T-1)/(S-1))``.

Maps that still differ in size (MobileNetV2 at its own input size, ``fast_cnn``'s 15/7/3 maps
after its 2×2 stem on 32×32, odd sizes) are matched by
resizing the teacher's map to the student's (:func:`kdpipe.distill.losses.resize_map`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import torch.nn.functional as F

from kdpipe.distill.losses import resize_map
from kdpipe.distill.targets import FrozenTeacher
from kdpipe.errors import KdpipeError
from kdpipe.models.features import FeatureTap
from kdpipe.validation import Settings, fail


def pair_stages(student_names: Sequence[str], teacher_names: Sequence[str]) -> list[tuple[str, str]]:
    s, t = len(student_names), len(teacher_names)
    if s == 0 or t == 0:
        raise KdpipeError("feature-based distillation needs models that name their stages (feature_names).")
    if s <= t:
        idx = [t - s + i for i in range(s)]
    else:
        idx = [round(i * (t - 1) / (s - 1)) for i in range(s)]
    return [(student_names[i], teacher_names[j]) for i, j in enumerate(idx)]


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


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention ``mean_c |f|^p`` (N×H×W), in float32."""
    return features.float().abs().pow(p).mean(dim=1)


def attention_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
                            p: float = 2.0) -> torch.Tensor:
    """One stage pair: ``mean_n mean_j (q_s[n, j] - q_t[n, j])²`` with ``q = a / ‖a‖₂`` the
    flattened, L2-normalised attention maps (the authors' code's reduction). The teacher's map is
    resized to the student's size (:func:`~kdpipe.distill.losses.resize_map`) before normalising."""
    a_s = attention_map(student_features, p)
    a_t = resize_map(attention_map(teacher_features, p).unsqueeze(1), tuple(a_s.shape[-2:])).squeeze(1)
    q_s = F.normalize(a_s.flatten(1), dim=1)
    q_t = F.normalize(a_t.flatten(1), dim=1)
    return (q_s - q_t).pow(2).mean()


@dataclass(frozen=True)
class AttentionTermSettings(Settings):
    """The attention-transfer term's weight β (of β/2 · Σ_pairs) and exponent p."""

    beta: float = 1000.0
    p: int = 2

    def check(self, key: str) -> None:
        if self.beta < 0:
            fail(f"{key}.beta", self.beta, "a number >= 0")
        if self.p <= 0:
            fail(f"{key}.p", self.p, "an integer > 0")


class AttentionTerms(nn.Module):
    """``β/2 · Σ_pairs attention_transfer_loss`` between the student and the live teacher,
    over the stage pairs of :func:`pair_stages`."""

    def __init__(self, student: nn.Module, teacher: FrozenTeacher, beta: float, p: float) -> None:
        super().__init__()
        self.teacher, self.beta, self.p = teacher, beta, p
        self.pairs = pair_stages(student.feature_names, teacher.model.feature_names)

    def forward(self, student: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student logits, teacher logits and the weighted attention-transfer term."""
        s_names, t_names = zip(*self.pairs)
        logits, s_feats = forward_with_features(student, images, s_names)
        t_logits, t_feats = forward_with_features(self.teacher, images, t_names)
        at = sum(attention_transfer_loss(fs, ft, self.p) for fs, ft in zip(s_feats, t_feats))
        return logits, t_logits, self.beta / 2 * at
