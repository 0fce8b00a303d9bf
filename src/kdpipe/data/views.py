"""Deterministic augmented views, computed a whole batch at a time.

The view of image ``i`` in epoch ``e`` (crop offset and flip) is a pure function of
(seed, epoch, i): a counter-based hash, not a stateful RNG. The same view can therefore be
rebuilt at any time, which is what lets the teacher's outputs on exactly the student's
views be computed once and cached (see the teacher_targets stage).

Mixed views (``data.augment.mix``: MixUp, Zhang et al. 2018; CutMix, Yun et al. 2019) follow
the same rule, so the teacher and the student see the very same mixed image (Beyer et al.
2022, "a good teacher is patient and consistent"). What image ``i`` is mixed with in epoch
``e``, and how, depends on (seed, e, i) only, never on the batch size or on where ``i`` sits in
its batch (:func:`make_mix`):

* the partner is the image right after ``i`` in epoch ``e``'s shuffled order (cyclically:
  the last image's partner is the first), :func:`mix_partners`. Every image is thus the
  partner of exactly one image per epoch, never of itself (for more than one image), and the
  partner is seen in its own view of that epoch: mixed = mix(view(i), view(partner(i)));
* the weight λ ~ Beta(α, α) of image ``i`` (:func:`mix_lambdas`) is the ratio G₁ / (G₁ + G₂)
  of two Gamma(α) draws, each made with Marsaglia and Tsang's method (2000) from hashed
  uniforms: attempt ``k`` of draw ``g`` for image ``i`` reads the uniforms keyed by
  (seed, e, i, g, k), so the rejection loop is as pure as a single hash (α < 1: Gamma(α + 1)
  · U^(1/α)). It is computed in log space in float64 and kept in [2⁻²⁴, 1 − 2⁻²⁴], so it is
  strictly inside (0, 1) in float32 too (the clamp only bites for α far below 0.1);
* MixUp: pixels λ·view(i) + (1 − λ)·view(partner); CutMix: a box of
  ``round(H·√(1−λ)) × round(W·√(1−λ))`` pixels centred on a hashed pixel and clipped to the
  image is pasted from the partner's view, and the label weight becomes the area kept,
  ``1 − box area / (H·W)`` (as in the CutMix paper);
* the label is soft: ``w·onehot(y_i) + (1 − w)·onehot(y_partner)`` with ``w`` = λ (MixUp) or
  the area kept (CutMix), :func:`mix_labels`.
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


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled order of one epoch: a function of (seed, epoch) only."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=gen)


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


# ---- mixed views -------------------------------------------------------------------------------

MIX_KINDS = ("none", "mixup", "cutmix")
_MIX_SALT = 0x6D69785F76696577  # "mix_view": keeps the mixing streams apart from the view bits
_LAMBDA_MIN = 2.0**-24  # λ is kept in [2⁻²⁴, 1 − 2⁻²⁴]: strictly inside (0, 1) in float32 too
_MAX_ATTEMPTS = 64  # Marsaglia-Tsang accepts ≥ 95% of attempts: 64 rounds never all fail


def _uniforms(seed: int, epoch: int, indices: np.ndarray, *key: int) -> np.ndarray:
    """float64 uniforms in the open interval (0, 1), one per index, for the stream ``key``:
    a pure function of (seed, epoch, index, key)."""
    with np.errstate(over="ignore"):
        tag = np.array([_MIX_SALT], dtype=np.uint64)
        for part in key:
            tag = _splitmix64(tag ^ np.uint64(part))
        bits = _splitmix64(view_hash(seed, epoch, indices) ^ tag)
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _log_gamma(seed: int, epoch: int, indices: np.ndarray, alpha: float, draw: int) -> np.ndarray:
    """log of one Gamma(alpha, 1) draw per index (Marsaglia & Tsang 2000, in log space)."""
    a = alpha if alpha >= 1.0 else alpha + 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / np.sqrt(9.0 * d)
    out = np.empty(len(indices), dtype=np.float64)
    pending = np.arange(len(indices))
    for attempt in range(_MAX_ATTEMPTS):
        if len(pending) == 0:
            break
        idx = indices[pending]
        u1, u2, u3 = (_uniforms(seed, epoch, idx, draw, attempt, part) for part in range(3))
        x = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller: x ~ N(0, 1)
        v = (1.0 + c * x) ** 3
        positive = v > 0
        log_v = np.log(np.where(positive, v, 1.0))
        accept = positive & (np.log(u3) < 0.5 * x * x + d - d * v + d * log_v)
        out[pending[accept]] = np.log(d) + log_v[accept]
        pending = pending[~accept]
    if len(pending):  # pragma: no cover - probability below 0.05**64
        raise RuntimeError("Gamma sampling did not converge")
    if alpha < 1.0:  # Gamma(α) = Gamma(α + 1) · U^(1/α)
        out += np.log(_uniforms(seed, epoch, indices, draw, _MAX_ATTEMPTS, 0)) / alpha
    return out


def mix_lambdas(seed: int, epoch: int, indices: torch.Tensor | np.ndarray, alpha: float) -> torch.Tensor:
    """λ ~ Beta(alpha, alpha) of each image (float64), a pure function of (seed, epoch, index):
    G₁ / (G₁ + G₂) for two Gamma(alpha) draws made from hashed uniforms."""
    if not alpha > 0:
        raise ValueError(f"mix_alpha must be > 0, got {alpha}")
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
    diff = _log_gamma(seed, epoch, idx, alpha, 0) - _log_gamma(seed, epoch, idx, alpha, 1)
    with np.errstate(over="ignore"):
        # the logistic function of log G₁ − log G₂, written to never overflow
        e = np.exp(-np.abs(diff))
        lam = np.where(diff >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return torch.from_numpy(np.clip(lam, _LAMBDA_MIN, 1.0 - _LAMBDA_MIN))


def mix_partners(seed: int, epoch: int, indices: torch.Tensor, n: int) -> torch.Tensor:
    """The image each of ``indices`` is mixed with in epoch ``epoch``: the next one in the
    epoch's shuffled order :func:`epoch_order` (the last image's partner is the first)."""
    order = epoch_order(seed, epoch, n)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n)
    return order[(rank[indices.cpu()] + 1) % n]


@dataclass(frozen=True)
class Mix:
    """How each image of a batch is mixed: its partner, the weight of its own label and, for
    CutMix, the box (rows y0:y1, columns x0:x1 of the view) that comes from the partner."""

    kind: str  # "mixup" or "cutmix"
    partner: torch.Tensor  # int64, positions in the split (CPU)
    weight: torch.Tensor  # float32, own label's weight: λ (mixup) or the area kept (cutmix)
    box: torch.Tensor  # int64 N×4 (y0, y1, x0, x1); empty boxes for mixup

    def __getitem__(self, rows: slice) -> "Mix":
        return Mix(self.kind, self.partner[rows], self.weight[rows], self.box[rows])

    def to(self, device: torch.device | str) -> "Mix":
        """Weights and boxes on ``device``; partners stay on the CPU (like batch indices)."""
        return Mix(self.kind, self.partner, self.weight.to(device), self.box.to(device))


def cutmix_boxes(seed: int, epoch: int, indices: torch.Tensor, lam: torch.Tensor,
                 size: tuple[int, int]) -> torch.Tensor:
    """The CutMix box (y0, y1, x0, x1) of each image: ``round(H·√(1−λ)) × round(W·√(1−λ))``
    pixels centred on a hashed pixel, clipped to the image."""
    h, w = size
    idx = np.asarray(indices.cpu(), dtype=np.int64)
    ratio = np.sqrt(1.0 - lam.numpy())
    cut_h, cut_w = np.floor(h * ratio + 0.5).astype(np.int64), np.floor(w * ratio + 0.5).astype(np.int64)
    cy = np.minimum((_uniforms(seed, epoch, idx, 2, 0, 0) * h).astype(np.int64), h - 1)
    cx = np.minimum((_uniforms(seed, epoch, idx, 2, 0, 1) * w).astype(np.int64), w - 1)
    y0, x0 = cy - cut_h // 2, cx - cut_w // 2
    box = np.stack([np.clip(y0, 0, h), np.clip(y0 + cut_h, 0, h), np.clip(x0, 0, w), np.clip(x0 + cut_w, 0, w)], 1)
    return torch.from_numpy(box)


def make_mix(seed: int, epoch: int, indices: torch.Tensor, n: int, kind: str, alpha: float,
             size: tuple[int, int]) -> Mix:
    """How each of ``indices`` (positions in a split of ``n`` images of ``size`` H×W) is mixed
    in epoch ``epoch``: a pure function of (seed, epoch, index), see the module docstring."""
    if kind not in MIX_KINDS[1:]:
        raise ValueError(f"mix must be one of {', '.join(MIX_KINDS[1:])}, got {kind!r}")
    indices = indices.cpu()
    lam = mix_lambdas(seed, epoch, indices, alpha)
    partner = mix_partners(seed, epoch, indices, n)
    if kind == "mixup":
        return Mix(kind, partner, lam.float(), torch.zeros(len(indices), 4, dtype=torch.int64))
    box = cutmix_boxes(seed, epoch, indices, lam, size)
    area = ((box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])).double()
    return Mix(kind, partner, (1.0 - area / (size[0] * size[1])).float(), box)


def apply_mix(images: torch.Tensor, partners: torch.Tensor, mix: Mix) -> torch.Tensor:
    """Each image of a batch N×C×H×W mixed with its partner's (already viewed) image.

    MixUp returns float32 pixels ``w·image + (1 − w)·partner`` (still 0..255, normalised
    afterwards); CutMix keeps the dtype (uint8) and pastes the partner's box."""
    device = images.device
    if mix.kind == "mixup":
        w = mix.weight.to(device)[:, None, None, None]
        return images.float() * w + partners.float() * (1.0 - w)
    _, _, h, w = images.shape
    box = mix.box.to(device)
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    in_rows = (rows[None, :] >= box[:, 0:1]) & (rows[None, :] < box[:, 1:2])
    in_cols = (cols[None, :] >= box[:, 2:3]) & (cols[None, :] < box[:, 3:4])
    inside = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return torch.where(inside, partners, images)


def mix_labels(labels: torch.Tensor, partner_labels: torch.Tensor, mix: Mix, num_classes: int) -> torch.Tensor:
    """Soft targets N×K (float32): ``w·onehot(y) + (1 − w)·onehot(y_partner)``."""
    w = mix.weight.to(labels.device)[:, None]
    own = torch.nn.functional.one_hot(labels, num_classes).float()
    other = torch.nn.functional.one_hot(partner_labels, num_classes).float()
    return own * w + other * (1.0 - w)
