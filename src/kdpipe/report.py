"""Figures and the markdown report, from what evaluate wrote (no model is re-run here)."""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from kdpipe import paths  # noqa: E402
from kdpipe.config import Params  # noqa: E402
from kdpipe.data.prepare import PreparedData, load_prepared  # noqa: E402
from kdpipe.evaluate import confusion_matrix  # noqa: E402
from kdpipe.io import atomic_path, read_json  # noqa: E402
from kdpipe.stats import is_significant  # noqa: E402
from kdpipe.tracking import stage_run  # noqa: E402
from kdpipe.validation import as_dict  # noqa: E402

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


def _simple(key: str, fmt: str) -> Callable[[dict[str, Any]], str | None]:
    return lambda m: fmt.format(m[key]) if key in m and m[key] is not None else None


# (title, cell) for each column of the comparison table; a cell of None is shown as "–".
TABLE_COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str | None]]] = [
    ("Test acc. (%)", _simple("test_accuracy", "{:.2f}")),
    ("95% CI (%)", lambda m: _interval(m.get("test_accuracy_ci95"))),
    ("vs baseline (pt) [95% CI]", _diff_cell),
    ("McNemar p", lambda m: _p_value(m["mcnemar_p"]) if m.get("mcnemar_p") is not None else None),
    ("Gap closed", _gap_cell),
    ("Drop vs teacher (pt)", _simple("accuracy_drop", "{:+.2f}")),
    ("Params", _simple("params", "{:,}")),
    ("Size (MB)", _simple("size_mb", "{:.3f}")),
    ("Latency b=1 (ms)", _simple("latency_ms_b1", "{:.3f}")),
    ("Throughput (img/s)", _simple("throughput_ips", "{:,.0f}")),
    ("Speed-up", _simple("speedup", "{:.2f}×")),
    ("Compression", _simple("compression_ratio", "{:.1f}×")),
    ("Efficiency", _simple("efficiency", "{:.1f}")),
]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=110, bbox_inches="tight")
    plt.close(fig)


def comparison_table(evaluation: dict[str, dict[str, Any]]) -> str:
    header = "| Model | " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for name, metrics in evaluation.items():
        cells = [cell(metrics) or "–" for _, cell in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_bars(evaluation: dict[str, dict[str, Any]], path: Path) -> None:
    """Test accuracy per model, with its 95% Wilson interval as an error bar."""
    names = list(evaluation)
    accs = [evaluation[n]["test_accuracy"] for n in names]
    intervals = [evaluation[n].get("test_accuracy_ci95") or [a, a] for n, a in zip(names, accs)]
    errors = [[a - lo for a, (lo, _) in zip(accs, intervals)], [hi - a for a, (_, hi) in zip(accs, intervals)]]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.5))
    bars = ax.bar(names, accs, yerr=errors, capsize=4, error_kw={"elinewidth": 1, "ecolor": "#333333"},
                  color=["#4c72b0"] + ["#dd8452"] + ["#55a868"] * (len(names) - 2))
    ax.bar_label(bars, fmt="%.2f", label_type="center", color="white", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(0.0, min(lo for lo, _ in intervals) - 10), 100)
    ax.set_title("Test accuracy (error bars: 95% Wilson interval)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    _save(fig, path)


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


def _gap_words(m: dict[str, Any]) -> str:
    if m.get("gap_closed") is None:
        return "the teacher is not above the baseline, so there is no teacher–baseline gap to close"
    return f"it closes {m['gap_closed'] * 100:.0f}% of the teacher–baseline gap"


def headline(evaluation: dict[str, dict[str, Any]], test_images: int) -> list[str]:
    """The best distilled student(s) against the baseline, in plain words. Ties are named as ties."""
    students = {n: m for n, m in evaluation.items() if paths.is_distilled(n)}
    if not students or paths.BASELINE not in evaluation:
        return []
    top = max(m["test_accuracy"] for m in students.values())
    best = [n for n, m in students.items() if m["test_accuracy"] == top]
    lines = []
    if len(best) > 1:
        lines += [f"Best distilled students: a tie at {top:.2f}% between " + ", ".join(f"**{n}**" for n in best)
                  + ".", ""]
    for name in best:
        m = students[name]
        ci = _interval(m.get("test_accuracy_ci95"))
        acc = f"{m['test_accuracy']:.2f}%" + (f" (95% CI {ci}%)" if ci else "")
        if "accuracy_diff_ci95" in m and "mcnemar_p" in m:
            against = _verdict(m, test_images) + f"; {_gap_words(m)}"
        else:
            gain = m["test_accuracy"] - evaluation[paths.BASELINE]["test_accuracy"]
            against = f"{gain:+.2f} points against the baseline"
        lead = "Best distilled student" if len(best) == 1 else "Tied"
        lines += [
            f"{lead}: **{name}** at {acc}, {against}. Against the teacher: "
            f"{0.0 - m.get('accuracy_drop', 0):+.2f} points, with {m.get('compression_ratio', 0):.1f}× fewer bytes.",
            "",
        ]
    return lines


def plot_curves(curves: list[dict[str, str]], path: Path) -> None:
    by_model: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in curves:
        by_model[row["model"]].append(row)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, rows in by_model.items():
        epochs = [int(r["epoch"]) for r in rows]
        line = ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], label=f"{name} train")[0]
        ax_loss.plot(epochs, [float(r["val_loss"]) for r in rows], "--", color=line.get_color(), label=f"{name} val")
        ax_acc.plot(epochs, [float(r["val_acc"]) for r in rows], color=line.get_color(), label=name)
    ax_loss.set_yscale("log")
    ax_loss.set(xlabel="epoch", ylabel="loss (log scale)", title="Loss (train: objective, val: cross-entropy)")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy")
    ax_loss.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
    _save(fig, path)


