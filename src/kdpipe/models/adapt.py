"""Feeding a model inputs prepared for another: the one input adapter used by the pretrained
MobileNetV2 teacher (data statistics → ImageNet's, any size → its input size) and by extra
ensemble teachers (this data set's statistics → the ones they were trained with)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def renormalize_affine(from_mean: Sequence[float], from_std: Sequence[float], to_mean: Sequence[float],
                       to_std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with ``(x - from_mean) / from_std`` ↦ ``(x - to_mean) / to_std``."""
    fm, fs = torch.as_tensor(list(from_mean), dtype=torch.float32), torch.as_tensor(list(from_std), dtype=torch.float32)
    tm, ts = torch.as_tensor(list(to_mean), dtype=torch.float32), torch.as_tensor(list(to_std), dtype=torch.float32)
    return fs / ts, (fm - tm) / ts


class InputAdapter(nn.Module):
    """``resize(x · scale + shift)``: an exact per-channel affine map, then a bilinear resize
    (antialiased when shrinking) to ``size`` × ``size`` when the input has another size.
    ``repeat_to`` repeats a 1-channel input to that many channels first."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, size: int | None, repeat_to: int | None = None) -> None:
        super().__init__()
        self.size, self.repeat_to = size, repeat_to
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1).float(), persistent=False)
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat_to is not None and x.shape[1] == 1:
            x = x.expand(-1, self.repeat_to, -1, -1)
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=min(x.shape[-2:]) > self.size)
        return x
