"""T×α sweeps: read finished DVC experiments (``dvc exp show --json``) and draw the distilled
student's test accuracy as a heatmap plus a sorted markdown table.

The parsing of ``dvc exp show --json`` (:func:`run_exp_show`, :func:`exp_commits`,
:class:`ExpRecord`) lives here and is shared with :mod:`kdpipe.replicate`.

The grid is DVC's queue, one named experiment per point (:func:`run_sweep`, through
:mod:`kdpipe.expqueue` like ``kdpipe replicate``)::

    kdpipe sweep --temperatures 1,2,4 --alphas 0.5,0.9 --jobs 2 [--target evaluate]
    kdpipe sweep-report --out reports/sweep

which is ``dvc exp run --queue -n sweep-T<t>-a<a> -S kd.temperature=<t> -S kd.alpha=<a>`` per
point and ``dvc queue start -j 2``; DVC's own grid syntax (``-S 'kd.temperature=1,2,4'``)
works as well, with random names.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe import paths
from kdpipe.errors import KdpipeError

PARAMS_FILE = "params.yaml"
EVALUATION_FILE = "metrics/evaluation.json"
NAME_PREFIX = "sweep-"


@dataclass(frozen=True)
class SweepRow:
    name: str
    rev: str
    timestamp: str
    temperature: float
    alpha: float
    accuracy: float
    baseline: float | None

    @property
    def gain(self) -> float | None:
        return None if self.baseline is None else self.accuracy - self.baseline


@dataclass(frozen=True)
class ExpRecord:
    """One run as ``dvc exp show --json`` reports it: a commit or an experiment of one."""

    name: str  # the experiment's name; for a commit its branch/tag name, else its short rev
    rev: str
    timestamp: str
    params: dict[str, Any]  # params.yaml, nested as in the file
    evaluation: dict[str, Any]  # metrics/evaluation.json
    deps: dict[str, str]  # dependency path -> hash
    outs: dict[str, str]  # output path -> hash
    failed: bool  # dvc reported an error for it
    baseline: str = ""  # an experiment's commit rev; "" for a commit


def run_exp_show(repo: str | Path = ".", all_commits: bool = False) -> Any:
    """``dvc exp show --json`` in ``repo``, parsed."""
    cmd = ["dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    try:
        out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise KdpipeError("the dvc command is not on PATH; activate the project's virtual environment.") from None
    if out.returncode != 0:
        raise KdpipeError(f"'{' '.join(cmd)}' failed in {repo}: {out.stderr.strip().splitlines()[-1:] or '?'}.")
    return json.loads(out.stdout)


def _file_data(files: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    entry = (files or {}).get(name)
    return entry.get("data") if isinstance(entry, dict) else None


def _record(rev: dict[str, Any], name: str, baseline: str = "") -> ExpRecord:
    data = rev.get("data") or {}
    hashes = {kind: {path: (entry or {}).get("hash") or "" for path, entry in (data.get(kind) or {}).items()}
              for kind in ("deps", "outs")}
    return ExpRecord(name, rev.get("rev") or data.get("rev") or "", data.get("timestamp") or "",
                     _file_data(data.get("params"), PARAMS_FILE) or {},
                     _file_data(data.get("metrics"), EVALUATION_FILE) or {}, hashes["deps"], hashes["outs"],
                     bool(rev.get("error")), baseline)


def exp_commits(exp_show: Any) -> Iterator[tuple[ExpRecord, list[ExpRecord]]]:
    """(commit, its experiments) for every commit shown, newest first as dvc lists them; the
    ``workspace`` entry is left out. An experiment's record is its latest result."""
    for commit in exp_show or []:
        if commit.get("rev") == "workspace":
            continue
        record = _record(commit, commit.get("name") or (commit.get("rev") or "")[:7])
        experiments = []
        for exp in commit.get("experiments") or []:
            revs = exp.get("revs") or []
            if revs:  # the first rev is the experiment's latest result
                name = exp.get("name") or revs[0].get("name") or revs[0]["rev"][:7]
                experiments.append(_record(revs[0], name, record.rev))
        yield record, experiments


def experiment_records(exp_show: Any) -> Iterator[ExpRecord]:
    """Every experiment under every commit shown."""
    for _, experiments in exp_commits(exp_show):
        yield from experiments


