"""The distiller contract and registry.

An objective wraps the student (and, for distillation, a teacher) and implements
``forward_train(images, labels, batch) -> (student_logits, {term_name: loss})``. The
training engine sums the terms and logs each one, so a new method is one small class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import KdpipeError


@dataclass(frozen=True)
class BatchContext:
    """Where a batch comes from: lets cached teacher targets be looked up exactly."""

    indices: torch.Tensor  # positions in the training split
    epoch: int


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
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)}


class FrozenTeacher(nn.Module):
    """A teacher that stays in eval mode and never receives gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


DistillerFactory = Callable[..., Objective]
METHODS: dict[str, DistillerFactory] = {}


def register(name: str) -> Callable[[DistillerFactory], DistillerFactory]:
    def wrap(factory: DistillerFactory) -> DistillerFactory:
        METHODS[name] = factory
        return factory

    return wrap


def get_method(name: str) -> DistillerFactory:
    if name not in METHODS:
        raise KdpipeError(f"distillation method {name!r} is not implemented; available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]
