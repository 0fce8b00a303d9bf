"""Seed replicates: the same experiment N times with only ``student.seed`` changed, through
DVC's queue, and their aggregate (mean ± std per model, paired differences against the baseline).

``student.seed`` seeds everything of the student runs (initialisation, batch order, augmented
views, hence the teacher_targets cache) while the global ``seed`` keeps seeding the split and
the teacher, so every replicate reuses the committed split and teacher from DVC's cache::

    kdpipe replicate --seeds 3            # dvc exp run --queue -n seed-<s> -S student.seed=<s>, s = 1..3
    kdpipe replicate-report --out reports/replicates

The report takes the baseline commit (HEAD) and its experiments that differ from it in
``student.seed`` only (every other param equal, the same code, split and teacher), one
replicate per resolved student seed; the commit's own run counts as the replicate of its
seed (``student.seed: null`` resolves to ``seed``).
"""

from __future__ import annotations

import copy
import math
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe import paths
from kdpipe.errors import KdpipeError
from kdpipe.expqueue import run_queued
from kdpipe.sweep import EVALUATION_FILE, ExpRecord, exp_commits, run_exp_show

NAME_PREFIX = "seed-"
TABLE_FILE = "replicates.md"
FIGURE_FILE = "replicates.png"
# Inputs a replicate must share with the baseline commit: the split, the teacher and the code.
FIXED_DEPS = ("data/prepared", paths.model_path(paths.TEACHER).as_posix())
CODE_DIRS = ("src/", "stages/")


def experiment_name(seed: int) -> str:
    return f"{NAME_PREFIX}{seed}"


# ---- running them ---------------------------------------------------------------------------


def run_replicates(seeds: Sequence[int], repo: str | Path = ".", jobs: int = 1, poll_seconds: float = 5.0,
                   timeout_seconds: float | None = None, runner: Callable[..., Any] = subprocess.run,
                   log: Callable[[str], None] = print) -> dict[str, str]:
    """Queue one experiment per seed (``dvc exp run --queue -n seed-<s> -S student.seed=<s>``),
    start ``jobs`` workers, wait until all of them ended; return name -> final state."""
    seeds = list(dict.fromkeys(seeds))
    if not seeds:
        raise KdpipeError("no seeds to run; pass --seeds N (N >= 1).")
    experiments = [(experiment_name(s), ["-S", f"student.seed={s}"]) for s in seeds]
    return run_queued(experiments, repo, jobs, poll_seconds, timeout_seconds, runner, log, what="replicates",
                      taken_hint=" or start at another seed (--first)")


# ---- which runs are replicates --------------------------------------------------------------


@dataclass(frozen=True)
class Replicate:
    name: str  # experiment name, or the commit's name for the baseline commit's own run
    seed: int  # the resolved student seed
    accuracies: dict[str, float]  # model -> test accuracy (%)
    timestamp: str = ""


def resolved_student_seed(params: dict[str, Any]) -> int | None:
    """``student.seed`` of a params.yaml mapping, or the global ``seed`` when it is null."""
    seed = (params.get("student") or {}).get("seed")
    return params.get("seed") if seed is None else seed


