"""The export stage: every trained model to ONNX and every student also to int8, each checked
against PyTorch on the test split, then timed per model × runtime (PyTorch eager fp32, ONNX
Runtime fp32, ONNX Runtime int8) the way inference benchmarks time: batch 1 after warm-up,
the runtimes taking turns pass by pass, a fixed thread count, the machine recorded.

Quality is a function of the models on a given machine (metrics/export.json); timings are
measurements and sit apart (metrics/timing/export.json), like evaluate's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe import machine, models, paths
from kdpipe.config import EvaluateConfig, Params
from kdpipe.data.loader import Normalizer
from kdpipe.data.prepare import PreparedData, Split, load_prepared
from kdpipe.errors import KdpipeError
from kdpipe.evaluate import latency_summary, mlflow_metrics, throughput_ips, time_forward
from kdpipe.inference import predict_logits
from kdpipe.io import atomic_dir, write_json
from kdpipe.onnx_export import export_onnx, onnx_metadata, require
from kdpipe.onnx_runtime import OrtModel, session, session_threads
from kdpipe.onnx_runtime import predict_logits as ort_logits
from kdpipe.quantize import calibration_images, quantize_int8
from kdpipe.runtime import setup_runtime
from kdpipe.tracking import stage_run

PYTORCH, ORT_FP32, ORT_INT8 = "pytorch", "ort_fp32", "ort_int8"
RUNTIMES = (PYTORCH, ORT_FP32, ORT_INT8)  # ort_int8 for the students only
# ONNX Runtime's float32 logits must equal PyTorch's within this, relative to the largest logit
# when that is above 1 (fused Conv+BN and other kernels round differently at every layer).
FP32_TOLERANCE = 1e-4


def onnx_files(name: str, folder: Path = paths.ONNX_DIR) -> dict[str, Path]:
    """The ONNX files of a model, by runtime: fp32 for every model, int8 for the students."""
    files = {ORT_FP32: folder / paths.onnx_path(name).name}
    if name != paths.TEACHER:
        files[ORT_INT8] = folder / paths.onnx_path(name, int8=True).name
    return files


def export_model(name: str, model: nn.Module, meta: dict[str, Any], example: torch.Tensor,
                 calibration: np.ndarray, folder: Path) -> dict[str, Any]:
    """Write a model's ONNX file(s) into ``folder``; returns how (exporter, opset, quantization)."""
    props = onnx_metadata(name, meta)
    files = onnx_files(name, folder)
    info = export_onnx(model, example, files[ORT_FP32], props)
    if ORT_INT8 in files:
        info["quantization"] = quantize_int8(files[ORT_FP32], files[ORT_INT8], calibration,
                                             {**props, "exporter": info["exporter"]})
    return info


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((logits.argmax(1) == labels).float().mean()) * 100.0, 4)


def _size_mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 6)


def check_fp32(name: str, max_abs_diff: float, max_abs_logit: float) -> float:
    """The allowed difference for a model's float32 export; stops when it is exceeded."""
    allowed = FP32_TOLERANCE * max(1.0, max_abs_logit)
    if not max_abs_diff <= allowed:
        raise KdpipeError(f"the ONNX export of {name} gives logits up to {max_abs_diff:.3g} away from PyTorch's "
                          f"(allowed {allowed:.3g}), so it is not the same model; report it with the model's "
                          "architecture.")
    return allowed


