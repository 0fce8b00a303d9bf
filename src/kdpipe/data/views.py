"""Deterministic augmented views, computed a whole batch at a time.

The view of image ``i`` in epoch ``e`` (crop offset and flip) is a pure function of
(seed, epoch, i): a counter-based hash, not a stateful RNG. The same view can therefore be
rebuilt at any time, which is what lets the teacher's outputs on exactly the student's
views be computed once and cached (see the teacher_targets stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def view_hash(seed: int, epoch: int, indices: torch.Tensor | np.ndarray) -> np.ndarray:
    """64 well-mixed bits per (seed, epoch, index)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed], dtype=np.uint64))
        base = _splitmix64(base ^ np.uint64(epoch))
        idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
        return _splitmix64(base ^ _splitmix64(idx))


@dataclass(frozen=True)
class Views:
    """Per-image crop offsets (0..2·pad) and horizontal flips for one batch."""

    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor

    def __getitem__(self, rows: slice) -> "Views":
        return Views(self.dy[rows], self.dx[rows], self.flip[rows])

    def to(self, device: torch.device | str) -> "Views":
        return Views(self.dy.to(device), self.dx.to(device), self.flip.to(device))


def make_views(seed: int, epoch: int, indices: torch.Tensor, pad: int, flip: bool) -> Views:
    h = view_hash(seed, epoch, indices.cpu())
    span = np.uint64(2 * pad + 1)
    dy = (h % span).astype(np.int64)
    dx = ((h >> np.uint64(20)) % span).astype(np.int64)
    flips = ((h >> np.uint64(40)) & np.uint64(1)).astype(bool) & flip
    return Views(torch.from_numpy(dy), torch.from_numpy(dx), torch.from_numpy(flips))


def apply_views(images: torch.Tensor, views: Views, pad: int) -> torch.Tensor:
    """Crop (after zero padding by ``pad``) and flip a batch N×C×H×W in one gather."""
    n, _, h, w = images.shape
    device = images.device
    if pad > 0:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        rows = views.dy.to(device)[:, None] + torch.arange(h, device=device)[None, :]
    else:
        padded = images
        rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    flips = views.flip.to(device)
    cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    if pad > 0:
        cols = cols + views.dx.to(device)[:, None]
    # Gather rows then columns: cheaper than one 4-D advanced index.
    c = images.shape[1]
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, padded.shape[3]))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
