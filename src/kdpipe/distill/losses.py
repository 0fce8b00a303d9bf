"""Distillation losses as plain functions of tensors, so tests can check them directly."""

from __future__ import annotations

import math

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


def soft_kl_log_target(student_logits: torch.Tensor, log_p_target: torch.Tensor, temperature: float) -> torch.Tensor:
    """``soft_kl`` against a target given as log-probabilities at temperature T (e.g. an ensemble)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_target.float(), reduction="batchmean", log_target=True) * (t * t)


def ensemble_log_probs(teacher_logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """log of the average of the teachers' softened outputs, ``log mean_k softmax(z_k / T)``."""
    stacked = torch.stack([F.log_softmax(z.float() / temperature, dim=1) for z in teacher_logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(teacher_logits))


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize N×C×H×W maps to ``size``: area averaging when shrinking (each target cell is the
    mean of the region it covers), bilinear when enlarging; a no-op when sizes agree."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention ``mean_c |f|^p`` (N×H×W), in float32."""
    return features.float().abs().pow(p).mean(dim=1)


def attention_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
                            p: float = 2.0) -> torch.Tensor:
    """One stage pair: ``mean_n mean_j (q_s[n, j] - q_t[n, j])²`` with ``q = a / ‖a‖₂`` the
    flattened, L2-normalised attention maps (the authors' code's reduction). The teacher's map is
    resized to the student's size (:func:`resize_map`) before normalising."""
    a_s = attention_map(student_features, p)
    a_t = resize_map(attention_map(teacher_features, p).unsqueeze(1), tuple(a_s.shape[-2:])).squeeze(1)
    q_s = F.normalize(a_s.flatten(1), dim=1)
    q_t = F.normalize(a_t.flatten(1), dim=1)
    return (q_s - q_t).pow(2).mean()


def hint_loss(regressed_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets' hint: mean squared error between the regressed student features and the
    teacher's (resized to the student's spatial size), averaged over every element."""
    target = resize_map(teacher_features.float(), tuple(regressed_student.shape[-2:]))
    return F.mse_loss(regressed_student.float(), target)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD's two terms (Zhao et al., CVPR 2022), each ``T² · KL`` averaged over the batch:

    * TCKD: KL between the binary distributions ``[p_target, 1 - p_target]`` of teacher and student;
    * NCKD: KL between the distributions over the non-target classes alone (softmax of the
      non-target logits, i.e. ``p_i / (1 - p_target)``).

    Computed from log-sum-exps, so it stays finite for confident teachers and large T.
    """
    t = temperature
    s, z = student_logits.float() / t, teacher_logits.float() / t
    target = F.one_hot(labels, s.shape[1]).bool()

    def binary_log_probs(x: torch.Tensor) -> torch.Tensor:
        total = torch.logsumexp(x, dim=1)
        on = x.gather(1, labels[:, None]).squeeze(1)
        off = torch.logsumexp(x.masked_fill(target, float("-inf")), dim=1)
        return torch.stack([on - total, off - total], dim=1)

    tckd = F.kl_div(binary_log_probs(s), binary_log_probs(z), reduction="batchmean", log_target=True) * (t * t)
    n, k = s.shape
    s_other = F.log_softmax(s[~target].view(n, k - 1), dim=1)
    z_other = F.log_softmax(z[~target].view(n, k - 1), dim=1)
    nckd = F.kl_div(s_other, z_other, reduction="batchmean", log_target=True) * (t * t)
    return tckd, nckd