def model_quality(name: str, model: nn.Module, files: dict[str, Path], export_info: dict[str, Any], test: Split,
                  normalize: Normalizer, batch_size: int, threads: int) -> dict[str, dict[str, Any]]:
    """Accuracy of every runtime on the whole test split, its largest logit difference from
    PyTorch, the int8 predictions' agreement with float32, file sizes and the opset."""
    reference = predict_logits(model, test, normalize, batch_size)
    out: dict[str, dict[str, Any]] = {
        PYTORCH: {"test_accuracy": _accuracy(reference, test.labels), "size_mb": _size_mb(paths.model_path(name))}}
    fp32_preds = None
    for runtime, path in files.items():
        logits = ort_logits(OrtModel(session(path, threads)), test, normalize, batch_size)
        diff = float((logits - reference).abs().max())
        m: dict[str, Any] = {"test_accuracy": _accuracy(logits, test.labels), "max_abs_diff": float(f"{diff:.3g}")}
        if runtime == ORT_FP32:
            m["max_abs_diff_allowed"] = float(f"{check_fp32(name, diff, float(reference.abs().max())):.3g}")
            fp32_preds = logits.argmax(1)
        else:
            m["agreement_with_fp32"] = round(float((logits.argmax(1) == fp32_preds).float().mean()) * 100.0, 4)
        m.update({"size_mb": _size_mb(path), "opset": export_info["opset"]})
        if runtime == ORT_FP32:
            m["exporter"] = export_info["exporter"]
        else:
            m["calibration_images"] = export_info["quantization"]["calibration_images"]
        out[runtime] = m
    return out


def _renamed(summary: dict[str, float], suffix: str) -> dict[str, float]:
    """latency_summary's ``speedup*`` keys named after what they compare with."""
    return {k.replace("speedup", f"speedup_{suffix}"): v for k, v in summary.items()}


def time_runtimes(loaded: dict[str, nn.Module], files: dict[str, dict[str, Path]], test: Split,
                  normalize: Normalizer, cfg: EvaluateConfig, runtime_threads: int) -> dict[str, Any]:
    """Latency at batch 1 (p10/p50/p90 over ``cfg.latency_runs`` passes after
    ``cfg.latency_warmup``, every model × runtime taking turns), throughput at
    ``cfg.batch_size``, speed-ups over the same model in PyTorch and over the teacher (each in
    its fastest runtime), on ``cfg.timing_threads`` threads (0: the runtime's)."""
    threads = cfg.timing_threads or runtime_threads
    with machine.timing_conditions(cfg.wait_alone_s, threads) as conditions:
        runners: dict[str, Any] = {}
        ort_settings: dict[str, Any] = {}
        for name, model in loaded.items():
            runners[f"{name}/{PYTORCH}"] = model
            for runtime, path in files[name].items():
                sess = session(path, threads)
                ort_settings = session_threads(sess)
                runners[f"{name}/{runtime}"] = OrtModel(sess)
        times = time_forward(runners, normalize(test.images[:1]), cfg.latency_warmup, cfg.latency_runs)
        batch = normalize(test.images[:cfg.batch_size])
        per_model: dict[str, dict[str, Any]] = {name: {} for name in loaded}
        for key, runner in runners.items():
            name, runtime = key.split("/")
            reference = None if runtime == PYTORCH else times[f"{name}/{PYTORCH}"]
            t = _renamed(latency_summary(times[key], reference), "vs_pytorch")
            t["throughput_ips"] = round(throughput_ips(runner, batch), 2)
            per_model[name][runtime] = t
    ort = require("onnxruntime")
    return {
        "machine": {**conditions, "onnxruntime": ort.__version__, **ort_settings},
        "protocol": {"batch_1_warmup": cfg.latency_warmup, "batch_1_runs": cfg.latency_runs,
                     "throughput_batch_size": int(batch.shape[0])},
        "models": per_model,
        "best": fastest(per_model, times),
    }


