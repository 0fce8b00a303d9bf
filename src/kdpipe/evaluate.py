"""Accuracy (with its 95% Wilson interval), per-class accuracy, confusion, size, parameters,
the teacher-relative ratios that tell what distillation bought, and each distilled student's
paired comparison with the baseline on the same test images (:mod:`kdpipe.stats`), all in
metrics/evaluation.json; latency and throughput apart, in metrics/timing/evaluate.json, since
they depend on the machine and its load rather than on the models alone."""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe import machine, models, paths
from kdpipe.config import Params
from kdpipe.data.loader import Normalizer
from kdpipe.data.prepare import PreparedData, Split, load_prepared
from kdpipe.inference import predict_logits
from kdpipe.io import write_csv, write_json
from kdpipe.models import count_params, size_mb
from kdpipe.runtime import setup_runtime
from kdpipe.stats import discordant_pairs, gap_closed, mcnemar_exact_p, paired_bootstrap_diff, wilson_interval
from kdpipe.tracking import stage_run


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows: true class; columns: predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    totals = confusion.sum(1).clamp_min(1)
    return [round(float(v), 4) for v in (confusion.diag().float() / totals * 100.0)]


@torch.inference_mode()
def time_forward(models: Mapping[str, Callable[[torch.Tensor], Any]], example: torch.Tensor, warmup: int,
                 runs: int) -> dict[str, np.ndarray]:
    """Wall times (ms) of ``runs`` single-image forward passes of each model, after ``warmup``.

    The models take turns pass by pass, so a load spike or a frequency change hits all of them
    alike and their ratios (speed-ups) stay fair on a machine that is not perfectly quiet. A
    model is any callable on ``example`` (an ``nn.Module`` is put in eval mode first), so other
    runtimes (the export stage's ONNX Runtime sessions) take turns with PyTorch's.
    """
    for model in models.values():
        if isinstance(model, nn.Module):
            model.eval()
        for _ in range(warmup):
            model(example)
    times = {name: np.empty(runs) for name in models}
    for i in range(runs):
        for name, model in models.items():
            start = time.perf_counter()
            model(example)
            times[name][i] = (time.perf_counter() - start) * 1000.0
    return times