def plot_confusions(names: list[str], labels: torch.Tensor, preds: dict[str, torch.Tensor],
                    class_names: list[str], path: Path) -> None:
    k = len(class_names)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        conf = confusion_matrix(labels, preds[name], k).float()
        norm = conf / conf.sum(1, keepdim=True).clamp_min(1)
        ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(k), class_names if k <= 12 else [], rotation=90, fontsize=6)
        ax.set_yticks(range(k), class_names if k <= 12 else [], fontsize=6)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    _save(fig, path)


def plot_prediction_grid(data: PreparedData, preds: dict[str, torch.Tensor], names: list[str], path: Path,
                         count: int = 16) -> None:
    """The first test images with the true label and each model's prediction (red: wrong)."""
    count = min(count, len(data.test))
    cols = 8
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * (1.6 + 0.22 * len(names))), squeeze=False)
    classes = data.class_names
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= count:
            continue
        img = data.test.images[i]
        ax.imshow(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy(),
                  cmap="gray" if img.shape[0] == 1 else None)
        truth = int(data.test.labels[i])
        ax.set_title(f"true: {classes[truth]}", fontsize=7)
        for j, name in enumerate(names):
            guess = int(preds[name][i])
            ax.text(0.5, -0.08 - 0.16 * j, f"{name}: {classes[guess]}", transform=ax.transAxes, ha="center",
                    va="top", fontsize=6, color="black" if guess == truth else "red")
    _save(fig, path)