def fastest(per_model: dict[str, dict[str, Any]], times: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Each model's fastest runtime (lowest p50) and, for the students, the speed-up over the
    teacher in the teacher's fastest runtime (the ratio of the p50s, and the p10–p90 range of
    the pass-by-pass ratios)."""
    best = {name: min(rts, key=lambda r: rts[r]["latency_ms_p50"]) for name, rts in per_model.items()}
    teacher = f"{paths.TEACHER}/{best[paths.TEACHER]}" if paths.TEACHER in best else None
    out: dict[str, dict[str, Any]] = {}
    for name, runtime in best.items():
        out[name] = {"runtime": runtime, "latency_ms_p50": per_model[name][runtime]["latency_ms_p50"]}
        if teacher and name != paths.TEACHER:
            summary = _renamed(latency_summary(times[f"{name}/{runtime}"], times[teacher]), "vs_teacher")
            out[name].update({k: v for k, v in summary.items() if k.startswith("speedup")})
    return out


def export_all(params: Params) -> dict[str, Any]:
    """Export, check and time every model of the pipeline: data/onnx/, metrics/export.json
    (quality) and metrics/timing/export.json (latency, throughput, the machine)."""
    runtime = setup_runtime(params.runtime, params.seed)
    data: PreparedData = load_prepared(paths.PREPARED_DIR)
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    names = paths.model_names(params.kd.methods)
    batch_size = params.evaluate.batch_size
    example = normalize(data.test.images[:2])
    calibration = calibration_images(data.train, normalize, params.seed)
    loaded: dict[str, nn.Module] = {}
    quality: dict[str, dict[str, Any]] = {}
    with stage_run("export", params) as run:
        with atomic_dir(paths.ONNX_DIR) as folder:
            files = {name: onnx_files(name, folder) for name in names}
            for name in names:
                loaded[name], meta = models.load(paths.model_path(name), data.meta)
                info = export_model(name, loaded[name], meta, example, calibration, folder)
                quality[name] = model_quality(name, loaded[name], files[name], info, data.test, normalize, batch_size,
                                              runtime.threads)
                _print_quality(name, quality[name], info)
            timing = time_runtimes(loaded, files, data.test, normalize, params.evaluate, runtime.threads)
        write_json(paths.METRICS_DIR / "export.json", quality)
        write_json(paths.timing_path("export"), timing)
        _print_timing(timing)
        for name, runtimes in quality.items():
            for rt, metrics in runtimes.items():
                run.log_metrics(mlflow_metrics(f"{name}.{rt}", {**metrics, **timing["models"][name][rt]}))
            run.log_metrics(mlflow_metrics(f"{name}.best", timing["best"][name]))
        run.log_artifact(paths.METRICS_DIR / "export.json")
        run.log_artifact(paths.timing_path("export"), "timing")  # both files are named export.json
        if params.mlflow.log_models:
            for name in names:
                for rt, path in onnx_files(name).items():
                    run.log_onnx_model(path, example.numpy(), name=f"{name}_{'int8' if rt == ORT_INT8 else 'fp32'}")
    return quality


def _print_quality(name: str, q: dict[str, dict[str, Any]], info: dict[str, Any]) -> None:
    fp32 = q[ORT_FP32]
    line = (f"{name}: exported with the {info['exporter']} exporter (opset {info['opset']}); test accuracy "
            f"PyTorch {q[PYTORCH]['test_accuracy']:.2f}%, ONNX {fp32['test_accuracy']:.2f}% "
            f"(logits within {fp32['max_abs_diff']:.2g})")
    if ORT_INT8 in q:
        line += (f", int8 {q[ORT_INT8]['test_accuracy']:.2f}% ({q[ORT_INT8]['agreement_with_fp32']:.2f}% "
                 f"of predictions as fp32, {q[ORT_INT8]['size_mb']:.3f} MB)")
    print(line)
    if "dynamo_error" in info:
        print(f"{name}: the dynamo exporter failed ({info['dynamo_error']}); used the TorchScript exporter",
              file=sys.stderr)


def _print_timing(timing: dict[str, Any]) -> None:
    threads = timing["machine"]["threads"]
    for name, runtimes in timing["models"].items():
        for runtime, t in runtimes.items():
            print(f"{name} {runtime}: {t['latency_ms_p50']:.3f} ms/image p50 (p90 {t['latency_ms_p90']:.3f}), "
                  f"{t['throughput_ips']:,.0f} images/s on {threads} thread(s)"
                  + (f", {t['speedup_vs_pytorch']:.2f}× PyTorch" if "speedup_vs_pytorch" in t else ""))
