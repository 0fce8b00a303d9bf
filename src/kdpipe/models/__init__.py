"""Teachers and students behind one registry; ``load(path)`` rebuilds a saved model.

Every module of this package is imported by the registry on first use, so an architecture
file registers itself (:func:`kdpipe.models.registry.register`).
"""

from kdpipe.models.features import FeatureTap
from kdpipe.models.registry import MODELS, arch_params, build, check_matches_data, count_params, load, save, size_mb

__all__ = ["MODELS", "FeatureTap", "arch_params", "build", "check_matches_data", "count_params", "load", "save", "size_mb"]