def _without_student_seed(params: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(params)
    (out.get("student") or {}).pop("seed", None)
    return out


def _fixed_deps(deps: dict[str, str]) -> dict[str, str]:
    return {path: h for path, h in deps.items() if path in FIXED_DEPS or path.startswith(CODE_DIRS)}


def _student_models(outs: dict[str, str]) -> list[str]:
    """The student model files among ``outs`` (models/baseline.pt, models/distilled_<m>.pt)."""
    return [p for p in outs if p.startswith(paths.MODELS_DIR.as_posix() + "/")
            and (Path(p).stem == paths.BASELINE or paths.is_distilled(Path(p).stem))]


def _mismatch(exp: ExpRecord, commit: ExpRecord) -> str | None:
    """Why ``exp`` is not a seed replicate of ``commit`` (None when it is)."""
    if exp.failed or not exp.evaluation:
        return "failed or unfinished"
    if _without_student_seed(exp.params) != _without_student_seed(commit.params):
        return "other params differ"
    ours, theirs = _fixed_deps(exp.deps), _fixed_deps(commit.deps)
    changed = sorted(p for p in ours.keys() & theirs.keys() if ours[p] != theirs[p])
    if changed:
        return "other inputs differ: " + ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
    if resolved_student_seed(exp.params) != resolved_student_seed(commit.params):
        stale = sorted(p for p in _student_models(exp.outs) if exp.outs[p] and exp.outs[p] == commit.outs.get(p))
        if stale:  # e.g. an experiment run with a target that stops before the students
            return f"not re-run for its student seed ({', '.join(stale)} unchanged from the commit)"
    return None


def _accuracies(evaluation: dict[str, Any]) -> dict[str, float]:
    return {model: float(row["test_accuracy"]) for model, row in evaluation.items()
            if isinstance(row, dict) and row.get("test_accuracy") is not None}


def collect_replicates(exp_show: Any) -> tuple[ExpRecord, list[Replicate], dict[str, str]]:
    """The baseline commit (the first commit shown: HEAD), its seed replicates (its own run
    first, then its experiments, sorted by seed; one per seed, the newest), and the
    experiments left out with the reason."""
    commits = list(exp_commits(exp_show))
    if not commits:
        raise KdpipeError("dvc exp show lists no commit; commit the project and run kdpipe replicate first.")
    commit, experiments = commits[0]
    skipped: dict[str, str] = {}
    by_seed: dict[int, Replicate] = {}
    for exp in sorted(experiments, key=lambda e: e.timestamp, reverse=True):
        why = _mismatch(exp, commit)
        seed = resolved_student_seed(exp.params)
        if why is None and seed in by_seed:
            why = f"an older run of student seed {seed}"
        if why is not None:
            skipped[exp.name] = why
            continue
        by_seed[seed] = Replicate(exp.name, seed, _accuracies(exp.evaluation), exp.timestamp)
    own_seed = resolved_student_seed(commit.params)
    replicates = []
    if commit.evaluation and not commit.failed and own_seed is not None:
        own = Replicate(f"commit {commit.rev[:7]}", own_seed, _accuracies(commit.evaluation), commit.timestamp)
        if own_seed in by_seed:  # the same seed twice gives the same numbers: keep the commit's
            skipped[by_seed.pop(own_seed).name] = f"same student seed as the commit ({own_seed})"
        replicates.append(own)
    replicates += sorted(by_seed.values(), key=lambda r: r.seed)
    return commit, replicates, skipped


# ---- statistics -----------------------------------------------------------------------------


def t_quantile(df: int, q: float = 0.975) -> float:
    """Quantile ``q`` of Student's t distribution with ``df`` degrees of freedom."""
    from scipy import stats  # scikit-learn's dependency, so always installed

    return float(stats.t.ppf(q, df))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass(frozen=True)
class ModelSummary:
    model: str
    n: int
    mean: float
    std: float


@dataclass(frozen=True)
class PairedDiff:
    """``model`` − baseline over the seeds where both ran: mean, 95% t-interval, wins/ties/losses."""

    model: str
    n: int
    mean: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int


def paired_diff(a: Sequence[float], b: Sequence[float], model: str = "", confidence: float = 0.95) -> PairedDiff:
    """Differences ``a[i] - b[i]``: mean ± t_{(1+c)/2, n-1} · sd / √n (NaN bounds for n < 2)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean, sd = mean_std(diffs)
    if n < 2:
        low = high = math.nan
    else:
        half = t_quantile(n - 1, (1 + confidence) / 2) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    eps = 1e-9
    return PairedDiff(model, n, mean, low, high, sum(d > eps for d in diffs), sum(abs(d) <= eps for d in diffs),
                      sum(d < -eps for d in diffs))


def models_in(replicates: Sequence[Replicate]) -> list[str]:
    """Every model of any replicate, in the pipeline's order (teacher, baseline, distilled_*)."""
    seen = dict.fromkeys(m for r in replicates for m in r.accuracies)
    return sorted(seen, key=lambda m: (m != paths.TEACHER, m != paths.BASELINE))


def summarize(replicates: Sequence[Replicate]) -> tuple[list[ModelSummary], list[PairedDiff]]:
    summaries, diffs = [], []
    for model in models_in(replicates):
        values = [r.accuracies[model] for r in replicates if model in r.accuracies]
        summaries.append(ModelSummary(model, len(values), *mean_std(values)))
        if paths.is_distilled(model):
            pairs = [(r.accuracies[model], r.accuracies[paths.BASELINE]) for r in replicates
                     if model in r.accuracies and paths.BASELINE in r.accuracies]
            if pairs:
                diffs.append(paired_diff([p[0] for p in pairs], [p[1] for p in pairs], model))
    return summaries, diffs


# ---- report ---------------------------------------------------------------------------------


def _num(value: float, fmt: str = ".2f") -> str:
    return "–" if math.isnan(value) else format(value, fmt)


def markdown_table(replicates: Sequence[Replicate]) -> str:
    summaries, diffs = summarize(replicates)
    by_model = {d.model: d for d in diffs}
    lines = ["| Model | Test acc. (%) mean ± std | n | vs baseline (pt) | 95% CI (pt) | Wins / ties / losses |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        d = by_model.get(s.model)
        acc = f"{s.mean:.2f} ± {_num(s.std)}"
        if d is None:
            lines.append(f"| {s.model} | {acc} | {s.n} | – | – | – |")
        else:
            ci = "–" if math.isnan(d.low) else f"[{d.low:+.2f}, {d.high:+.2f}]"
            lines.append(f"| {s.model} | {acc} | {s.n} | {d.mean:+.2f} | {ci} | {d.wins} / {d.ties} / {d.losses} |")
    return "\n".join(lines) + "\n"


def seeds_table(replicates: Sequence[Replicate]) -> str:
    models = models_in(replicates)
    lines = ["| Student seed | Run | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for r in replicates:
        cells = " | ".join(_num(r.accuracies.get(m, math.nan)) for m in models)
        lines.append(f"| {r.seed} | {r.name} | {cells} |")
    return "\n".join(lines) + "\n"


def report_text(commit: ExpRecord, replicates: Sequence[Replicate], skipped: dict[str, str]) -> str:
    seeds = ", ".join(str(r.seed) for r in replicates)
    teacher = commit.deps.get(FIXED_DEPS[1], "")
    parts = [
        "# Seed replicates\n",
        f"{len(replicates)} runs of commit {commit.rev[:7]} ({commit.name}) that differ only in the student's seed "
        f"(student seeds {seeds}): initialisation, batch order and augmented views vary; the split (seed "
        f"{commit.params.get('seed')}) and the teacher{f' ({teacher[:8]})' if teacher else ''} are the same in all.\n",
        "Test accuracy per model over the seeds (sample standard deviation), and for each distilled student the "
        "paired difference against the baseline of the same seed: its mean, a 95% t-interval (n − 1 degrees of "
        "freedom) and on how many seeds it beat / tied / lost to the baseline. An interval that contains 0 is no "
        "evidence of a difference.\n",
        markdown_table(replicates),
        "## Per seed\n",
        seeds_table(replicates),
    ]
    if skipped:
        parts += ["## Experiments left out\n", "".join(f"- {name}: {why}\n" for name, why in sorted(skipped.items()))]
    return "\n".join(parts)


def plot_replicates(replicates: Sequence[Replicate], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdpipe.io import atomic_path

    summaries, diffs = summarize(replicates)
    ncols = 2 if diffs else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.0), squeeze=False)
    ax = axes[0][0]
    for i, s in enumerate(summaries):
        values = [r.accuracies[s.model] for r in replicates if s.model in r.accuracies]
        ax.scatter([i] * len(values), values, s=18, alpha=0.6, color="tab:blue", zorder=2)
        ax.errorbar(i + 0.15, s.mean, yerr=0 if math.isnan(s.std) else s.std, fmt="o", color="black",
                    capsize=4, zorder=3)
    ax.set_xticks(range(len(summaries)), [s.model for s in summaries], rotation=20, ha="right")
    ax.set_xlim(-0.5, len(summaries) - 0.5)
    ax.set(ylabel="test accuracy (%)", title=f"per seed (dots), mean ± std, n = {len(replicates)}")
    ax.grid(axis="y", alpha=0.3)
    if diffs:
        ax = axes[0][1]
        for i, d in enumerate(diffs):
            values = [r.accuracies[d.model] - r.accuracies[paths.BASELINE] for r in replicates
                      if d.model in r.accuracies and paths.BASELINE in r.accuracies]
            ax.scatter([i] * len(values), values, s=18, alpha=0.6, color="tab:orange", zorder=2)
            if not math.isnan(d.low):
                ax.errorbar(i + 0.15, d.mean, yerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o", color="black",
                            capsize=4, zorder=3)
            else:
                ax.plot(i + 0.15, d.mean, "o", color="black", zorder=3)
        ax.axhline(0.0, color="gray", lw=1, ls="--")
        ax.set_xticks(range(len(diffs)), [d.model for d in diffs], rotation=20, ha="right")
        ax.set_xlim(-0.5, len(diffs) - 0.5)
        ax.set(ylabel="vs baseline, same seed (points)", title="paired difference, mean and 95% t-interval")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def why_no_replicates(commit: ExpRecord, skipped: dict[str, str]) -> str:
    """Why :func:`collect_replicates` found no replicate, as one sentence."""
    named = f" ({commit.name})" if commit.name and commit.name != commit.rev[:7] else ""
    own = f"commit {commit.rev[:7]}{named} has no finished run"
    if not commit.evaluation:
        own += f" (its {EVALUATION_FILE} is not committed)"
    if not skipped:
        return f"{own} and no experiments; run kdpipe replicate --seeds N first."
    reasons = "; ".join(f"{name}: {why}" for name, why in sorted(skipped.items())[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return (f"{own}, and none of its {len(skipped)} experiment(s) is a finished seed replicate of it "
            f"({reasons}{more}); see kdpipe replicate-report --help for what counts as one.")


def replicate_report(out_dir: str | Path, exp_show: Any = None, repo: str | Path = ".") -> list[Replicate]:
    """Write ``replicates.md`` and ``replicates.png`` into ``out_dir``; return the replicates."""
    from kdpipe.io import atomic_path

    if exp_show is None:
        exp_show = run_exp_show(repo)
    commit, replicates, skipped = collect_replicates(exp_show)
    if not replicates:
        raise KdpipeError(why_no_replicates(commit, skipped))
    out = Path(out_dir)
    plot_replicates(replicates, out / FIGURE_FILE)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / TABLE_FILE) as tmp:
        tmp.write_text(report_text(commit, replicates, skipped))
    return replicates
