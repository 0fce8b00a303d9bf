"""Teachers and students behind one registry; ``load(path)`` rebuilds a saved model."""

from kdpipe.models import mobilenet, resnet, student, vea  # noqa: F401  (register architectures)
from kdpipe.models.features import FeatureTap
from kdpipe.models.registry import MODELS, build, count_params, load, save, size_mb

__all__ = ["MODELS", "FeatureTap", "build", "count_params", "load", "save", "size_mb"]
