"""Figures and the markdown report, from what evaluate wrote (no model is re-run here)."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from kdpipe import paths  # noqa: E402
from kdpipe.config import Params  # noqa: E402
from kdpipe.data.prepare import PreparedData, load_prepared  # noqa: E402
from kdpipe.evaluate import confusion_matrix  # noqa: E402
from kdpipe.io import atomic_path, read_json  # noqa: E402
from kdpipe.stats import is_significant  # noqa: E402
from kdpipe.tracking import stage_run  # noqa: E402
from kdpipe.validation import as_dict  # noqa: E402

TIMING_PATH = paths.METRICS_DIR / "timing" / "evaluate.json"
# Cells and figures that need more than this many classes drop their per-cell text.
MAX_ANNOTATED_CLASSES = 12
RIGHT, WRONG = "#1a7f37", "#c62828"

# ---- cells -----------------------------------------------------------------------------------


def _interval(value: Any, digits: int = 2, signed: bool = False) -> str | None:
    """``[low, high]`` as ``low to high`` text (``None`` when absent)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{fmt.format(value[0])} to {fmt.format(value[1])}"


def _p_value(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3g}"


def _p_text(p: float) -> str:
    """``p=0.14`` or ``p<0.001``."""
    return "p<0.001" if p < 0.001 else f"p={p:.3g}"


def vs_teacher(m: dict[str, Any]) -> float | None:
    """Student − teacher in points (positive: the student is better).

    Reads ``accuracy_vs_teacher``; an evaluation.json from before it existed has only
    ``accuracy_drop`` (teacher − student), whose negation is the same number.
    """
    if m.get("accuracy_vs_teacher") is not None:
        value = float(m["accuracy_vs_teacher"])
    elif m.get("accuracy_drop") is not None:
        value = -float(m["accuracy_drop"])
    else:
        return None
    return value + 0.0  # -0.0 → 0.0, so a tie prints as +0.00


def _diff_cell(m: dict[str, Any]) -> str | None:
    if "accuracy_diff_vs_baseline" not in m:
        return None
    diff = f"{m['accuracy_diff_vs_baseline']:+.2f}"
    interval = _interval(m.get("accuracy_diff_ci95"), signed=True)
    return f"{diff} [{interval}]" if interval else diff


def _gap_cell(m: dict[str, Any]) -> str | None:
    if "accuracy_diff_vs_baseline" not in m:
        return None
    return "n/a" if m.get("gap_closed") is None else f"{m['gap_closed'] * 100:.0f}%"


def _vs_teacher_cell(m: dict[str, Any]) -> str | None:
    value = vs_teacher(m)
    return None if value is None else f"{value:+.2f}"


def _simple(key: str, fmt: str) -> Callable[[dict[str, Any]], str | None]:
    return lambda m: fmt.format(m[key]) if m.get(key) is not None else None


def _timed(key: str, fmt: str) -> Callable[[dict[str, Any]], str | None]:
    """A cell from the model's timing record (``m["timing"]``, see :func:`load_timing`)."""
    return lambda m: _simple(key, fmt)(m.get("timing") or {})


def _spread_cell(m: dict[str, Any]) -> str | None:
    t = m.get("timing") or {}
    if t.get("latency_ms_p10") is None or t.get("latency_ms_p90") is None:
        return None
    return f"{t['latency_ms_p10']:.3f} to {t['latency_ms_p90']:.3f}"


Cell = Callable[[dict[str, Any]], str | None]

# (title, cell) for each column of each table, the one place a column is defined. A cell reads
# one model's evaluation.json entry, with its timing record under "timing"; None shows as "–".
TABLE_COLUMNS: dict[str, list[tuple[str, Cell]]] = {
    "quality": [
        ("Test acc. (%)", _simple("test_accuracy", "{:.2f}")),
        ("95% CI (%)", lambda m: _interval(m.get("test_accuracy_ci95"))),
        ("vs baseline (pt) [95% CI]", _diff_cell),
        ("McNemar p", lambda m: _p_value(m["mcnemar_p"]) if m.get("mcnemar_p") is not None else None),
        ("Gap closed", _gap_cell),
        ("vs teacher (pt)", _vs_teacher_cell),
    ],
    "cost": [
        ("Params", _simple("params", "{:,}")),
        ("Size (MB)", _simple("size_mb", "{:.3f}")),
        ("Compression", _simple("compression_ratio", "{:.1f}×")),
        ("Latency b=1, median (ms)", _timed("latency_ms_p50", "{:.3f}")),
        ("Latency p10 to p90 (ms)", _spread_cell),
        ("Throughput (img/s)", _timed("throughput_ips", "{:,.0f}")),
        ("Speed-up", _timed("speedup", "{:.2f}×")),
        ("Efficiency", _timed("efficiency", "{:.1f}")),
    ],
}


