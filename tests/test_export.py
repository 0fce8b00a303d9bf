"""The export stage: every architecture to ONNX with PyTorch's logits, int8 students close to
float32 with deterministic calibration, the latency harness over runtimes, and the stage on a
tiny synthetic project (files, metrics, timings, the report's deployment section)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from kdpipe import machine, models, onnx_export, paths
from kdpipe.config import parse_params
from kdpipe.data.loader import Normalizer
from kdpipe.data.prepare import write_prepared
from kdpipe.errors import KdpipeError
from kdpipe.evaluate import latency_summary, time_forward
from kdpipe.export import (FP32_TOLERANCE, ORT_FP32, ORT_INT8, PYTORCH, check_fp32, export_all, export_model,
                           fastest, onnx_files, time_runtimes)
from kdpipe.inference import predict_logits
from kdpipe.onnx_export import OPSET, export_onnx, onnx_metadata
from kdpipe.onnx_runtime import OrtModel, read_metadata, session
from kdpipe.onnx_runtime import predict_logits as ort_logits
from kdpipe.quantize import calibration_images, quantize_int8
from kdpipe.report import deployment_section
from tests.conftest import make_prepared
from tests.export_fixtures import exported_toy_student, saved_model, train_student

INT8_MARGIN = 2.0  # points: the int8 student's accuracy on the toy test split vs its float32 export


def _digits_meta() -> dict:
    return make_prepared(channels=1, size=8, classes=4).meta


@pytest.mark.parametrize("arch", models.MODELS.names())
def test_every_architecture_exports_with_pytorchs_logits_and_its_metadata(arch, tmp_path):
    meta = _digits_meta()
    model, file_meta = saved_model(tmp_path / "m.pt", arch, meta)
    path = tmp_path / "m.onnx"
    info = export_onnx(model, torch.randn(2, 1, 8, 8), path, onnx_metadata("teacher", file_meta))
    assert info == {"exporter": "dynamo", "opset": OPSET}
    sess = session(path, threads=1)
    runner = OrtModel(sess)
    for batch in (1, 5):  # the batch dimension is free
        x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(runner(x), expected, rtol=0, atol=1e-4)
    read = read_metadata(sess, path)
    assert read["format"] == "kdpipe-onnx/1" and read["arch"] == arch and read["model"] == "teacher"
    assert read["exporter"] == "dynamo" and read["precision"] == "float32"
    assert read["class_names"] == meta["class_names"]
    pre = read["preprocessing"]
    assert (pre["channels"], pre["image_size"], pre["mean"], pre["std"]) == (1, 8, meta["mean"], meta["std"])
    assert "(x - mean) / std" in pre["input"]


def test_a_model_the_dynamo_exporter_refuses_falls_back_and_says_so(tmp_path, monkeypatch):
    meta = _digits_meta()
    model, file_meta = saved_model(tmp_path / "m.pt", "student_cnn", meta)
    real = onnx_export._export

    def no_dynamo(model, example, path, dynamo):
        if dynamo:
            raise RuntimeError("unsupported operator\nmore lines")
        real(model, example, path, dynamo)

    monkeypatch.setattr(onnx_export, "_export", no_dynamo)
    path = tmp_path / "m.onnx"
    info = export_onnx(model, torch.randn(2, 1, 8, 8), path, onnx_metadata("baseline", file_meta))
    assert info["exporter"] == "torchscript" and info["dynamo_error"] == "RuntimeError: unsupported operator"
    sess = session(path, threads=1)
    assert read_metadata(sess, path)["exporter"] == "torchscript"
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(OrtModel(sess)(x), model(x).numpy(), rtol=0, atol=1e-4)


def test_a_model_neither_exporter_takes_and_a_missing_package_are_one_sentence(tmp_path, monkeypatch):
    model, file_meta = saved_model(tmp_path / "m.pt", "student_cnn", _digits_meta())

    def broken(model, example, path, dynamo):
        raise (RuntimeError("no dynamo") if dynamo else ValueError("no torchscript either"))

    monkeypatch.setattr(onnx_export, "_export", broken)
    with pytest.raises(KdpipeError, match=r"^baseline \(student_cnn\) could not be exported to ONNX by either exporter "
                                          r"\(RuntimeError: no dynamo; then ValueError: no torchscript either\)\.$"):
        export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx", onnx_metadata("baseline", file_meta))
    with pytest.raises(KdpipeError, match=r"^kdpipe_no_such_runtime is not installed; install kdpipe's pinned "
                                          r"dependencies \(make setup, or pip install -e \.\)\.$"):
        onnx_export.require("kdpipe_no_such_runtime.quantization")


def test_the_float32_check_allows_1e_4_scaled_by_logits_above_1():
    assert check_fp32("m", 9e-5, 0.5) == FP32_TOLERANCE
    assert check_fp32("m", 1.9e-3, 20.0) == pytest.approx(2e-3)
    with pytest.raises(KdpipeError, match=r"the ONNX export of teacher gives logits up to 0.0003 away from PyTorch's "
                                          r"\(allowed 0.0001\)"):
        check_fp32("teacher", 3e-4, 1.0)
    with pytest.raises(KdpipeError):
        check_fp32("teacher", float("nan"), 1.0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A student trained on the toy squares, with its float32 ONNX export."""
    folder = tmp_path_factory.mktemp("toy")
    return (*exported_toy_student(folder, n_test=200, seed=3), folder)


