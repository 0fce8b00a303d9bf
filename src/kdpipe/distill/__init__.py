"""Distillation methods behind one registry (``kd.methods`` in params.yaml).

Every module of this package is imported by the registry on first use
(:meth:`kdpipe.plugins.Registry.discover`), so a method file registers itself.
"""

from kdpipe.distill.base import (
    METHODS, BatchContext, CrossEntropyObjective, MethodInputs, MethodSettings, Objective, SharedKd,
)
from kdpipe.distill.losses import label_ce, soft_kl
from kdpipe.distill.targets import CachedTeacher, FrozenTeacher, OnlineTeacher, TeacherLogits

__all__ = [
    "METHODS", "BatchContext", "CachedTeacher", "CrossEntropyObjective", "FrozenTeacher", "MethodInputs",
    "MethodSettings", "Objective", "OnlineTeacher", "SharedKd", "TeacherLogits", "label_ce", "soft_kl",
]
