"""The losses every distillation method may use, as plain functions of tensors (tests check them
directly). A loss that belongs to one method lives in that method's module."""

from __future__ import annotations


import torch
import torch.nn.functional as F


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft term: T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch.

    The T² factor keeps the gradient scale independent of T (Hinton et al., 2015).
    Computed in float32 whatever the autocast dtype of the logits.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): each row z-scored over the classes,
    ``(z − mean(z)) / (std(z) + eps)``, in float32.

    ``std`` is the population standard deviation (divisor K, the paper's definition); the
    authors' code uses torch's default N − 1 divisor, i.e. logits larger by sqrt(K / (K − 1)),
    the same as a temperature smaller by that factor. ``eps = 1e-7`` as in the authors' code
    keeps a row of equal logits finite (it becomes all zeros). The result is invariant to
    shifting a row by a constant and to scaling it by a positive factor.
    """
    z = logits.float()
    mean = z.mean(dim=1, keepdim=True)
    std = z.std(dim=1, keepdim=True, correction=0)
    return (z - mean) / (std + eps)


def standardized_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      on: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logit sets through :func:`standardize` when ``on`` (a method's
    ``logit_standardization``), else unchanged."""
    if not on:
        return student_logits, teacher_logits
    return standardize(student_logits), standardize(teacher_logits)


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize N×C×H×W maps to ``size``: area averaging when shrinking (each target cell is the
    mean of the region it covers), bilinear when enlarging; a no-op when sizes agree."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def label_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The cross-entropy on the labels every objective uses, in float32."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
