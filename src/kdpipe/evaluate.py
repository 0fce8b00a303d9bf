"""Accuracy (with its 95% Wilson interval), per-class accuracy, confusion, size, parameters,
latency, the teacher-relative ratios that tell what distillation bought, and each distilled
student's paired comparison with the baseline on the same test images (:mod:`kdpipe.stats`)."""

from __future__ import annotations

import csv
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe import models, paths
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
def latency_ms(model: nn.Module, example: torch.Tensor, warmup: int, runs: int) -> float:
    """Median wall time of one forward pass at batch size 1, in ms, after warm-up."""
    model.eval()
    for _ in range(warmup):
        model(example)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(example)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


@torch.inference_mode()
def throughput_ips(model: nn.Module, batch: torch.Tensor, repeats: int = 5) -> float:
    """Images per second at the evaluation batch size (median of ``repeats`` passes)."""
    model.eval()
    model(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    return batch.shape[0] / statistics.median(times)


def evaluate_model(model: nn.Module, test: Split, normalize: Normalizer, num_classes: int, batch_size: int,
                   warmup: int, runs: int) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Metrics of one model on the test split, plus its confusion matrix and predictions.

    Accuracy and timing are measured in float32 on the CPU thread count in force: what a
    user loading the saved ``.pt`` gets by default.
    """
    logits = predict_logits(model, test, normalize, batch_size)
    preds = logits.argmax(1)
    conf = confusion_matrix(test.labels, preds, num_classes)
    example = normalize(test.images[:1])
    batch = normalize(test.images[:batch_size])
    correct = int((preds == test.labels).sum())
    low, high = wilson_interval(correct, len(test.labels))
    metrics = {
        "test_accuracy": round(correct / len(test.labels) * 100.0, 4),
        "test_accuracy_ci95": [round(low * 100.0, 4), round(high * 100.0, 4)],
        "params": count_params(model),
        "size_mb": round(size_mb(model), 6),
        "latency_ms_b1": round(latency_ms(model, example, warmup, runs), 6),
        "throughput_ips": round(throughput_ips(model, batch), 3),
        "threads": torch.get_num_threads(),
        "per_class_accuracy": per_class_accuracy(conf),
    }
    return metrics, conf, preds


def compare_to_teacher(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
    """Compression, speed-up and accuracy drop against the teacher, plus the efficiency score
    accuracy / (size_mb × latency_ms): higher is better."""
    return {
        "compression_ratio": round(teacher["size_mb"] / student["size_mb"], 4),
        "speedup": round(teacher["latency_ms_b1"] / student["latency_ms_b1"], 4),
        "accuracy_drop": round(teacher["test_accuracy"] - student["test_accuracy"], 4),
        "efficiency": round(student["test_accuracy"] / (student["size_mb"] * student["latency_ms_b1"]), 4),
    }


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
    """Evaluate every model side by side and write metrics/evaluation.json and the plots."""
    runtime = setup_runtime(params.runtime, params.seed)
    data = load_prepared(paths.PREPARED_DIR)
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    names = paths.model_names(params.kd.methods)
    results: dict[str, dict[str, Any]] = {}
    per_class_rows, point_rows, curve_rows = [], [], []
    predictions: dict[str, list[int]] = {}
    correct: dict[str, np.ndarray] = {}
    with stage_run("evaluate", params) as run:
        for name in names:
            model, _meta = models.load(paths.model_path(name))
            metrics, conf, preds = evaluate_model(
                model, data.test, normalize, data.num_classes, params.evaluate.batch_size,
                params.evaluate.latency_warmup, params.evaluate.latency_runs,
            )
            per_class = metrics.pop("per_class_accuracy")
            metrics["efficiency"] = round(metrics["test_accuracy"] / (metrics["size_mb"] * metrics["latency_ms_b1"]), 4)
            if name != paths.TEACHER:
                metrics.update(compare_to_teacher(metrics, results[paths.TEACHER]))
            results[name] = metrics
            predictions[name] = preds.tolist()
            correct[name] = (preds == data.test.labels).numpy()
            per_class_rows += [{"model": name, "class": c, "accuracy": a} for c, a in zip(data.class_names, per_class)]
            point_rows.append({"model": name, **{k: metrics[k] for k in
                               ("test_accuracy", "latency_ms_b1", "size_mb", "params")}})
            _write_confusion(name, data, preds)
            curve_rows += _read_history(name)
            print(f"{name}: test accuracy {metrics['test_accuracy']:.2f}%, {metrics['params']:,} params, "
                  f"{metrics['latency_ms_b1']:.3f} ms/image")
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
        write_csv(paths.PLOTS_DIR / "accuracy_vs_cost.csv", point_rows)
        write_csv(paths.PLOTS_DIR / "curves.csv", curve_rows)
        write_csv(paths.PLOTS_DIR / "predictions.csv", [
            {"index": i, "actual": int(label), **{n: predictions[n][i] for n in names}}
            for i, label in enumerate(data.test.labels.tolist())
        ])
        for name, metrics in results.items():
            run.log_metrics(mlflow_metrics(name, metrics))
        run.log_artifact(paths.METRICS_DIR / "evaluation.json")
        run.log_model_results(results)  # each model's test accuracy, also on the run that trained it
    return results


def _write_confusion(name: str, data: PreparedData, preds: torch.Tensor) -> None:
    classes = data.class_names
    rows = [{"actual": classes[a], "predicted": classes[p]} for a, p in zip(data.test.labels.tolist(), preds.tolist())]
    write_csv(paths.CONFUSION_DIR / f"{name}.csv", rows)


def _read_history(name: str) -> list[dict[str, Any]]:
    keep = ("model", "epoch", "train_loss", "train_acc", "val_loss", "val_acc")
    with open(paths.history_path(name), newline="") as fh:
        return [{k: row[k] for k in keep} for row in csv.DictReader(fh)]
