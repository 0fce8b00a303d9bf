"""Independent reference formulas for the distillation losses, in float64 plain Python (no torch
softmax, no KL helper): the tests compare kdpipe's tensor code against these."""

from __future__ import annotations

import math

import torch


def probs(z: list[float], t: float) -> list[float]:
    """softmax(z / t), max-shifted."""
    m = max(v / t for v in z)
    e = [math.exp(v / t - m) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p ‖ q) = Σ p·log(p / q)."""
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def soft_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> float:
    """Hinton's soft term: T² · mean over rows of KL(softmax(t/T) ‖ softmax(s/T))."""
    rows = list(zip(s.double().tolist(), t.double().tolist()))
    return sum(kl(probs(z, temperature), probs(x, temperature)) for x, z in rows) / len(rows) * temperature**2


def ensemble_kl(s: torch.Tensor, teachers: list[torch.Tensor], temperature: float) -> float:
    """T² · mean over rows of KL(mean_k softmax(t_k/T) ‖ softmax(s/T))."""
    total = 0.0
    for i, srow in enumerate(s.double().tolist()):
        outs = [probs(t[i].double().tolist(), temperature) for t in teachers]
        p_ens = [sum(col) / len(outs) for col in zip(*outs)]
        total += kl(p_ens, probs(srow, temperature))
    return total / len(s) * temperature**2


def dkd_terms(s_rows: list[list[float]], t_rows: list[list[float]], labels: list[int], t: float) -> tuple[float, float]:
    """DKD's TCKD / NCKD from explicit target / non-target probabilities."""
    tckd = nckd = 0.0
    for s, z, y in zip(s_rows, t_rows, labels):
        ps, pt = probs(s, t), probs(z, t)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        qs = [p / (1 - ps[y]) for i, p in enumerate(ps) if i != y]
        qt = [p / (1 - pt[y]) for i, p in enumerate(pt) if i != y]
        nckd += kl(qt, qs)
    n = len(labels)
    return tckd / n * t * t, nckd / n * t * t


def standardize(z: list[float], eps: float = 1e-7) -> list[float]:
    """Logit standardization: (z − mean) / (population std + eps)."""
    mean = sum(z) / len(z)
    std = math.sqrt(sum((v - mean) ** 2 for v in z) / len(z))
    return [(v - mean) / (std + eps) for v in z]


def standardize_rows(x: torch.Tensor) -> torch.Tensor:
    """:func:`standardize` on every row, back as a float64 tensor (for the other references)."""
    return torch.tensor([standardize(row) for row in x.double().tolist()], dtype=torch.float64)


def pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    """Σ (a − ā)(b − b̄) / (sqrt(Σ (a − ā)²) · sqrt(Σ (b − b̄)²) + eps)."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    na = math.sqrt(sum((x - ma) ** 2 for x in a))
    nb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / (na * nb + eps)


def dist_terms(s: torch.Tensor, t: torch.Tensor, temperature: float) -> tuple[float, float]:
    """DIST's relation losses: T² · mean over rows (inter) and over columns (intra) of
    1 − pearson between the probability tables softmax(s/T) and softmax(t/T)."""
    ps = [probs(row, temperature) for row in s.double().tolist()]
    pt = [probs(row, temperature) for row in t.double().tolist()]
    rows, cols = len(ps), len(ps[0])
    inter = sum(1 - pearson(ps[i], pt[i]) for i in range(rows)) / rows
    intra = sum(1 - pearson([ps[i][j] for i in range(rows)], [pt[i][j] for i in range(rows)])
                for j in range(cols)) / cols
    return inter * temperature**2, intra * temperature**2


def attention_transfer(fs: torch.Tensor, ft: torch.Tensor, p: float = 2) -> float:
    """Loops: map[n][j] = mean_c |f|^p, L2-normalised per sample, squared difference averaged
    over positions and samples (same spatial size)."""
    n, _, h, w = fs.shape
    total = 0.0
    for i in range(n):
        a_s = [sum(abs(fs[i, c, y, x].item()) ** p for c in range(fs.shape[1])) / fs.shape[1]
               for y in range(h) for x in range(w)]
        a_t = [sum(abs(ft[i, c, y, x].item()) ** p for c in range(ft.shape[1])) / ft.shape[1]
               for y in range(h) for x in range(w)]
        ns, nt = math.sqrt(sum(v * v for v in a_s)), math.sqrt(sum(v * v for v in a_t))
        total += sum((u / ns - v / nt) ** 2 for u, v in zip(a_s, a_t)) / (h * w)
    return total / n