def test_int8_student_loads_runs_and_stays_close_to_float32(toy):
    data, model, normalize, props, folder = toy
    calibration = calibration_images(data.train, normalize, seed=42)
    info = quantize_int8(folder / "student.onnx", folder / "student.int8.onnx", calibration, props)
    assert info["calibration_images"] == 256 and info["format"] == "QDQ"
    fp32 = ort_logits(OrtModel(session(folder / "student.onnx", 1)), data.test, normalize, 64)
    sess = session(folder / "student.int8.onnx", 1)
    int8 = ort_logits(OrtModel(sess), data.test, normalize, 64)
    labels = data.test.labels
    acc_fp32 = float((fp32.argmax(1) == labels).float().mean()) * 100
    acc_int8 = float((int8.argmax(1) == labels).float().mean()) * 100
    assert acc_fp32 > 90  # the fixture learned its task: the comparison means something
    assert abs(acc_int8 - acc_fp32) <= INT8_MARGIN
    assert float((int8.argmax(1) == fp32.argmax(1)).float().mean()) >= 0.95
    meta = read_metadata(sess, folder / "student.int8.onnx")
    assert meta["precision"] == "int8" and meta["quantization"]["calibration_images"] == 256
    assert meta["class_names"] == data.meta["class_names"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(folder / "student.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_calibration_is_seeded_and_gives_the_same_bytes_twice(toy):
    data, _, normalize, props, folder = toy
    first = calibration_images(data.train, normalize, seed=42)
    assert first.shape == (256, 1, 8, 8) and first.dtype == np.float32
    np.testing.assert_array_equal(first, calibration_images(data.train, normalize, seed=42))
    assert not np.array_equal(calibration_images(data.train, normalize, 42, count=64),
                              calibration_images(data.train, normalize, 7, count=64))
    assert len(calibration_images(data.train, normalize, seed=42, count=10_000)) == len(data.train)
    for out in ("a.int8.onnx", "b.int8.onnx"):
        quantize_int8(folder / "student.onnx", folder / out, calibration_images(data.train, normalize, 42), props)
    assert (folder / "a.int8.onnx").read_bytes() == (folder / "b.int8.onnx").read_bytes()


def test_exporting_a_model_twice_gives_the_same_files(toy, tmp_path):
    data, model, normalize, _, folder = toy
    meta = models.load(folder / "student.pt")[1]
    calibration = calibration_images(data.train, normalize, 42)
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        export_model("baseline", model, meta, normalize(data.test.images[:2]), calibration, tmp_path / sub)
    for name in ("baseline.onnx", "baseline.int8.onnx"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


# ------------------------------------------------------------------------------ latency harness


def test_time_forward_times_any_callable_after_its_warm_up():
    calls = {"slow_start": 0, "steady": 0}

    def slow_start(x):
        calls["slow_start"] += 1
        if calls["slow_start"] <= 3:  # the warm-up passes: slow, and never counted
            time.sleep(0.05)
        return x

    def steady(x):
        calls["steady"] += 1
        return x

    times = time_forward({"slow_start": slow_start, "steady": steady}, torch.zeros(1), warmup=3, runs=30)
    assert calls == {"slow_start": 33, "steady": 33}
    assert times["slow_start"].shape == (30,) and times["slow_start"].max() < 50.0
    summary = latency_summary(times["slow_start"])
    assert 0 < summary["latency_ms_p10"] <= summary["latency_ms_p50"] <= summary["latency_ms_p90"]


def test_the_fastest_runtime_and_the_speedup_over_the_teachers_fastest():
    base = np.arange(1.0, 11.0)
    times = {"teacher/pytorch": base * 20, "teacher/ort_fp32": base * 8,  # the teacher is fastest in ONNX fp32
             "baseline/pytorch": base * 4, "baseline/ort_fp32": base * 3, "baseline/ort_int8": base * 2}
    per_model: dict = {}
    for key, t in times.items():
        name, runtime = key.split("/")
        per_model.setdefault(name, {})[runtime] = latency_summary(t)
    out = fastest(per_model, times)
    assert out["teacher"] == {"runtime": ORT_FP32, "latency_ms_p50": 44.0}
    assert out["baseline"] == {"runtime": ORT_INT8, "latency_ms_p50": 11.0, "speedup_vs_teacher": 4.0,
                               "speedup_vs_teacher_p10": 4.0, "speedup_vs_teacher_p90": 4.0}


def test_time_runtimes_uses_and_records_the_timing_threads(toy, monkeypatch):
    data, model, normalize, _, folder = toy
    monkeypatch.setattr(machine, "other_stage_processes", lambda: [])
    files = {"baseline": {ORT_FP32: folder / "student.onnx"}}
    before = torch.get_num_threads()
    for timing_threads, expected in ((1, 1), (0, 2)):  # 0: the runtime's thread count (here 2)
        cfg = parse_params({"evaluate": {"timing_threads": timing_threads, "latency_warmup": 2, "latency_runs": 15,
                                         "wait_alone_s": 0, "batch_size": 32}}).evaluate
        timing = time_runtimes({"baseline": model}, files, data.test, normalize, cfg, runtime_threads=2)
        m = timing["machine"]
        assert m["threads"] == expected and m["intra_op_threads"] == expected and m["inter_op_threads"] == 1
        assert m["allow_spinning"] is False and m["cpu"] and m["onnxruntime"]
        assert m["other_kdpipe_stages_running"] == 0
        assert torch.get_num_threads() == before  # put back for what runs next
    assert timing["protocol"] == {"batch_1_warmup": 2, "batch_1_runs": 15, "throughput_batch_size": 32}
    runtimes = timing["models"]["baseline"]
    assert set(runtimes) == {PYTORCH, ORT_FP32}
    for runtime, t in runtimes.items():
        assert 0 < t["latency_ms_p10"] <= t["latency_ms_p50"] <= t["latency_ms_p90"]
        assert t["throughput_ips"] > 0
        assert ("speedup_vs_pytorch" in t) == (runtime != PYTORCH)
    assert timing["best"]["baseline"]["runtime"] in runtimes


# ------------------------------------------------------------------------------ the stage


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """export_all on a tiny project: a ResNet teacher, a trained baseline and a distilled student."""
    root = tmp_path_factory.mktemp("export_stage")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(machine, "other_stage_processes", lambda: [])
        data = make_prepared(n_train=256, n_val=16, n_test=100, channels=1, size=8, classes=4, seed=5)
        write_prepared(paths.PREPARED_DIR, data)
        saved_model(paths.model_path("teacher"), "resnet18", data.meta)
        train_student(data, paths.model_path("baseline"), seed=1)
        train_student(data, paths.model_path("distilled_logit"), seed=2)
        params = parse_params({"kd": {"methods": ["logit"]}, "mlflow": {"enabled": False},
                               "evaluate": {"batch_size": 64, "latency_warmup": 2, "latency_runs": 20,
                                            "wait_alone_s": 0, "timing_threads": 1},
                               "runtime": {"device": "cpu", "threads": 1}})
        quality = export_all(params)
        yield root, data, quality


def test_the_stage_writes_every_model_and_every_student_in_int8(exported):
    root, data, _ = exported
    names = sorted(p.name for p in (root / paths.ONNX_DIR).iterdir())
    assert names == ["baseline.int8.onnx", "baseline.onnx", "distilled_logit.int8.onnx", "distilled_logit.onnx",
                     "teacher.onnx"]
    assert not [p for p in root.rglob(".*.tmp")]  # written atomically, nothing left behind
    for name in ("teacher", "baseline", "distilled_logit"):
        expected = {ORT_FP32} if name == "teacher" else {ORT_FP32, ORT_INT8}
        assert set(onnx_files(name, root / paths.ONNX_DIR)) == expected


def test_the_quality_metrics_per_model_and_runtime(exported):
    root, data, quality = exported
    written = json.loads((root / "metrics" / "export.json").read_text())
    assert written == quality and list(written) == ["teacher", "baseline", "distilled_logit"]
    assert set(written["teacher"]) == {PYTORCH, ORT_FP32}
    assert set(written["baseline"]) == set(written["distilled_logit"]) == {PYTORCH, ORT_FP32, ORT_INT8}
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    for name, runtimes in written.items():
        model, _ = models.load(root / paths.model_path(name))
        expected = predict_logits(model, data.test, normalize, 64).argmax(1)
        assert runtimes[PYTORCH]["test_accuracy"] == pytest.approx(
            float((expected == data.test.labels).float().mean()) * 100, abs=1e-3)
        assert runtimes[PYTORCH]["size_mb"] == pytest.approx((root / paths.model_path(name)).stat().st_size / 2**20,
                                                             abs=1e-6)
        fp32 = runtimes[ORT_FP32]
        assert fp32["test_accuracy"] == runtimes[PYTORCH]["test_accuracy"]
        assert fp32["max_abs_diff"] <= fp32["max_abs_diff_allowed"] and fp32["max_abs_diff_allowed"] >= 1e-4
        assert fp32["opset"] == OPSET and fp32["exporter"] == "dynamo"
        assert fp32["size_mb"] == pytest.approx((root / paths.onnx_path(name)).stat().st_size / 2**20, abs=1e-6)
        assert not {"latency_ms_p50", "throughput_ips"} & set(fp32)  # timings live apart
        if ORT_INT8 in runtimes:
            int8 = runtimes[ORT_INT8]
            assert abs(int8["test_accuracy"] - fp32["test_accuracy"]) <= INT8_MARGIN
            assert 95 <= int8["agreement_with_fp32"] <= 100 and int8["calibration_images"] == 256
            # quantized weights are stored as 8-bit integers (on models this tiny the QDQ nodes,
            # not the weights, dominate the file size, so the size is no test of it)
            import onnx

            proto = onnx.load(str(root / paths.onnx_path(name, int8=True)))
            kinds = {init.data_type for init in proto.graph.initializer}
            assert kinds & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}, kinds


def test_the_timings_per_model_and_runtime_with_speedups(exported):
    root, _, quality = exported
    timing = json.loads((root / "metrics" / "timing" / "export.json").read_text())
    assert timing["machine"]["threads"] == 1 and timing["machine"]["intra_op_threads"] == 1
    assert timing["protocol"]["batch_1_runs"] == 20
    for name, runtimes in quality.items():
        assert set(timing["models"][name]) == set(runtimes)
        for runtime, t in timing["models"][name].items():
            assert 0 < t["latency_ms_p10"] <= t["latency_ms_p50"] <= t["latency_ms_p90"], (name, runtime)
            assert ("speedup_vs_pytorch" in t) == (runtime != PYTORCH)
        best = timing["best"][name]
        assert best["latency_ms_p50"] == min(t["latency_ms_p50"] for t in timing["models"][name].values())
        assert ("speedup_vs_teacher" in best) == (name != "teacher")


def test_the_report_shows_the_deployment_table_and_figure(exported, tmp_path):
    root, _, quality = exported
    timing = json.loads((root / "metrics" / "timing" / "export.json").read_text())
    lines = deployment_section(quality, timing, tmp_path)
    text = "\n".join(lines)
    assert lines[0] == "## Deployment"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| Model")]
    assert len(rows) == 2 + 3 + 3
    t = timing["models"]["baseline"][ORT_INT8]
    q = quality["baseline"][ORT_INT8]
    assert (f"| baseline | ONNX Runtime int8 | {q['test_accuracy']:.2f} | {q['agreement_with_fp32']:.2f} |" in text
            and f"| {t['latency_ms_p50']:.3f} | {t['latency_ms_p90']:.3f} |" in text)
    assert f"opset {OPSET}" in text and "1 thread(s)" in text and "figures/deployment.png" in text
    assert (tmp_path / "deployment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