@torch.inference_mode()
def throughput_ips(model: Callable[[torch.Tensor], Any], batch: torch.Tensor, repeats: int = 5) -> float:
    """Images per second at the evaluation batch size (median of ``repeats`` passes)."""
    if isinstance(model, nn.Module):
        model.eval()
    model(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    return batch.shape[0] / statistics.median(times)


def latency_summary(times: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """p10/p50/p90 latency in ms; with the teacher's pass-by-pass ``reference`` times, the
    speed-up (ratio of the medians) and the p10–p90 range of the paired per-pass ratios."""
    p10, p50, p90 = np.percentile(times, [10, 50, 90])
    out = {"latency_ms_p50": round(float(p50), 4), "latency_ms_p10": round(float(p10), 4),
           "latency_ms_p90": round(float(p90), 4)}
    if reference is not None:
        ratios = reference / times
        low, high = np.percentile(ratios, [10, 90])
        out.update({"speedup": round(float(np.median(reference) / p50), 3),
                    "speedup_p10": round(float(low), 3), "speedup_p90": round(float(high), 3)})
    return out


def evaluate_model(model: nn.Module, test: Split, normalize: Normalizer, num_classes: int,
                   batch_size: int) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Quality metrics of one model on the test split (deterministic on a given machine),
    plus its confusion matrix and predictions.

    Accuracy is measured in float32 on the CPU thread count in force: what a user loading
    the saved ``.pt`` gets by default.
    """
    logits = predict_logits(model, test, normalize, batch_size)
    preds = logits.argmax(1)
    conf = confusion_matrix(test.labels, preds, num_classes)
    correct = int((preds == test.labels).sum())
    low, high = wilson_interval(correct, len(test.labels))
    metrics = {
        "test_accuracy": round(correct / len(test.labels) * 100.0, 4),
        "test_accuracy_ci95": [round(low * 100.0, 4), round(high * 100.0, 4)],
        "params": count_params(model),
        "size_mb": round(size_mb(model), 6),
        "per_class_accuracy": per_class_accuracy(conf),
    }
    return metrics, conf, preds


def compare_to_teacher(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
    """Compression and accuracy against the teacher: ``accuracy_vs_teacher`` is the student's
    accuracy minus the teacher's, in points (positive: the student is better)."""
    return {
        "compression_ratio": round(teacher["size_mb"] / student["size_mb"], 4),
        "accuracy_vs_teacher": round(student["test_accuracy"] - teacher["test_accuracy"], 4),
    }


def time_all(models: dict[str, nn.Module], quality: dict[str, dict[str, Any]], example: torch.Tensor,
             batch: torch.Tensor, cfg: Any) -> dict[str, dict[str, float]]:
    """Latency (p10/p50/p90 at batch 1), throughput at the evaluation batch size, speed-up over
    the teacher and efficiency (accuracy / (size MB × p50 ms)) of every model, on
    ``cfg.timing_threads`` threads."""
    times = time_forward(models, example, cfg.latency_warmup, cfg.latency_runs)
    teacher_times = times.get(paths.TEACHER)
    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        t = latency_summary(times[name], None if name == paths.TEACHER else teacher_times)
        t["throughput_ips"] = round(throughput_ips(model, batch), 2)
        t["efficiency"] = round(quality[name]["test_accuracy"] / (quality[name]["size_mb"] * t["latency_ms_p50"]), 4)
        out[name] = t
    return out


def compare_to_baseline(student: np.ndarray, baseline: np.ndarray, teacher: np.ndarray, resamples: int,
                        seed: int) -> dict[str, Any]:
    """A distilled student against the baseline on the same test images, from per-image
    correctness vectors: the accuracy difference in points with its 95% paired bootstrap
    interval, the exact McNemar p-value, and the share of the teacher–baseline gap closed
    (``None`` when the teacher is not above the baseline)."""
    diff, low, high = paired_bootstrap_diff(student, baseline, resamples, seed)
    b, c = discordant_pairs(student, baseline)
    closed = gap_closed(float(student.mean()), float(baseline.mean()), float(teacher.mean()))
    return {
        "accuracy_diff_vs_baseline": round(diff * 100.0, 4),
        "accuracy_diff_ci95": [round(low * 100.0, 4), round(high * 100.0, 4)],
        "mcnemar_p": float(f"{mcnemar_exact_p(b, c):.6g}"),
        "gap_closed": None if closed is None else round(closed, 4),
    }


def mlflow_metrics(name: str, metrics: dict[str, Any]) -> dict[str, float]:
    """``name.key`` for every number; a ``[low, high]`` interval becomes ``name.key_low`` and
    ``name.key_high``; ``None`` (an undefined ``gap_closed``) is left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)) and len(value) == 2:
            out[f"{name}.{key}_low"], out[f"{name}.{key}_high"] = float(value[0]), float(value[1])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{name}.{key}"] = value
    return out


def evaluate_all(params: Params) -> dict[str, dict[str, Any]]:
    """Evaluate every model side by side: quality into metrics/evaluation.json and plots/
    (deterministic), then timings into metrics/timing/evaluate.json (measured alone, on a
    fixed thread count, with the machine recorded)."""
    runtime = setup_runtime(params.runtime, params.seed)
    data = load_prepared(paths.PREPARED_DIR)
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    names = paths.model_names(params.kd.methods)
    results: dict[str, dict[str, Any]] = {}
    loaded: dict[str, nn.Module] = {}
    per_class_rows, size_rows, curve_rows = [], [], []
    predictions: dict[str, list[int]] = {}
    correct: dict[str, np.ndarray] = {}
    with stage_run("evaluate", params) as run:
        for name in names:
            loaded[name], _meta = models.load(paths.model_path(name), data.meta)
            metrics, conf, preds = evaluate_model(loaded[name], data.test, normalize, data.num_classes,
                                                  params.evaluate.batch_size)
            per_class = metrics.pop("per_class_accuracy")
            if name != paths.TEACHER:
                metrics.update(compare_to_teacher(metrics, results[paths.TEACHER]))
            results[name] = metrics
            predictions[name] = preds.tolist()
            correct[name] = (preds == data.test.labels).numpy()
            per_class_rows += [{"model": name, "class": c, "accuracy": a} for c, a in zip(data.class_names, per_class)]
            size_rows.append({"model": name, **{k: metrics[k] for k in ("test_accuracy", "size_mb", "params")}})
            _write_confusion(name, data, preds)
            curve_rows += _read_history(name)
            print(f"{name}: test accuracy {metrics['test_accuracy']:.2f}%, {metrics['params']:,} params")
        for name in names:
            if paths.is_distilled(name):
                results[name].update(compare_to_baseline(
                    correct[name], correct[paths.BASELINE], correct[paths.TEACHER],
                    params.evaluate.bootstrap_resamples, params.seed,
                ))
                m = results[name]
                low, high = m["accuracy_diff_ci95"]
                print(f"{name} vs baseline: {m['accuracy_diff_vs_baseline']:+.2f} points "
                      f"(95% CI {low:+.2f} to {high:+.2f}), McNemar p={m['mcnemar_p']:.3g}")
        write_json(paths.METRICS_DIR / "evaluation.json", results)
        write_csv(paths.PLOTS_DIR / "per_class_accuracy.csv", per_class_rows)
        write_csv(paths.PLOTS_DIR / "accuracy_vs_size.csv", size_rows)
        write_csv(paths.PLOTS_DIR / "curves.csv", curve_rows)
        write_csv(paths.PLOTS_DIR / "predictions.csv", [
            {"index": i, "actual": int(label), **{n: predictions[n][i] for n in names}}
            for i, label in enumerate(data.test.labels.tolist())
        ])
        timing = measure_timings(loaded, results, data.test, normalize, params.evaluate, runtime.threads)
        for name, metrics in results.items():
            run.log_metrics(mlflow_metrics(name, {**metrics, **timing["models"][name]}))
        run.log_artifact(paths.METRICS_DIR / "evaluation.json")
        run.log_artifact(paths.timing_path("evaluate"))
        run.log_model_results(results)  # each model's test accuracy, also on the run that trained it
    return results


def measure_timings(loaded: dict[str, nn.Module], quality: dict[str, dict[str, Any]], test: Split,
                    normalize: Normalizer, cfg: Any, runtime_threads: int) -> dict[str, Any]:
    """Time every model once nothing else of ours runs, on ``cfg.timing_threads`` threads
    (0: the runtime's), and write metrics/timing/evaluate.json and
    plots/timing/accuracy_vs_latency.csv."""
    threads = cfg.timing_threads or runtime_threads
    with machine.timing_conditions(cfg.wait_alone_s, threads) as conditions:
        per_model = time_all(loaded, quality, normalize(test.images[:1]), normalize(test.images[:cfg.batch_size]),
                             cfg)
    timing = {"machine": conditions, "models": per_model}
    write_json(paths.timing_path("evaluate"), timing)
    write_csv(paths.PLOTS_DIR / "timing" / "accuracy_vs_latency.csv", [
        {"model": n, "test_accuracy": quality[n]["test_accuracy"],
         **{k: t[k] for k in ("latency_ms_p50", "latency_ms_p10", "latency_ms_p90")}}
        for n, t in per_model.items()
    ])
    for name, t in per_model.items():
        print(f"{name}: {t['latency_ms_p50']:.3f} ms/image p50 (p10–p90 {t['latency_ms_p10']:.3f}–"
              f"{t['latency_ms_p90']:.3f}), {t['throughput_ips']:,.0f} images/s on {threads} thread(s)")
    return timing


def _write_confusion(name: str, data: PreparedData, preds: torch.Tensor) -> None:
    classes = data.class_names
    rows = [{"actual": classes[a], "predicted": classes[p]} for a, p in zip(data.test.labels.tolist(), preds.tolist())]
    write_csv(paths.CONFUSION_DIR / f"{name}.csv", rows)


def _read_history(name: str) -> list[dict[str, Any]]:
    keep = ("model", "epoch", "train_loss", "train_acc", "val_loss", "val_acc")
    with open(paths.history_path(name), newline="") as fh:
        return [{k: row[k] for k in keep} for row in csv.DictReader(fh)]
