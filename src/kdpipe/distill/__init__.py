"""Distillation methods behind one registry (``kd.methods`` in params.yaml)."""

from kdpipe.distill import attention, dkd, fitnets, logit, multi_teacher  # noqa: F401  (register methods)
from kdpipe.distill.base import METHODS, BatchContext, CrossEntropyObjective, FrozenTeacher, Objective, get_method
from kdpipe.distill.losses import soft_kl
from kdpipe.distill.targets import OnlineTeacher, TeacherLogits

__all__ = [
    "METHODS", "BatchContext", "CrossEntropyObjective", "FrozenTeacher", "Objective", "OnlineTeacher",
    "TeacherLogits", "get_method", "soft_kl",
]
