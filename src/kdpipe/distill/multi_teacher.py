"""Multi-teacher (ensemble) distillation: Hinton KD towards the average of several teachers'
softened outputs,

    p_ens = 1/K · Σ_k softmax(z_k / T)
    loss  = α · T² · KL(p_ens ‖ softmax(z_s / T)) + (1 − α) · CE(labels)

The ensemble is the pipeline's own teacher (its logits read through ``targets``, cached or
online) plus every kdpipe model file in ``kd.teachers`` (they live under ``teachers/ensemble/``,
which the distill stages declare as a DVC dependency; ``dvc add`` them there). Extra teachers
run online; each gets the batch re-normalised with its own saved statistics and resized to its
own input size, so teachers trained on differently prepared copies of the data set still see
the images they expect. They must predict the same classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe import models
from kdpipe.distill.base import FrozenTeacher, Objective, register
from kdpipe.distill.losses import ensemble_log_probs, soft_kl_log_target
from kdpipe.distill.targets import TeacherLogits
from kdpipe.errors import KdpipeError


class Renormalized(nn.Module):
    """Feeds ``model`` inputs normalised with its own statistics and at its own size."""

    def __init__(self, model: nn.Module, from_mean: Sequence[float], from_std: Sequence[float],
                 to_mean: Sequence[float], to_std: Sequence[float], image_size: int) -> None:
        super().__init__()
        self.model, self.image_size = model, image_size
        shape = (1, -1, 1, 1)
        fm, fs = torch.tensor(from_mean).view(shape), torch.tensor(from_std).view(shape)
        tm, ts = torch.tensor(to_mean).view(shape), torch.tensor(to_std).view(shape)
        self.register_buffer("scale", fs / ts, persistent=False)
        self.register_buffer("shift", (fm - tm) / ts, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=min(x.shape[-2:]) > self.image_size)
        return self.model(x)


def load_extra_teachers(paths: Sequence[str], meta: dict[str, Any]) -> list[nn.Module]:
    """Load kdpipe model files as teachers for data described by ``meta`` (prepared data's meta)."""
    teachers = []
    for path in paths:
        model, info = models.load(path)
        pre = info["preprocessing"]
        if list(info["class_names"]) != list(meta["class_names"]):
            raise KdpipeError(f"kd.teachers entry {path!r} predicts classes {info['class_names']}, not this data "
                              f"set's {meta['class_names']}; use a teacher trained on the same data set.")
        if int(pre["channels"]) != int(meta["channels"]):
            raise KdpipeError(f"kd.teachers entry {path!r} takes {pre['channels']}-channel images, this data set has "
                              f"{meta['channels']}; use a teacher trained on the same data set.")
        teachers.append(Renormalized(model, meta["mean"], meta["std"], pre["mean"], pre["std"], int(pre["image_size"])))
    return teachers


class MultiTeacherKD(Objective):
    def __init__(self, student: nn.Module, targets: TeacherLogits | None, extra_teachers: Sequence[nn.Module],
                 temperature: float, alpha: float, label_smoothing: float = 0.0) -> None:
        super().__init__(student)
        self.targets = targets
        self.extra = nn.ModuleList(t if isinstance(t, FrozenTeacher) else FrozenTeacher(t) for t in extra_teachers)
        if targets is None and not self.extra:
            raise KdpipeError("multi_teacher needs at least one teacher.")
        self.temperature, self.alpha, self.label_smoothing = temperature, alpha, label_smoothing

    def teacher_logits(self, images, batch) -> list[torch.Tensor]:
        own = [self.targets(images, batch)] if self.targets is not None else []
        return own + [t(images) for t in self.extra]

    def forward_train(self, images, labels, batch):
        logits = self.student(images)
        target = ensemble_log_probs(self.teacher_logits(images, batch), self.temperature)
        return logits, {
            "kd": self.alpha * soft_kl_log_target(logits, target, self.temperature),
            "ce": (1 - self.alpha) * F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing),
        }


@register("multi_teacher")
def multi_teacher(student: nn.Module, targets: TeacherLogits, temperature: float, alpha: float, kd=None,
                  meta: dict[str, Any] | None = None, extra_teachers: Sequence[nn.Module] | None = None,
                  label_smoothing: float = 0.0, **_: object) -> MultiTeacherKD:
    """The pipeline's factory: extra teachers from ``kd.teachers`` unless given as modules."""
    if extra_teachers is None:
        if kd is None or meta is None:
            raise KdpipeError("multi_teacher needs kd.teachers and the prepared data's description to load them.")
        extra_teachers = load_extra_teachers(kd.teachers, meta)
    return MultiTeacherKD(student, targets, extra_teachers, temperature, alpha, label_smoothing)