def _sweep_experiments(exp_show: Any) -> list[ExpRecord]:
    """Every experiment shown except seed replicates (kdpipe replicate): those differ from
    their commit in student.seed, so they are no points of a T×α sweep."""
    points = []
    for commit, experiments in exp_commits(exp_show):
        seed = (commit.params.get("student") or {}).get("seed")
        points += [exp for exp in experiments if (exp.params.get("student") or {}).get("seed") == seed]
    return points


def collect_rows(exp_show: Any, method: str = "logit") -> list[SweepRow]:
    """One row per finished experiment that has kd.temperature, kd.alpha and the method's accuracy."""
    key = paths.distilled_name(method)
    return [row for exp in _sweep_experiments(exp_show) for row in _sweep_row(exp, key)]


def why_no_rows(exp_show: Any, method: str, head_only: bool = False) -> str:
    """Why :func:`collect_rows` found nothing for ``method``, as one sentence: no experiments,
    only seed replicates, none finished, or a method that none of them distilled.
    ``head_only``: ``exp_show`` is dvc's answer without --all-commits."""
    from kdpipe.distill.base import METHODS

    start = "run the sweep first (dvc exp run --queue -S 'kd.temperature=...' -S 'kd.alpha=...', dvc queue start)"
    everything = list(experiment_records(exp_show))
    points = _sweep_experiments(exp_show)
    finished = [exp for exp in points if not exp.failed and exp.evaluation]
    if not everything:
        where = " of the HEAD commit (--all-commits adds older commits)" if head_only else ""
        return f"dvc exp show lists no experiments{where}; {start}."
    if not points:
        return (f"the {len(everything)} experiment(s) shown are seed replicates (they differ from their commit in "
                f"student.seed), not points of a T×α sweep; {start}.")
    if not finished:
        failed = sum(exp.failed for exp in points)
        return (f"none of the {len(points)} experiment(s) finished ({failed} failed, {len(points) - failed} "
                f"without {EVALUATION_FILE}); see dvc exp show and dvc queue logs.")
    found = sorted({paths.distilled_method(model) for exp in finished for model in exp.evaluation
                    if paths.is_distilled(model)})
    listed = ", ".join(found) or "none"
    if method not in found and method not in METHODS.names():
        return (f"--method {method!r} is neither a method of the sweep's experiments ({listed}) nor a known "
                f"KD method ({', '.join(METHODS.names())}).")
    if method not in found:
        return (f"none of the {len(finished)} finished experiment(s) distilled with {method} (they have: "
                f"{listed}); pass one of those to --method, or sweep with {method} in kd.methods.")
    return (f"no finished experiment with {paths.distilled_name(method)} in {EVALUATION_FILE} has kd.temperature "
            f"and kd.alpha in {PARAMS_FILE}; {start}.")


def _sweep_row(exp: ExpRecord, key: str) -> list[SweepRow]:
    """The experiment as a sweep row, or nothing when it lacks T, alpha or the method's accuracy."""
    kd = exp.params.get("kd") or {}
    if exp.failed or key not in exp.evaluation or "temperature" not in kd or "alpha" not in kd:
        return []
    baseline = (exp.evaluation.get(paths.BASELINE) or {}).get("test_accuracy")
    return [SweepRow(exp.name, exp.rev, exp.timestamp, float(kd["temperature"]), float(kd["alpha"]),
                     float(exp.evaluation[key]["test_accuracy"]), None if baseline is None else float(baseline))]


def grid(rows: Sequence[SweepRow]) -> tuple[list[float], list[float], list[list[float]]]:
    """Temperatures (rows), alphas (columns) and accuracies; NaN where no experiment ran and
    the newest experiment where several share a cell."""
    temps = sorted({r.temperature for r in rows})
    alphas = sorted({r.alpha for r in rows})
    cells: dict[tuple[float, float], SweepRow] = {}
    for r in rows:
        old = cells.get((r.temperature, r.alpha))
        if old is None or r.timestamp > old.timestamp:
            cells[(r.temperature, r.alpha)] = r
    values = [[cells[(t, a)].accuracy if (t, a) in cells else math.nan for a in alphas] for t in temps]
    return temps, alphas, values