def plot_tradeoff(evaluation: dict[str, dict[str, Any]], x_key: str, x_label: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, m in evaluation.items():
        ax.scatter(m[x_key], m["test_accuracy"], s=40)
        ax.annotate(name, (m[x_key], m["test_accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel=x_label, ylabel="test accuracy (%)", title=f"Accuracy vs {x_label.split(' (')[0]}")
    ax.grid(alpha=0.3)
    _save(fig, path)


def write_report(
    out_path: Path,
    figures_dir: Path,
    evaluation: dict[str, dict[str, Any]],
    training: dict[str, dict[str, Any]],
    curves_csv: Path,
    predictions_csv: Path,
    data: PreparedData,
    context: dict[str, Any],
) -> None:
    """Draw every figure into ``figures_dir`` and write the markdown report."""
    names = list(evaluation)
    rows = _read_csv(predictions_csv)
    labels = torch.tensor([int(r["actual"]) for r in rows])
    preds = {n: torch.tensor([int(r[n]) for r in rows]) for n in names}
    figures = {
        "accuracy.png": lambda p: plot_accuracy_bars(evaluation, p),
        "training_curves.png": lambda p: plot_curves(_read_csv(curves_csv), p),
        "confusion_matrices.png": lambda p: plot_confusions(names, labels, preds, data.class_names, p),
        "predictions.png": lambda p: plot_prediction_grid(data, preds, names, p),
        "accuracy_vs_latency.png": lambda p: plot_tradeoff(evaluation, "latency_ms_b1", "latency at batch 1 (ms)", p),
        "accuracy_vs_size.png": lambda p: plot_tradeoff(evaluation, "size_mb", "model size (MB)", p),
    }
    for file, draw in figures.items():
        draw(figures_dir / file)

    rel = figures_dir.relative_to(out_path.parent)
    teacher = evaluation.get(paths.TEACHER, {})
    lines = [
        "# kdpipe report",
        "",
        f"Data set **{context['dataset']}**: {data.meta['sizes']['train']} train / {data.meta['sizes']['val']} val / "
        f"{data.meta['sizes']['test']} test images, {data.channels}×{data.image_size}×{data.image_size}, "
        f"{data.num_classes} classes. Teacher `{context['teacher_arch']}`, student `{context['student_arch']}` "
        f"({context['student_settings']}); KD T={context['temperature']}, alpha={context['alpha']}; "
        f"seed {context['seed']}.",
        "",
        "## Comparison",
        "",
        comparison_table(evaluation),
        "",
        f"All on the same {len(labels):,} test images (one image = {100 / max(len(labels), 1):.2f} points). "
        "95% CI: Wilson interval of each accuracy. vs baseline: a distilled student's accuracy minus the "
        "baseline's, with a 95% paired bootstrap interval over the test images (seeded by `seed`); McNemar p: "
        "exact two-sided test on the images exactly one of the two gets right. A difference counts as "
        "significant when the interval excludes 0 and p < 0.05. Gap closed: (student − baseline) / "
        "(teacher − baseline); n/a when the teacher is not above the baseline.",
        "",
        f"Latency: median of single-image forward passes in float32 on {teacher.get('threads', '?')} CPU thread(s) "
        "after warm-up. Size: parameters + buffers. Speed-up, compression and drop are relative to the teacher; "
        "efficiency is accuracy / (size MB × latency ms).",
        "",
    ]
    lines += headline(evaluation, len(labels))
    lines += ["## Training", "", "| Model | Best val acc. (%) | Best epoch | Epochs | Train time (s) |",
              "|---|---|---|---|---|"]
    for name in names:
        t = training.get(name, {})
        lines.append(f"| {name} | {t.get('best_val_accuracy', float('nan')):.2f} | {t.get('best_epoch', '–')} | "
                     f"{t.get('epochs', '–')} | {t.get('train_seconds', float('nan')):.1f} |")
    lines += ["", "## Figures", ""]
    for file, title in [
        ("accuracy.png", "Test accuracy"), ("training_curves.png", "Training curves"),
        ("confusion_matrices.png", "Confusion matrices (row-normalised)"),
        ("predictions.png", "Test images with true and predicted labels"),
        ("accuracy_vs_latency.png", "Accuracy vs latency"), ("accuracy_vs_size.png", "Accuracy vs size"),
    ]:
        lines += [f"### {title}", "", f"![{title}]({rel / file})", ""]
    with atomic_path(out_path) as tmp:
        tmp.write_text("\n".join(lines))


def build_report(params: Params) -> None:
    """The report stage: figures and reports/report.md from evaluate's outputs."""
    data = load_prepared(paths.PREPARED_DIR)
    evaluation = read_json(paths.METRICS_DIR / "evaluation.json")
    training = {n: read_json(paths.train_metrics_path(n)) for n in evaluation}
    context = {
        "dataset": params.data.name, "teacher_arch": params.teacher.arch, "student_arch": params.student.arch,
        "student_settings": ", ".join(f"{k} {v}" for k, v in as_dict(params.student.arch_settings).items()),
        "temperature": params.kd.temperature, "alpha": params.kd.alpha,
        "seed": params.seed if params.student_seed == params.seed else f"{params.seed} (student seed {params.student_seed})",
    }
    with stage_run("report", params) as run:
        write_report(paths.REPORTS_DIR / "report.md", paths.FIGURES_DIR, evaluation, training,
                            paths.PLOTS_DIR / "curves.csv", paths.PLOTS_DIR / "predictions.csv", data, context)
        run.log_artifact(paths.REPORTS_DIR / "report.md")
        for fig in sorted(paths.FIGURES_DIR.glob("*.png")):
            run.log_artifact(fig, "figures")
