"""Multi-teacher (ensemble) distillation: Hinton KD towards the average of several teachers'
softened outputs,

    p_ens = 1/K · Σ_k softmax(z_k / T)
    loss  = α · T² · KL(p_ens ‖ softmax(z_s / T)) + (1 − α) · CE(labels)

The ensemble is the pipeline's own teacher (its logits read from the teacher targets, cached
or online) plus every kdpipe model file in ``kd.multi_teacher.teachers`` (they live under
``teachers/ensemble/``, which the distill stages declare as a DVC dependency; ``dvc add`` them
there). Extra teachers run online; each gets the batch re-normalised with its own saved
statistics and resized to its own input size (:class:`~kdpipe.models.adapt.InputAdapter`), so
teachers trained on differently prepared copies of the data set still see the images they
expect. They must predict the same classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe import models
from kdpipe.distill.base import METHODS, MethodInputs, MethodSettings, Objective
from kdpipe.distill.losses import label_ce
from kdpipe.distill.targets import FrozenTeacher, TeacherLogits, flip_mean
from kdpipe.errors import KdpipeError
from kdpipe.models.adapt import InputAdapter, renormalize_affine
from kdpipe.validation import derived, fail, under

ENSEMBLE_DIR = "teachers/ensemble"  # the folder the distill stages declare as a DVC dependency


@dataclass(frozen=True)
class MultiTeacherSettings(MethodSettings):
    teachers: list[str] = field(default_factory=list)  # extra kdpipe model files under teachers/ensemble/
    temperature: float = derived()
    alpha: float = derived()
    teacher_targets: Literal["cached", "online"] = derived()
    teacher_flip: bool = derived()

    def check(self, key: str) -> None:
        for path in self.teachers:
            if not under(path, ENSEMBLE_DIR) or not path.endswith(".pt"):
                fail(f"{key}.teachers", path, f"a kdpipe model file (.pt) under {ENSEMBLE_DIR}/, "
                     "the folder the distill stages declare as a DVC dependency")
        if len(set(self.teachers)) != len(self.teachers):
            fail(f"{key}.teachers", self.teachers, "a list without repeats")

    def check_selected(self, key: str) -> None:
        if not self.teachers:
            fail(f"{key}.teachers", self.teachers,
                 f"at least one extra teacher under {ENSEMBLE_DIR}/ when kd.methods has multi_teacher "
                 "(the pipeline's own teacher is always part of the ensemble)")


def ensemble_log_probs(teacher_logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """log of the average of the teachers' softened outputs, ``log mean_k softmax(z_k / T)``."""
    stacked = torch.stack([F.log_softmax(z.float() / temperature, dim=1) for z in teacher_logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(teacher_logits))


def soft_kl_log_target(student_logits: torch.Tensor, log_p_target: torch.Tensor, temperature: float) -> torch.Tensor:
    """``soft_kl`` against a target given as log-probabilities at temperature T (e.g. an ensemble)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_target.float(), reduction="batchmean", log_target=True) * (t * t)

def load_extra_teachers(paths: Sequence[str], meta: dict[str, Any]) -> list[nn.Module]:
    """Load kdpipe model files as teachers for data described by ``meta`` (prepared data's meta)."""
    teachers = []
    for path in paths:
        model, info = models.load(path, rebuild="train it (e.g. dvc exp run -S teacher.arch=vea_resnet18 train_teacher) "
                                                 "and copy its models/teacher.pt there, or remove it from "
                                                 "kd.multi_teacher.teachers")
        pre = info["preprocessing"]
        if list(info["class_names"]) != list(meta["class_names"]):
            raise KdpipeError(f"kd.multi_teacher.teachers entry {path!r} predicts classes {info['class_names']}, "
                              f"not this data set's {meta['class_names']}; use a teacher trained on the same data set.")
        if int(pre["channels"]) != int(meta["channels"]):
            raise KdpipeError(f"kd.multi_teacher.teachers entry {path!r} takes {pre['channels']}-channel images, "
                              f"this data set has {meta['channels']}; use a teacher trained on the same data set.")
        scale, shift = renormalize_affine(meta["mean"], meta["std"], pre["mean"], pre["std"])
        teachers.append(nn.Sequential(InputAdapter(scale, shift, int(pre["image_size"])), model))
    return teachers


class MultiTeacherKD(Objective):
    def __init__(self, student: nn.Module, targets: TeacherLogits | None, extra_teachers: Sequence[nn.Module],
                 temperature: float, alpha: float, label_smoothing: float = 0.0, flip: bool = False) -> None:
        super().__init__(student)
        self.targets = targets
        self.extra = nn.ModuleList(t if isinstance(t, FrozenTeacher) else FrozenTeacher(t) for t in extra_teachers)
        if targets is None and not self.extra:
            raise KdpipeError("multi_teacher needs at least one teacher.")
        self.temperature, self.alpha, self.label_smoothing = temperature, alpha, label_smoothing
        self.flip = flip  # kd.teacher_flip, for the extra teachers too (the own one's targets have it)

    def teacher_logits(self, images, batch) -> list[torch.Tensor]:
        own = [self.targets(images, batch)] if self.targets is not None else []
        return own + [flip_mean(t, images) if self.flip else t(images) for t in self.extra]

    def forward_train(self, images, labels, batch):
        logits = self.student(images)
        target = ensemble_log_probs(self.teacher_logits(images, batch), self.temperature)
        return logits, {
            "kd": self.alpha * soft_kl_log_target(logits, target, self.temperature),
            "ce": (1 - self.alpha) * label_ce(logits, labels, self.label_smoothing),
        }


@METHODS.register("multi_teacher", MultiTeacherSettings)
def multi_teacher(inputs: MethodInputs, settings: MultiTeacherSettings) -> MultiTeacherKD:
    """The pipeline's teacher plus the extra teachers of ``kd.multi_teacher.teachers``."""
    extra = load_extra_teachers(settings.teachers, inputs.meta)
    return MultiTeacherKD(inputs.student, inputs.teacher, extra, settings.temperature, settings.alpha,
                          inputs.label_smoothing, settings.teacher_flip)