def markdown_table(rows: Sequence[SweepRow], method: str) -> str:
    ordered = sorted(rows, key=lambda r: (-r.accuracy, r.temperature, r.alpha, r.name))
    lines = [f"| Rank | Experiment | T | α | {paths.distilled_name(method)} test acc. (%) | vs baseline (pt) |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(ordered, 1):
        gain = "–" if r.gain is None else f"{r.gain:+.2f}"
        lines.append(f"| {i} | {r.name} | {r.temperature:g} | {r.alpha:g} | {r.accuracy:.2f} | {gain} |")
    return "\n".join(lines) + "\n"


def plot_heatmap(rows: Sequence[SweepRow], method: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from kdpipe.io import atomic_path

    model = paths.distilled_name(method)
    temps, alphas, values = grid(rows)
    arr = np.array(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(alphas) + 2.5, 0.8 * len(temps) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(arr), cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(temps)), [f"{t:g}" for t in temps])
    ax.set(xlabel="kd.alpha (weight of the soft term)", ylabel="kd.temperature",
           title=f"{model}: test accuracy (%)")
    finite = arr[np.isfinite(arr)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(temps)):
        for j in range(len(alphas)):
            if np.isfinite(arr[i, j]):
                ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if arr[i, j] < middle else "black")
    baselines = {r.baseline for r in rows if r.baseline is not None}
    if len(baselines) == 1:
        ax.set_title(f"{model}: test accuracy (%); baseline {baselines.pop():.2f}", fontsize=10)
    fig.colorbar(image, ax=ax, label="test accuracy (%)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def sweep_report(out_dir: str | Path, method: str = "logit", exp_show: Any = None, repo: str | Path = ".",
                 all_commits: bool = False) -> list[SweepRow]:
    """Write ``sweep_heatmap.png`` and ``sweep_table.md`` into ``out_dir``; return the rows."""
    from kdpipe.io import atomic_path

    head_only = exp_show is None and not all_commits
    if exp_show is None:
        exp_show = run_exp_show(repo, all_commits)
    rows = collect_rows(exp_show, method)
    model = paths.distilled_name(method)
    if not rows:
        raise KdpipeError(why_no_rows(exp_show, method, head_only))
    out = Path(out_dir)
    plot_heatmap(rows, method, out / "sweep_heatmap.png")
    with atomic_path(out / "sweep_table.md") as tmp:
        tmp.write_text(f"# T×α sweep: {model}\n\n{len(rows)} experiments, best first.\n\n"
                       + markdown_table(rows, method))
    return rows


# ---- running a grid ---------------------------------------------------------------------------


def _value(number: float) -> str:
    """A number as -S takes it and a name shows it: 2, 0.5, 0.125 (every digit kept)."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


def point_name(temperature: float, alpha: float) -> str:
    """The experiment name of a grid point: ``sweep-T<t>-a<alpha>`` (e.g. sweep-T2-a0.5)."""
    return f"{NAME_PREFIX}T{_value(temperature)}-a{_value(alpha)}"


def grid_experiments(temperatures: Sequence[float], alphas: Sequence[float], sets: Sequence[str] = (),
                     targets: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """One (name, ``dvc exp run`` arguments) per (T, α), T-major; every value checked by the params
    validation first, so a bad one stops here and not in each queued experiment."""
    from kdpipe.config import parse_params

    temperatures, alphas = list(dict.fromkeys(temperatures)), list(dict.fromkeys(alphas))
    if not temperatures or not alphas:
        raise KdpipeError("a sweep needs at least one temperature and one alpha, e.g. --temperatures 1,2,4 "
                          "--alphas 0.5,0.9.")
    for t in temperatures:
        for a in alphas:
            parse_params({"kd": {"temperature": t, "alpha": a}})
    extra = [arg for s in sets for arg in ("-S", s)]
    return [(point_name(t, a), ["-S", f"kd.temperature={_value(t)}", "-S", f"kd.alpha={_value(a)}", *extra, *targets])
            for t in temperatures for a in alphas]


def run_sweep(temperatures: Sequence[float], alphas: Sequence[float], repo: str | Path = ".", jobs: int = 1,
              sets: Sequence[str] = (), targets: Sequence[str] = (), poll_seconds: float = 5.0,
              timeout_seconds: float | None = None, runner: Callable[..., Any] = subprocess.run,
              log: Callable[[str], None] = print) -> dict[str, str]:
    """Queue the T×α grid (:func:`grid_experiments`), run it with ``jobs`` workers and wait;
    return name -> final state."""
    from kdpipe.expqueue import run_queued

    return run_queued(grid_experiments(temperatures, alphas, sets, targets), repo, jobs, poll_seconds,
                      timeout_seconds, runner, log, what="sweep experiments")
