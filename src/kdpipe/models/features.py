"""Read a model's intermediate feature maps through forward hooks, without rewriting it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FeatureTap:
    """Context manager: ``with FeatureTap(model, names) as tap: model(x); tap.features``."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        self.names = list(names)
        self._modules = [modules[n] for n in self.names]
        self._handles: list = []
        self._out: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        def fn(_module, _inputs, output):
            self._out[name] = output

        return fn

    def __enter__(self) -> "FeatureTap":
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in zip(self.names, self._modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def features(self) -> list[torch.Tensor]:
        """Feature maps of the last forward pass, in the order of ``names``."""
        return [self._out[n] for n in self.names]
