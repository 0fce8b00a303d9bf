"""The distiller contract and the KD method registry.

An objective wraps the student (and, for distillation, the teacher's logits) and implements
``forward_train(images, labels, batch) -> (student_logits, {term_name: loss})``. The training
engine sums the terms and logs each one, so a new method is one small class.

A KD method is one module ``kdpipe/distill/<name>.py`` that registers itself::

    @dataclass(frozen=True)
    class MySettings(MethodSettings):          # its section kd.<name> in params.yaml
        beta: float = 1.0
        temperature: float = derived()         # read from the shared kd.temperature

    @METHODS.register("<name>", MySettings)
    class MyKD(Objective):
        def __init__(self, inputs: MethodInputs, settings: MySettings) -> None: ...

The settings are the method's whole interface to params.yaml: the ``derived`` fields name
the shared ``kd.*`` values it reads (:class:`SharedKd`), the others its own section. The
distill stage of a method depends on exactly these values (see the kd_settings stage).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from kdpipe.plugins import Registry
from kdpipe.validation import Settings, fail

if TYPE_CHECKING:
    from kdpipe.distill.targets import TeacherLogits

METHODS: Registry[type] = Registry("KD method", "kd.methods", "kdpipe.distill")


TEMPERATURE_RANGE = (0.5, 50.0)


@dataclass(frozen=True)
class SharedKd(Settings):
    """The ``kd.*`` values several methods read; a method reads one by declaring a
    ``derived()`` field of the same name in its settings."""

    temperature: float = 4.0
    alpha: float = 0.9  # weight of the soft (teacher) term; the label term gets 1 - alpha
    teacher_targets: Literal["cached", "online"] = "cached"
    # the teacher's logits on a view: the mean of its logits on the view and on its mirror image
    # (twice the teacher's cost; for data whose classes survive a left-right flip)
    teacher_flip: bool = False

    def check(self, key: str) -> None:
        # below 0.5 the T²-scaled soft term all but vanishes (1e-30 makes it exactly 0: a
        # "distilled" student trained on labels alone); above 50 every softened output is uniform
        if not TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1]:
            fail(f"{key}.temperature", self.temperature,
                 f"a number in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}] (usual: 1-8)")
        # alpha 0 would give the teacher no weight at all: the student would be the baseline again
        if not 0 < self.alpha <= 1:
            fail(f"{key}.alpha", self.alpha, "a number in (0, 1] (0 leaves no teacher term: that is the baseline)")


@dataclass(frozen=True)
class MethodSettings(Settings):
    """Base of a method's settings. ``check_selected`` runs only when the method is in
    ``kd.methods`` (for rules such as "needs at least one extra teacher")."""

    def check_selected(self, key: str) -> None:
        pass


@dataclass(frozen=True)
class BatchContext:
    """Where a batch comes from: lets cached teacher targets be looked up exactly."""

    indices: torch.Tensor  # positions in the training split
    epoch: int


@dataclass
class MethodInputs:
    """What every method is built from, besides its settings."""

    student: nn.Module
    teacher: TeacherLogits  # the teacher's logits; ``teacher.module`` is the live teacher, if any
    label_smoothing: float  # the student recipe's, applied to every label term
    input_shape: tuple[int, int, int]  # C, H, W of the training images
    meta: dict[str, Any]  # the prepared data's description (class names, statistics)


class Objective(nn.Module):
    """Base class: holds the student; subclasses add a teacher and extra trainable parts."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, batch: BatchContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Everything the optimiser updates: never the teacher."""
        return (p for p in self.parameters() if p.requires_grad)


class CrossEntropyObjective(Objective):
    """The baseline: labels only."""

    def __init__(self, student: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__(student)
        self.label_smoothing = label_smoothing

    def forward_train(self, images, labels, batch):
        from kdpipe.distill.losses import label_ce

        logits = self.student(images)
        return logits, {"ce": label_ce(logits, labels, self.label_smoothing)}


def needs_teacher_module(method: str) -> bool:
    """Whether ``method`` reads the teacher's feature maps (so the teacher must run live)."""
    return bool(METHODS.get(method).info.get("needs_teacher_module", False))


def reads_teacher_logits(method: str) -> bool:
    """Whether ``method`` reads the teacher's logits (cached or online: ``kd.teacher_targets``)."""
    from kdpipe.validation import derived_fields

    return "teacher_targets" in derived_fields(METHODS.get(method).settings)