def comparison_table(records: dict[str, dict[str, Any]], table: str = "quality") -> str:
    """One markdown table of ``TABLE_COLUMNS[table]``, a row per model."""
    columns = TABLE_COLUMNS[table]
    header = "| Model | " + " | ".join(title for title, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, metrics in records.items():
        cells = [cell(metrics) or "–" for _, cell in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- inputs ----------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load_timing(path: Path, evaluation: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The timing of every model from ``path`` (metrics/timing/evaluate.json), or ``None`` when
    there is none (the report then says so)."""
    if Path(path).exists():
        timing = read_json(path)
        return {**timing, "source": str(path)}
    return None


def _records(evaluation: dict[str, dict[str, Any]], timing: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each model's evaluation entry with its timing record under ``"timing"``."""
    models = (timing or {}).get("models", {})
    return {name: {**m, "timing": models.get(name, {})} for name, m in evaluation.items()}


def read_histories(history_dir: Path, names: list[str]) -> dict[str, list[dict[str, str]]]:
    """Each model's per-epoch history (plots/history/<name>.csv); models without one are left out."""
    return {n: _read_csv(history_dir / f"{n}.csv") for n in names if (history_dir / f"{n}.csv").exists()}


# ---- figure helpers --------------------------------------------------------------------------

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
_MARKERS = ["o", "^", "v", "P", "X", "<", ">", "h", "*"]


def model_styles(names: list[str]) -> dict[str, dict[str, str]]:
    """One colour and marker per model, the same in every figure (teacher dark, baseline grey)."""
    styles = {}
    students = [n for n in names if n not in (paths.TEACHER, paths.BASELINE)]
    for name in names:
        if name == paths.TEACHER:
            styles[name] = {"color": "#222222", "marker": "s"}
        elif name == paths.BASELINE:
            styles[name] = {"color": "#8c8c8c", "marker": "D"}
        else:
            i = students.index(name)
            styles[name] = {"color": _PALETTE[i % len(_PALETTE)], "marker": _MARKERS[i % len(_MARKERS)]}
    return styles


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=110, bbox_inches="tight")
    plt.close(fig)


def log_ticks(low: float, high: float) -> list[float]:
    """Three to seven round ticks for a log axis from ``low`` to ``high`` (powers of ten, else
    1-3, 1-2-5 or finer steps), so their labels never run into each other."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    ticks: list[float] = []
    for mantissas in ((1.0,), (1.0, 3.0), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)):
        ticks = [float(f"{m * 10.0 ** e:.6g}") for e in range(first, last + 1) for m in mantissas
                 if low <= m * 10.0 ** e <= high]
        if len(ticks) >= 3:
            break
    while len(ticks) > 7:  # many decades: every other power of ten
        ticks = ticks[::2]
    if len(ticks) < 2:  # a range narrower than one 1-1.5-2-3-5-7 step
        ticks = [float(f"{low:.2g}"), float(f"{high:.2g}")]
    return ticks


def _log_x_axis(ax: plt.Axes, low: float, high: float) -> None:
    """Log x from ``low`` to ``high`` (padded), labelled with :func:`log_ticks` in plain numbers."""
    low, high = low / 1.6, high * 1.6
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.xaxis.set_major_locator(FixedLocator(log_ticks(low, high)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def dodge_offsets(xs: list[float], step: float = 8.0) -> list[float]:
    """Sideways offsets (points) for models at the same cost (within 3% on a log x), whose
    markers and accuracy whiskers would sit on top of each other: spread ``step`` apart around
    their true x, in model order."""
    offsets = [0.0] * len(xs)
    groups: list[list[int]] = []
    for i in range(len(xs)):
        group = next((g for g in groups if abs(math.log(xs[i] / xs[g[0]])) < 0.03), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    for group in groups:
        for k, i in enumerate(group):
            offsets[i] = (k - (len(group) - 1) / 2) * step
    return offsets


def _text_colour(image: Any, value: float) -> str:
    """White on a dark cell of ``image``'s colour map, black on a light one."""
    r, g, b, _ = image.cmap(image.norm(value))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def _broken_axis_mark(ax: plt.Axes) -> None:
    """The // mark at the left end of the x axis: the axis does not start at 0."""
    for dx in (0.0, 0.012):
        ax.plot([dx - 0.008, dx + 0.008], [-0.025, 0.025], transform=ax.transAxes, color="black", lw=1,
                clip_on=False)


# ---- figures ---------------------------------------------------------------------------------


def plot_accuracy(evaluation: dict[str, dict[str, Any]], test_images: int, path: Path) -> None:
    """Left: each model's test accuracy with its 95% Wilson interval (dot and whisker, so the
    zoomed axis, marked as broken, is honest). Right: each distilled student minus the
    baseline with its paired 95% interval and the zero line: the comparison that matters."""
    names = list(evaluation)
    styles = model_styles(names)
    fig, (ax_acc, ax_diff) = plt.subplots(1, 2, figsize=(11, 0.5 * len(names) + 1.8), sharey=True)
    lows = []
    for row, name in enumerate(names):
        m = evaluation[name]
        acc = m["test_accuracy"]
        low, high = m.get("test_accuracy_ci95") or (acc, acc)
        lows.append(low)
        ax_acc.errorbar(acc, row, xerr=[[acc - low], [high - acc]], fmt=styles[name]["marker"], ms=7, capsize=4,
                        color=styles[name]["color"])
        ax_acc.annotate(f"{acc:.2f}", (acc, row), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8)
    start = max(0.0, math.floor(min(lows) / 5) * 5 - 5)
    ax_acc.set_xlim(start, 100 + (100 - start) * 0.02)  # room for a dot at 100%
    if start > 0:
        _broken_axis_mark(ax_acc)
    ax_acc.set_yticks(range(len(names)), names)
    ax_acc.set_ylim(len(names) - 0.5, -0.7)
    ax_acc.set_xlabel(f"test accuracy (%): axis starts at {start:g}, not 0" if start > 0 else "test accuracy (%)")
    ax_acc.set_title(f"Test accuracy, 95% Wilson interval ({test_images:,} images)", fontsize=10)
    ax_acc.grid(axis="x", alpha=0.3)
    _plot_diffs(ax_diff, evaluation, styles)
    _save(fig, path)


def _plot_diffs(ax: plt.Axes, evaluation: dict[str, dict[str, Any]], styles: dict[str, dict[str, str]]) -> None:
    """Student − baseline (points) with its paired interval; filled marker: significant."""
    names = list(evaluation)
    ax.axvline(0, color="black", lw=1)
    reach = 1.0
    for row, name in enumerate(names):
        m = evaluation[name]
        if name == paths.BASELINE:
            ax.text(0, row, "  reference (0)", va="center", fontsize=8, color="#555555")
        if "accuracy_diff_vs_baseline" not in m:
            continue
        diff = m["accuracy_diff_vs_baseline"]
        low, high = m.get("accuracy_diff_ci95") or (diff, diff)
        reach = max(reach, abs(low), abs(high))
        significant = m.get("mcnemar_p") is not None and is_significant(low, high, m["mcnemar_p"])
        ax.errorbar(diff, row, xerr=[[diff - low], [high - diff]], fmt=styles[name]["marker"], ms=7, capsize=4,
                    color=styles[name]["color"], mfc=styles[name]["color"] if significant else "white")
        p = f", {_p_text(m['mcnemar_p'])}" if m.get("mcnemar_p") is not None else ""
        ax.annotate(f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]{p}", (1.02, row), xycoords=("axes fraction", "data"),
                    va="center", fontsize=8)
    ax.set_xlim(-reach * 1.2, reach * 1.2)
    ax.set_xlabel("distilled student − baseline (points)")
    ax.set_title("vs baseline: paired 95% bootstrap interval\nfilled marker: significant (interval excludes 0, "
                 "McNemar p < 0.05)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def plot_tradeoff(records: dict[str, dict[str, Any]], x_of: Callable[[dict[str, Any]], tuple[float, float, float]],
                  x_label: str, title: str, path: Path) -> None:
    """Accuracy (95% Wilson interval) against a cost on a log x; ``x_of`` gives (value, low, high).

    A legend names the models (no annotations to collide); markers that would hide each other
    (models of one size) are nudged sideways by a few pixels, their x value unchanged.
    """
    names = list(records)
    styles = model_styles(names)
    xs = [x_of(records[n]) for n in names]
    accs = [records[n]["test_accuracy"] for n in names]
    intervals = [records[n].get("test_accuracy_ci95") or (a, a) for n, a in zip(names, accs)]
    offsets = dodge_offsets([x[0] for x in xs])
    fig, ax = plt.subplots(figsize=(6.2, 4))
    for name, (x, x_low, x_high), acc, (low, high), dx in zip(names, xs, accs, intervals, offsets):
        xerr = [[x - x_low], [x_high - x]] if x_high > x_low else None
        ax.errorbar(x, acc, xerr=xerr, yerr=[[acc - low], [high - acc]],
                    fmt=styles[name]["marker"], ms=7, capsize=3, color=styles[name]["color"], label=name,
                    transform=offset_copy(ax.transData, fig=fig, x=dx, y=0, units="points"))
    _log_x_axis(ax, min(x[1] for x in xs), max(x[2] for x in xs))
    bottom, top = min(i[0] for i in intervals), max(i[1] for i in intervals)
    pad = max(0.5, 0.08 * (top - bottom))
    ax.set_ylim(bottom - pad, top + pad)  # set here: offset markers do not autoscale the axes
    ax.set(xlabel=x_label, ylabel="test accuracy (%), 95% interval", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if any(offsets):
        ax.annotate("models at (nearly) the\nsame x are drawn a few\npixels apart", (1.03, 0), xycoords="axes fraction",
                    fontsize=7, color="#555555", va="bottom")
    _save(fig, path)


def _size_x(m: dict[str, Any]) -> tuple[float, float, float]:
    return m["size_mb"], m["size_mb"], m["size_mb"]


def _latency_x(m: dict[str, Any]) -> tuple[float, float, float]:
    """Median latency with its p10 and p90 (the median itself when the spread was not recorded)."""
    t = m["timing"]
    p50 = t["latency_ms_p50"]
    return p50, t.get("latency_ms_p10", p50), t.get("latency_ms_p90", p50)


def _numeric_column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows]


def plot_curves(histories: dict[str, list[dict[str, str]]], path: Path) -> None:
    """Validation cross-entropy and validation accuracy of every model: the curves that are on
    one scale for all of them (training objectives are not; see plot_objectives)."""
    styles = model_styles(list(histories))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, rows in histories.items():
        epochs = _numeric_column(rows, "epoch")
        style = {"color": styles[name]["color"], "marker": styles[name]["marker"], "ms": 4,
                 "markevery": max(1, len(epochs) // 6), "label": name}
        ax_loss.plot(epochs, _numeric_column(rows, "val_loss"), **style)
        ax_acc.plot(epochs, _numeric_column(rows, "val_acc"), **style)
    ax_loss.set_yscale("log")
    ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_loss.set(xlabel="epoch", ylabel="validation cross-entropy (log scale)",
                title="Validation cross-entropy (same loss for every model)")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    _save(fig, path)


def objective_terms(row: dict[str, str]) -> list[str]:
    """The loss terms a history logs besides the total (``train_ce``, ``train_kd``, ...)."""
    return [k for k in row if k.startswith("train_") and k not in ("train_loss", "train_acc")]


def plot_objectives(histories: dict[str, list[dict[str, str]]], path: Path) -> None:
    """Each model's training objective and its terms on a panel and y scale of its own: a KD
    objective is a different loss from cross-entropy, so the totals are not compared."""
    names = list(histories)
    cols = len(names) if len(names) <= 5 else math.ceil(len(names) / 2)
    grid_rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(3.1 * cols, 3.5 * grid_rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        rows = histories[name]
        epochs = _numeric_column(rows, "epoch")
        total = _numeric_column(rows, "train_loss")
        ax.plot(epochs, total, color="black", lw=1.8, label="objective")
        terms = [t for t in objective_terms(rows[0]) if _numeric_column(rows, t) != total]
        for term, color in zip(terms, _PALETTE):
            ax.plot(epochs, _numeric_column(rows, term), color=color, lw=1, ls="--", label=term.removeprefix("train_"))
        if min(total + [v for t in terms for v in _numeric_column(rows, t)]) > 0:
            ax.set_yscale("log")  # losses fall by orders of magnitude; a zero term keeps it linear
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        parts = " + ".join(t.removeprefix("train_") for t in terms) if terms else "cross-entropy"
        ax.set_title(f"{name}\nobjective = {parts}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("training loss, as logged", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if terms:  # below the panel: inside, it would cover a curve
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=min(len(terms) + 1, 3),
                      frameon=False)
    fig.suptitle("Training objective per model (own y scale each: not comparable across methods; "
                 "compare validation cross-entropy instead)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_confusions(names: list[str], labels: torch.Tensor, preds: dict[str, torch.Tensor],
                    class_names: list[str], path: Path) -> None:
    """Row-normalised confusion matrices with a colour bar and, up to 12 classes, the counts."""
    k = len(class_names)
    cols = min(len(names), 3)
    grid_rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(3.7 * cols + 1, 3.7 * grid_rows), squeeze=False)
    annotate = k <= MAX_ANNOTATED_CLASSES
    image = None
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        conf = confusion_matrix(labels, preds[name], k).float()
        norm = conf / conf.sum(1, keepdim=True).clamp_min(1)
        image = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
        if annotate:
            for (t, p), count in np.ndenumerate(conf.int().numpy()):
                if count:
                    ax.text(p, t, str(count), ha="center", va="center", fontsize=7 if k <= 10 else 6,
                            color=_text_colour(image, float(norm[t, p])))
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(k), class_names if annotate else [], rotation=90, fontsize=7)
        ax.set_yticks(range(k), class_names if annotate else [], fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share of the true class (row-normalised)")
    counts = "numbers: test images (empty cell: 0); " if annotate else ""
    fig.suptitle(f"Confusion matrices on the test split: {counts}colour: share of each true class", fontsize=10,
                 y=0.96)
    _save(fig, path)


def per_class_table(labels: torch.Tensor, preds: dict[str, torch.Tensor],
                    num_classes: int) -> dict[str, list[float | None]]:
    """Accuracy (%) of each model on each class's test images (``None``: no image of that class)."""
    counts = torch.bincount(labels, minlength=num_classes)
    table = {}
    for name, pred in preds.items():
        right = torch.bincount(labels[pred == labels], minlength=num_classes)
        table[name] = [None if n == 0 else round(100.0 * r / n, 4) for r, n in zip(right.tolist(), counts.tolist())]
    return table


def plot_per_class(names: list[str], labels: torch.Tensor, preds: dict[str, torch.Tensor],
                   class_names: list[str], path: Path) -> None:
    """Model × class heatmap of per-class test accuracy, with the values and each class's count."""
    k = len(class_names)
    table = per_class_table(labels, {n: preds[n] for n in names}, k)
    values = np.array([[np.nan if v is None else v for v in table[n]] for n in names])
    counts = torch.bincount(labels, minlength=k).tolist()
    low = math.floor(np.nanmin(values) / 10) * 10 if np.isfinite(values).any() else 0
    fig, ax = plt.subplots(figsize=(1.8 + 0.62 * k, 0.5 * len(names) + 1.6))
    image = ax.imshow(values, cmap="RdYlGn", vmin=min(low, 90), vmax=100, aspect="auto")
    if k <= 2 * MAX_ANNOTATED_CLASSES:
        for (r, c), v in np.ndenumerate(values):
            text = "–" if np.isnan(v) else (f"{v:.0f}" if v == 100 else f"{v:.1f}")
            ax.text(c, r, text, ha="center", va="center", fontsize=7,
                    color="black" if np.isnan(v) else _text_colour(image, v))
        ax.set_xticks(range(k), [f"{c}\nn={n}" for c, n in zip(class_names, counts)], fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("true class (n: its test images)")
    fig.colorbar(image, ax=ax, label="accuracy on the class (%)")
    ax.set_title("Per-class test accuracy (%)", fontsize=10)
    _save(fig, path)


def choose_disagreements(labels: torch.Tensor, preds: dict[str, torch.Tensor],
                         count: int) -> tuple[list[int], dict[str, int]]:
    """Test images where the models' predictions differ, most telling first, ties by index.

    Order: the baseline is wrong and a distilled student right (what distillation bought), then
    the baseline right and a distilled student wrong (what it cost), then any other
    disagreement. Returns the first ``count`` indices and how many images each group holds.
    """
    stacked = torch.stack(list(preds.values()))
    disagree = (stacked != stacked[0]).any(0)
    students = [n for n in preds if paths.is_distilled(n)]
    if paths.BASELINE in preds and students:
        base_right = preds[paths.BASELINE] == labels
        student_right = torch.stack([preds[n] == labels for n in students])
        gained = ~base_right & student_right.any(0)
        lost = base_right & ~student_right.all(0)
    else:
        gained = lost = torch.zeros_like(disagree)
    groups = {"gained": gained, "lost": lost, "other": disagree & ~gained & ~lost}
    chosen = [i for mask in groups.values() for i in mask.nonzero().flatten().tolist()]
    return chosen[:count], {g: int(mask.sum()) for g, mask in groups.items()}


def plot_prediction_grid(data: PreparedData, preds: dict[str, torch.Tensor], names: list[str], path: Path,
                         count: int = 16) -> None:
    """Test images where the models disagree (see choose_disagreements), each model's
    prediction in green (right) or red (wrong)."""
    labels = data.test.labels
    chosen, groups = choose_disagreements(labels, {n: preds[n] for n in names}, count)
    cols = max(1, min(8, len(chosen)))
    rows = max(1, math.ceil(len(chosen) / cols))
    height = rows * (1.7 + 0.2 * len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, height), squeeze=False)
    classes = data.class_names
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen):
        img = data.test.images[i]
        ax.imshow(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy(),
                  cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=255, interpolation="nearest")
        truth = int(labels[i])
        ax.set_title(f"#{i}  true: {classes[truth]}", fontsize=7)
        for j, name in enumerate(names):
            right = int(preds[name][i]) == truth
            ax.annotate(f"{'✓' if right else '✗'} {name}: {classes[int(preds[name][i])]}", (0.5, 0),
                        xycoords="axes fraction", xytext=(0, -3 - 9 * j), textcoords="offset points", ha="center",
                        va="top", fontsize=6.5, color=RIGHT if right else WRONG)
    if not chosen:
        axes[0, 0].text(0.5, 0.5, "every model predicts the same class\non every test image", ha="center",
                        va="center", fontsize=9, transform=axes[0, 0].transAxes)
    total = sum(groups.values())
    fig.suptitle(
        f"Test images where the models disagree ({total} in the test split; {len(chosen)} shown, in this order):\n"
        f"baseline wrong, a distilled student right: {groups['gained']} images in the test split; "
        f"baseline right, a distilled student wrong: {groups['lost']}; other disagreements: {groups['other']}",
        fontsize=9, y=fig.subplotpars.top + 0.25 / height, va="bottom")  # just above the images' titles
    _save(fig, path)


# ---- report ----------------------------------------------------------------------------------


def _verdict(m: dict[str, Any], test_images: int) -> str:
    """Plain words on whether a student's difference from the baseline is more than noise."""
    low, high = m["accuracy_diff_ci95"]
    p = m["mcnemar_p"]
    diff = m["accuracy_diff_vs_baseline"]
    measured = (f"{diff:+.2f} points against the baseline (95% CI {low:+.2f} to {high:+.2f}, "
                f"McNemar {_p_text(p)})")
    on = f"on {test_images:,} test images"
    if is_significant(low, high, p):
        word = "significantly better than" if diff > 0 else "significantly worse than"
        return f"{measured}: {word} the baseline {on}"
    if low > 0 or high < 0:
        return f"{measured}: not significant {on} (the interval excludes 0, but McNemar p is not below 0.05)"
    if p < 0.05:
        return f"{measured}: not significant {on} (McNemar p < 0.05, but the interval includes 0)"
    return f"{measured}: not significant {on}"


def _gap_phrase(gap: float, test_images: int) -> str:
    """``0.37 points (1 test image)``."""
    images = round(gap * test_images / 100)
    return f"{gap:.2f} points ({images:,} test image{'s' if images != 1 else ''})"


def _gap_size(gap: float | None, test_images: int) -> str:
    return "" if gap is None or gap <= 0 else f", a gap of {_gap_phrase(gap, test_images)} here"


def teacher_gap(evaluation: dict[str, dict[str, Any]]) -> float | None:
    """Teacher minus baseline test accuracy (points): the gap ``gap_closed`` divides by."""
    teacher, baseline = evaluation.get(paths.TEACHER), evaluation.get(paths.BASELINE)
    if not teacher or not baseline:
        return None
    return teacher["test_accuracy"] - baseline["test_accuracy"]


def _gap_words(m: dict[str, Any], gap: float | None, test_images: int) -> str:
    """The share of the gap closed, with the gap's size: a share of a one-image gap (200%,
    -1000%) is arithmetic on noise, and says so when the gap is narrower than the student's
    own paired interval."""
    if m.get("gap_closed") is None or gap is None:
        return "the teacher is not above the baseline, so there is no teacher–baseline gap to close"
    words = f"it closes {m['gap_closed'] * 100:.0f}% of the teacher–baseline gap of {_gap_phrase(gap, test_images)}"
    low, high = m["accuracy_diff_ci95"]  # headline() calls this only for students that have it
    if gap < (high - low) / 2:
        words += ", a gap narrower than this comparison's own uncertainty, so that share says little"
    return words


def _and(names: list[str]) -> str:
    """``**a**``, ``**a** and **b**``, ``**a**, **b** and **c**``."""
    bold = [f"**{n}**" for n in names]
    return bold[0] if len(bold) == 1 else ", ".join(bold[:-1]) + " and " + bold[-1]


def _teacher_words(m: dict[str, Any]) -> str:
    value = vs_teacher(m)
    if value is None:
        return ""
    smaller = f", with {m['compression_ratio']:.1f}× fewer bytes" if m.get("compression_ratio") else ""
    side = "above" if value > 0 else "below" if value < 0 else "level with"
    return f" Against the teacher: {value:+.2f} points ({side} it){smaller}."


def headline(evaluation: dict[str, dict[str, Any]], test_images: int) -> list[str]:
    """The best distilled student(s) against the baseline, in plain words. A tie is said to be
    one, naming every tied student, so no ranking is implied."""
    students = {n: m for n, m in evaluation.items() if paths.is_distilled(n)}
    if not students or paths.BASELINE not in evaluation:
        return []
    top = max(m["test_accuracy"] for m in students.values())
    best = [n for n, m in students.items() if m["test_accuracy"] == top]
    lines, gap = [], teacher_gap(evaluation)
    if len(best) > 1:
        lines += [f"No single best distilled student: {_and(best)} tie at {top:.2f}% (the same number of the "
                  f"{test_images:,} test images right); the report does not rank them.", ""]
    for name in best:
        m = students[name]
        ci = _interval(m.get("test_accuracy_ci95"))
        acc = f"{m['test_accuracy']:.2f}%" + (f" (95% CI {ci}%)" if ci else "")
        if "accuracy_diff_ci95" in m and "mcnemar_p" in m:
            against = _verdict(m, test_images) + f"; {_gap_words(m, gap, test_images)}"
        else:
            gain = m["test_accuracy"] - evaluation[paths.BASELINE]["test_accuracy"]
            against = f"{gain:+.2f} points against the baseline"
        lead = "Best distilled student" if len(best) == 1 else "Tied best distilled student"
        lines += [f"{lead}: **{name}** at {acc}, {against}.{_teacher_words(m)}", ""]
    return lines


def _machine_words(timing: dict[str, Any] | None) -> str:
    if timing is None:
        return ("No timing was recorded (`metrics/timing/evaluate.json` is missing), so latency, throughput, "
                "speed-up and efficiency are shown as –.")
    machine = timing.get("machine") or {}
    cpu = machine.get("cpu") or "a CPU whose name was not recorded"
    flags = f" (flags: {', '.join(machine['flags'])})" if machine.get("flags") else ""
    threads = machine.get("threads", "?")
    return (f"Timed on {cpu}{flags}, {threads} thread(s), float32, from `{timing['source']}`. Latency: "
            "single-image forward passes after warm-up, median and 10th to 90th percentile. Speed-up: teacher "
            "median / model median. Efficiency: accuracy / (size MB × median latency ms). Params, size and "
            "compression (teacher size / model size) do not depend on the machine.")


FIGURES: list[tuple[str, str, str]] = [
    ("accuracy.png", "Test accuracy and the difference to the baseline",
     "Left: accuracy with its 95% Wilson interval (a zoomed axis is marked // and says where it starts). "
     "Right: each distilled student minus the baseline with its paired 95% interval; when the interval "
     "crosses the zero line, this test set cannot tell the student from the baseline."),
    ("per_class_accuracy.png", "Per-class test accuracy",
     "Accuracy of each model on each class's test images; n is the number of images, so one image is "
     "100/n points."),
    ("confusion_matrices.png", "Confusion matrices",
     "Counts of test images in each cell; the colour is the share of the true class (row-normalised)."),
    ("predictions.png", "Where the models disagree",
     "Test images where the predictions differ, the baseline's misses that a distilled student gets right "
     "first; green ✓ right, red ✗ wrong."),
    ("training_curves.png", "Validation curves",
     "Validation cross-entropy and accuracy per epoch: the same loss for every model."),
    ("training_objectives.png", "Training objectives",
     "Each model's training objective and its terms, on its own scale: KD objectives are not cross-entropy."),
    ("accuracy_vs_latency.png", "Accuracy vs latency",
     "Median single-image latency on this machine; horizontal bars, where recorded, from the 10th to the "
     "90th percentile."),
    ("accuracy_vs_size.png", "Accuracy vs size", "Model size (parameters and buffers) on a log axis."),
]


def draw_figures(figures_dir: Path, records: dict[str, dict[str, Any]], histories: dict[str, list[dict[str, str]]],
                 labels: torch.Tensor, preds: dict[str, torch.Tensor], data: PreparedData,
                 untimed: str | None) -> dict[str, str]:
    """Draw every figure into ``figures_dir``; returns the figures left out, with the reason
    (``untimed``: why there is no latency figure, ``None`` when every model was timed)."""
    names = list(records)
    draw = {
        "accuracy.png": lambda p: plot_accuracy(records, len(labels), p),
        "per_class_accuracy.png": lambda p: plot_per_class(names, labels, preds, data.class_names, p),
        "confusion_matrices.png": lambda p: plot_confusions(names, labels, preds, data.class_names, p),
        "predictions.png": lambda p: plot_prediction_grid(data, preds, names, p),
        "training_curves.png": lambda p: plot_curves(histories, p),
        "training_objectives.png": lambda p: plot_objectives(histories, p),
        "accuracy_vs_latency.png": lambda p: plot_tradeoff(records, _latency_x, "latency at batch 1, median (ms)",
                                                           "Accuracy vs latency on this machine", p),
        "accuracy_vs_size.png": lambda p: plot_tradeoff(records, _size_x, "model size (MB)", "Accuracy vs size", p),
    }
    skipped = {}
    if untimed:
        skipped["accuracy_vs_latency.png"] = f"not drawn, {untimed}"
    if not histories:
        for file in ("training_curves.png", "training_objectives.png"):
            skipped[file] = "not drawn, because no training history was found"
    for file, plot in draw.items():
        (figures_dir / file).unlink(missing_ok=True)  # no stale figure survives a skip
        if file not in skipped:
            plot(figures_dir / file)
    return skipped


RUNTIME_LABELS = {"pytorch": "PyTorch eager fp32", "ort_fp32": "ONNX Runtime fp32", "ort_int8": "ONNX Runtime int8"}
RUNTIME_MARKERS = {"pytorch": "o", "ort_fp32": "s", "ort_int8": "^"}


def plot_deployment(quality: dict[str, dict[str, Any]], timing: dict[str, Any], path: Path) -> None:
    """Test accuracy against p50 latency at batch 1 for every model × runtime: colour is the
    model, the marker the runtime (two legends, no text on the plot), a line spans p10–p90."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, runtimes) in enumerate(quality.items()):
        for runtime, q in runtimes.items():
            t = timing["models"][name][runtime]
            colour = colours[i % len(colours)]
            ax.hlines(q["test_accuracy"], t["latency_ms_p10"], t["latency_ms_p90"], color=colour, alpha=0.5, lw=1)
            ax.scatter(t["latency_ms_p50"], q["test_accuracy"], s=55, color=colour,
                       marker=RUNTIME_MARKERS.get(runtime, "D"), edgecolor="black", linewidth=0.5, zorder=3)
    ax.set_xscale("log")
    ax.set(xlabel="latency at batch 1, p50 (ms, log scale; line: p10–p90)", ylabel="test accuracy (%)",
           title="Accuracy vs latency per model and runtime")
    ax.grid(alpha=0.3)
    model_handles = [plt.Line2D([], [], color=colours[i % len(colours)], marker="o", linestyle="", label=name)
                     for i, name in enumerate(quality)]
    used = {rt for runtimes in quality.values() for rt in runtimes}
    runtime_handles = [plt.Line2D([], [], color="grey", marker=RUNTIME_MARKERS[rt], linestyle="", label=label)
                       for rt, label in RUNTIME_LABELS.items() if rt in used]
    first = ax.legend(handles=model_handles, title="model", fontsize=8, title_fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.02, 1.0))
    ax.add_artist(first)
    ax.legend(handles=runtime_handles, title="runtime", fontsize=8, title_fontsize=8, loc="lower left",
              bbox_to_anchor=(1.02, 0.0))
    _save(fig, path)


def deployment_section(export_quality: dict[str, dict[str, Any]], export_timing: dict[str, Any], figures_dir: Path,
                       link_dir: Path = Path("figures")) -> list[str]:
    """The export stage's results as markdown lines: one table row per model × runtime and the
    accuracy-vs-latency figure (drawn into ``figures_dir``, linked as ``link_dir``/deployment.png)."""
    plot_deployment(export_quality, export_timing, figures_dir / "deployment.png")
    m, protocol = export_timing.get("machine", {}), export_timing.get("protocol", {})
    lines = [
        "## Deployment", "",
        "| Model | Runtime | Test acc. (%) | Agrees with fp32 (%) | Max logit diff | Size (MB) | p50 b=1 (ms) "
        "| p90 b=1 (ms) | Throughput (img/s) | Speed-up vs PyTorch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runtimes in export_quality.items():
        for runtime, q in runtimes.items():
            t = export_timing["models"][name][runtime]
            cells = [name, RUNTIME_LABELS.get(runtime, runtime), f"{q['test_accuracy']:.2f}",
                     _simple("agreement_with_fp32", "{:.2f}")(q) or "–",
                     _simple("max_abs_diff", "{:.2g}")(q) or "–", f"{q['size_mb']:.3f}", f"{t['latency_ms_p50']:.3f}", f"{t['latency_ms_p90']:.3f}",
                     f"{t['throughput_ips']:,.0f}", _simple("speedup_vs_pytorch", "{:.2f}×")(t) or "–"]
            lines.append("| " + " | ".join(cells) + " |")
    fastest = [f"{name} {RUNTIME_LABELS.get(b['runtime'], b['runtime'])} ({b['latency_ms_p50']:.3f} ms"
               + (f", {b['speedup_vs_teacher']:.2f}× the teacher's" if "speedup_vs_teacher" in b else "") + ")"
               for name, b in export_timing.get("best", {}).items()]
    lines += [
        "",
        f"Every model exported to ONNX (opset {next(iter(export_quality.values()))['ort_fp32']['opset']}) and "
        "checked against PyTorch on the whole test split (max logit diff: the largest difference of any logit); "
        "the students also quantized to int8 (static QDQ, per-channel, calibrated on training images). "
        f"Latency: batch 1, p50/p90 over {protocol.get('batch_1_runs', '?')} passes after "
        f"{protocol.get('batch_1_warmup', '?')} warm-up passes, every model × runtime taking turns pass by pass; "
        f"throughput at batch {protocol.get('throughput_batch_size', '?')}; {m.get('threads', '?')} thread(s) on "
        f"{m.get('cpu', '?')} ({', '.join(m.get('flags', [])) or 'no AVX2/AVX-512'}), ONNX Runtime "
        f"{m.get('onnxruntime', '?')}. Speed-up: the same model's PyTorch p50 over this runtime's.",
        "",
        "Fastest runtime per model (teacher comparison: each in its fastest runtime): " + "; ".join(fastest) + ".",
        "",
        f"![Accuracy vs latency per model and runtime]({link_dir / 'deployment.png'})",
        "",
    ]
    return lines


def write_report(
    out_path: Path,
    figures_dir: Path,
    evaluation: dict[str, dict[str, Any]],
    training: dict[str, dict[str, Any]],
    history_dir: Path,
    predictions_csv: Path,
    data: PreparedData,
    context: dict[str, Any],
    timing: dict[str, Any] | None = None,
) -> None:
    """Draw every figure into ``figures_dir`` and write the markdown report; ``timing`` is
    :func:`load_timing`'s (``None``: no timing columns, no latency figure)."""
    names = list(evaluation)
    records = _records(evaluation, timing)
    rows = _read_csv(predictions_csv)
    labels = torch.tensor([int(r["actual"]) for r in rows])
    preds = {n: torch.tensor([int(r[n]) for r in rows]) for n in names}
    untimed = [n for n in names if records[n]["timing"].get("latency_ms_p50") is None]
    why = ("because no timing was recorded (`metrics/timing/evaluate.json` is missing)" if timing is None
           else f"because the timing has no latency for {', '.join(untimed)}" if untimed else None)
    skipped = draw_figures(figures_dir, records, read_histories(history_dir, names), labels, preds, data, why)

    rel = figures_dir.relative_to(out_path.parent)
    lines = [
        "# kdpipe report",
        "",
        f"Data set **{context['dataset']}**: {data.meta['sizes']['train']} train / {data.meta['sizes']['val']} val / "
        f"{data.meta['sizes']['test']} test images, {data.channels}×{data.image_size}×{data.image_size}, "
        f"{data.num_classes} classes. Teacher `{context['teacher_arch']}`, student `{context['student_arch']}` "
        f"({context['student_settings']}); KD T={context['temperature']}, alpha={context['alpha']}; "
        f"seed {context['seed']}.",
        "",
        "## Quality",
        "",
        comparison_table(records, "quality"),
        "",
        f"All on the same {len(labels):,} test images (one image = {100 / max(len(labels), 1):.2f} points). "
        "95% CI: Wilson interval of each accuracy. vs baseline: a distilled student's accuracy minus the "
        "baseline's, with a 95% paired bootstrap interval over the test images (seeded by `seed`); McNemar p: "
        "exact two-sided test on the images exactly one of the two gets right. A difference counts as "
        "significant when the interval excludes 0 and p < 0.05. Gap closed: (student − baseline) / "
        f"(teacher − baseline){_gap_size(teacher_gap(evaluation), len(labels))}; n/a when the teacher is not "
        "above the baseline. vs teacher: the model's accuracy minus the teacher's (positive: the model is better).",
        "",
    ]
    lines += headline(evaluation, len(labels))
    lines += ["## Cost on this machine", "", _machine_words(timing), "", comparison_table(records, "cost"), ""]
    lines += _training_table(names, training)
    if (paths.METRICS_DIR / "export.json").exists():
        lines += deployment_section(read_json(paths.METRICS_DIR / "export.json"),
                                    read_json(paths.timing_path("export")), figures_dir, rel)
    lines += ["## Figures", ""]
    for file, title, caption in FIGURES:
        body = f"{title}: {skipped[file]}." if file in skipped else f"![{title}]({rel / file})\n\n{caption}"
        lines += [f"### {title}", "", body, ""]
    with atomic_path(out_path) as tmp:
        tmp.write_text("\n".join(lines))


def _training_table(names: list[str], training: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Training", "", "| Model | Best val acc. (%) | Best epoch | Epochs | Train time (s) |",
             "|---|---|---|---|---|"]
    for name in names:
        t = training.get(name, {})
        lines.append(f"| {name} | {t.get('best_val_accuracy', float('nan')):.2f} | {t.get('best_epoch', '–')} | "
                     f"{t.get('epochs', '–')} | {_seconds(t.get('train_seconds'))} |")
    return lines + [""]


def _seconds(value: Any) -> str:
    return "–" if value is None else f"{value:.1f}"


def _train_seconds(name: str) -> dict[str, Any]:
    path = paths.timing_path(name)
    return {"train_seconds": read_json(path)["train_seconds"]} if path.exists() else {}


def seed_phrase(params: Params) -> str:
    """The global seed, with the teacher's or the students' own where they differ from it."""
    own = [f"{role} seed {params.seed_for(role)}" for role in ("teacher", "student")
           if params.seed_for(role) != params.seed]
    return f"{params.seed} ({', '.join(own)})" if own else str(params.seed)


def build_report(params: Params) -> None:
    """The report stage: figures and reports/report.md from evaluate's outputs."""
    data = load_prepared(paths.PREPARED_DIR)
    evaluation = read_json(paths.METRICS_DIR / "evaluation.json")
    # quality from metrics/<model>.json, the training time from metrics/timing/<model>.json
    training = {n: {**read_json(paths.train_metrics_path(n)), **_train_seconds(n)} for n in evaluation}
    context = {
        "dataset": params.data.name, "teacher_arch": params.teacher.arch, "student_arch": params.student.arch,
        "student_settings": ", ".join(f"{k} {v}" for k, v in as_dict(params.student.arch_settings).items()),
        "temperature": params.kd.temperature, "alpha": params.kd.alpha,
        "seed": seed_phrase(params),
    }
    with stage_run("report", params) as run:
        write_report(paths.REPORTS_DIR / "report.md", paths.FIGURES_DIR, evaluation, training, paths.HISTORY_DIR,
                     paths.PLOTS_DIR / "predictions.csv", data, context, load_timing(TIMING_PATH, evaluation))
        run.log_artifact(paths.REPORTS_DIR / "report.md")
        for fig in sorted(paths.FIGURES_DIR.glob("*.png")):
            run.log_artifact(fig, "figures")
