"""kdpipe.teacher_targets: cached teacher targets are exact, and only used for the run they were
made for. Distilling from the stored logits trains the very same student as running the teacher
online (same views, same batches, same precision); a distillation run whose batches differ
from the cache's is refused, naming what differs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kdpipe import models, paths
from kdpipe.config import parse_params
from kdpipe.data.loader import TrainingBatches
from kdpipe.data.prepare import load_prepared, write_prepared
from kdpipe.distill import CachedTeacher, OnlineTeacher
from kdpipe.distill.base import BatchContext
from kdpipe.errors import KdpipeError
from kdpipe.io import file_digest
from kdpipe.runtime import cpu_supports_bf16, setup_runtime
from kdpipe.teacher_targets import (build_teacher_targets, compute_teacher_logits, fingerprint, load_cached_teacher,
                                    teacher_source, write_teacher_targets)
from kdpipe.train import TrainJob, fit
from tests.conftest import build_method, make_prepared

PARAMS = {"seed": 3, "student": {"epochs": 3, "batch_size": 24, "lr": 0.05, "warmup_fraction": 0.3},
          "data": {"augment": {"crop_padding": 2, "flip": True}}, "mlflow": {"enabled": False}}


def make_params(bf16: str = "off", **changes):
    """``PARAMS`` with the runtime and ``changes`` (dotted keys, e.g. student__batch_size=16)."""
    data = json.loads(json.dumps(PARAMS))
    data["runtime"] = {"bf16": bf16, "channels_last": "on", "threads": 1}
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return parse_params(data)


def _setup(bf16: str, **changes):
    params = make_params(bf16, **changes)
    runtime = setup_runtime(params.runtime, seed=0)
    data = make_prepared(n_train=80, n_val=24, n_test=8, channels=3, size=8, classes=4, flip=True)
    torch.manual_seed(1)
    teacher = models.build("resnet18", 3, 4, 8).eval()
    with torch.no_grad():  # a teacher with non-trivial BN statistics
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return params, runtime, data, teacher


def _batches(params, data, runtime, **override):
    settings = {"batch_size": params.student.batch_size, "augment": params.data.augment, "seed": params.seed,
                **override}
    return TrainingBatches.for_run(data, settings["batch_size"], settings["augment"], settings["seed"], runtime)


def _distill(params, runtime, data, targets, method="logit"):
    torch.manual_seed(5)
    student = models.build("student_cnn", 3, 4, 8, widths=[8, 16], dropout=0.2)
    objective = build_method(method, student, targets, temperature=4.0, alpha=0.9)
    torch.manual_seed(6)  # dropout draws
    result = fit(TrainJob("test", objective, data, params.student, params.data.augment, runtime, params.seed))
    return student.state_dict(), result.history


NO_BF16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")


@pytest.mark.parametrize(("bf16", "method"), [
    ("off", "logit"), ("off", "dkd"), ("off", "combined"),
    pytest.param("on", "logit", marks=NO_BF16), pytest.param("on", "dkd", marks=NO_BF16),
    pytest.param("on", "combined", marks=NO_BF16),
    ("auto", "logit"), ("auto", "dkd"), ("auto", "combined"),
])
def test_cached_targets_train_the_same_student_as_the_online_teacher(bf16, method):
    """fp32 (bf16=off): identical weights and metrics. bf16=on: still identical, because the
    cache stores the bf16 teacher's logits exactly (they are not the fp32 teacher's logits).
    bf16=auto: the teacher in bf16 and the student in fp32 (on a bf16 CPU), still identical.
    A method that also reads feature maps (combined) gets the live teacher with the cache."""
    params, runtime, data, teacher = _setup(bf16)
    logits = compute_teacher_logits(teacher, data, params.student.epochs, _batches(params, data, runtime), runtime)
    assert logits.shape == (3, 80, 4) and logits.dtype == np.float32 and np.isfinite(logits).all()
    online_state, online_history = _distill(params, runtime, data, OnlineTeacher(teacher, runtime), method)
    cached_state, cached_history = _distill(params, runtime, data, CachedTeacher(logits, module=teacher), method)
    assert online_history == cached_history
    for name, value in online_state.items():
        assert torch.equal(value, cached_state[name]), name
    soft_terms = {"logit": ["train_kd"], "combined": ["train_kd", "train_at"], "dkd": ["train_tckd", "train_nckd"]}
    assert all(online_history[-1][term] > 0 for term in soft_terms[method])


@pytest.mark.parametrize(("bf16", "method", "mix"), [
    ("off", "logit", "mixup"), ("off", "dkd", "mixup"), ("off", "combined", "mixup"),
    ("off", "logit", "cutmix"), ("off", "dkd", "cutmix"), ("off", "combined", "cutmix"),
    ("auto", "logit", "mixup"), ("auto", "dkd", "cutmix"),
])
def test_cached_targets_on_mixed_views_train_the_same_student_as_the_online_teacher(bf16, method, mix):
    """Consistent mixed views: the cache holds the teacher's outputs on the very mixed images
    the student trains on (soft labels and all), so the student is the online one bit for bit."""
    params, runtime, data, teacher = _setup(bf16, data__augment__mix=mix, data__augment__mix_alpha=0.8)
    batches = _batches(params, data, runtime)
    assert batches.describe()["mix"] == mix and batches.describe()["mix_alpha"] == 0.8
    assert next(iter(batches.epoch(0))).labels.shape == (24, 4)  # soft labels
    logits = compute_teacher_logits(teacher, data, params.student.epochs, batches, runtime)
    plain = compute_teacher_logits(teacher, data, params.student.epochs,
                                   _batches(params, data, runtime, augment=make_params(bf16).data.augment), runtime)
    assert not np.allclose(logits, plain)  # the teacher did see other (mixed) images
    online_state, online_history = _distill(params, runtime, data, OnlineTeacher(teacher, runtime), method)
    cached_state, cached_history = _distill(params, runtime, data, CachedTeacher(logits, module=teacher), method)
    assert online_history == cached_history
    for name, value in online_state.items():
        assert torch.equal(value, cached_state[name]), name
    assert all(np.isfinite(v) for row in online_history for k, v in row.items() if k.startswith("train_"))
    assert 0 <= online_history[-1]["train_acc"] <= 100


@pytest.mark.parametrize(("bf16", "method", "mix"), [
    ("off", "logit", "none"), ("off", "dkd", "mixup"), ("auto", "logit", "cutmix"), ("auto", "dist", "none"),
    ("off", "combined", "none"),  # feature maps from the live teacher on the view alone, logits flip-averaged
])
def test_flip_averaged_cached_targets_train_the_same_student_as_the_online_flip_averaged_teacher(bf16, method, mix):
    """kd.teacher_flip: the cache holds the teacher's logits averaged over each (mixed) view and
    its mirror image, the very numbers the online teacher gives, so the student is the same."""
    params, runtime, data, teacher = _setup(bf16, data__augment__mix=mix)
    batches = _batches(params, data, runtime)
    logits = compute_teacher_logits(teacher, data, params.student.epochs, batches, runtime, flip=True)
    assert not np.allclose(logits, compute_teacher_logits(teacher, data, params.student.epochs, batches, runtime))
    online_state, online_history = _distill(params, runtime, data, OnlineTeacher(teacher, runtime, flip=True), method)
    cached_state, cached_history = _distill(params, runtime, data, CachedTeacher(logits, module=teacher), method)
    assert online_history == cached_history
    for name, value in online_state.items():
        assert torch.equal(value, cached_state[name]), name


@pytest.mark.parametrize("mix", ["none", "mixup", "cutmix"])
def test_cached_rows_are_the_online_teacher_outputs_on_the_same_views(mix):
    params, runtime, data, teacher = _setup("off", data__augment__mix=mix)
    batches = _batches(params, data, runtime, batch_size=32)
    logits = compute_teacher_logits(teacher, data, 2, batches, runtime)
    online = OnlineTeacher(teacher, runtime).to(memory_format=torch.channels_last)
    for epoch in range(2):
        for batch in batches.epoch(epoch):
            expected = online(batch.images, BatchContext(batch.indices, epoch))
            cached = CachedTeacher(logits)(batch.images, BatchContext(batch.indices, epoch))
            assert torch.equal(cached, expected)
    # the views really differ between epochs, so do the teacher's outputs on them
    assert not np.allclose(logits[0], logits[1])


def test_cache_round_trip_and_fingerprint_checks(tmp_path):
    params, runtime, data, teacher = _setup("off")
    out = tmp_path / "teacher_targets"
    batches = _batches(params, data, runtime, batch_size=16)
    meta = write_teacher_targets(out, "cached", teacher=teacher, teacher_sha256="abc", data=data, epochs=2,
                                 batches=batches, runtime=runtime)
    assert meta["shape"] == [2, 80, 4] and meta["dtype"] == "float32"
    expected = fingerprint(data, batches, 2, teacher, "abc", runtime, False)
    assert {k: meta[k] for k in expected} == expected and meta["teacher_flip"] is False
    cached = load_cached_teacher(out, expected)
    assert cached.module is None
    direct = compute_teacher_logits(teacher, data, 2, batches, runtime)
    idx = torch.tensor([5, 0, 79])
    assert torch.equal(cached(torch.zeros(3, 3, 8, 8), BatchContext(idx, 1)), torch.from_numpy(direct[1][idx.numpy()]))
    assert load_cached_teacher(out, expected, module=teacher).module.model is teacher  # for feature-based methods
    assert load_cached_teacher(out, {**expected, "threads": 7}) is not None  # the thread count may differ
    for change in ({"epochs": 3}, {"batch_size": 32}, {"seed": 4}, {"teacher_sha256": "def"}, {"flip": False},
                   {"teacher_flip": True},
                   {"train_sha256": "0" * 64}, {"teacher_precision": "bfloat16"}, {"channels_last": False}):
        with pytest.raises(KdpipeError, match="another run") as info:
            load_cached_teacher(out, {**expected, **change})
        assert f"{next(iter(change))}: cache" in str(info.value)
    other_aug = fingerprint(data, _batches(params, data, runtime, batch_size=16,
                                           augment=make_params(data__augment__crop_padding=1).data.augment),
                            2, teacher, "abc", runtime, False)
    with pytest.raises(KdpipeError, match="crop_padding: cache 2 vs run 1"):
        load_cached_teacher(out, other_aug)
    write_teacher_targets(out, "online")  # replaces the directory: nothing heavy left
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"]
    assert json.loads((out / "meta.json").read_text())["mode"] == "online"
    with pytest.raises(KdpipeError, match="holds no logits"):
        load_cached_teacher(out, expected)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind
    with pytest.raises(KdpipeError, match="run the teacher_targets stage first"):
        load_cached_teacher(tmp_path / "missing", expected)


def test_a_cache_whose_contents_changed_is_refused(tmp_path):
    """Same shape, other values (an edited, truncated or NaN-filled logits.npy): the sha256 in
    meta.json catches it before a single student step."""
    params, runtime, data, teacher = _setup("off")
    out = tmp_path / "teacher_targets"
    batches = _batches(params, data, runtime, batch_size=16)
    write_teacher_targets(out, "cached", teacher=teacher, teacher_sha256="abc", data=data, epochs=2,
                          batches=batches, runtime=runtime)
    expected = fingerprint(data, batches, 2, teacher, "abc", runtime, False)
    logits_path = out / "logits.npy"
    good = logits_path.read_bytes()
    edited = np.load(logits_path)
    edited[0, :50] = np.nan  # 50 NaN rows, same shape and dtype
    np.save(logits_path, edited)
    with pytest.raises(KdpipeError, match=r"logits.npy is missing or its contents changed .*dvc repro -f -s "
                                          r"teacher_targets"):
        load_cached_teacher(out, expected)
    logits_path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(KdpipeError, match="contents changed"):
        load_cached_teacher(out, expected)
    logits_path.write_bytes(good)
    assert load_cached_teacher(out, expected) is not None


def test_a_teacher_with_non_finite_outputs_writes_no_cache(tmp_path):
    params, runtime, data, teacher = _setup("off")
    with torch.no_grad():
        next(teacher.parameters()).fill_(float("nan"))
    out = tmp_path / "teacher_targets"
    with pytest.raises(KdpipeError, match="non-finite logits"):
        write_teacher_targets(out, "cached", teacher=teacher, teacher_sha256="abc", data=data, epochs=1,
                              batches=_batches(params, data, runtime, batch_size=16), runtime=runtime)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


# ---- the teacher_targets stage and the distill run must draw the same batches ----------------


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory with prepared data and a trained teacher, as the stages see it."""
    monkeypatch.chdir(tmp_path)
    params, runtime, data, teacher = _setup("off")
    write_prepared(paths.PREPARED_DIR, data)
    models.save(paths.model_path(paths.TEACHER), teacher, "resnet18", {}, data.meta)
    return teacher


def _source(params, teacher, live=False):
    runtime = setup_runtime(params.runtime, params.seed)
    return teacher_source(teacher, load_prepared(paths.PREPARED_DIR), params.student, params.data.augment, params.seed,
                          runtime, cached=params.kd.teacher_targets == "cached", live=live, flip=params.kd.teacher_flip)


def test_the_distill_run_reads_the_cache_the_stage_wrote_for_its_params(project):
    params = make_params()
    meta = build_teacher_targets(params)
    assert (meta["batch_size"], meta["crop_padding"], meta["seed"], meta["epochs"]) == (24, 2, 3, 3)
    assert meta["teacher_sha256"] == file_digest(paths.model_path(paths.TEACHER))
    source = _source(params, project)
    assert isinstance(source, CachedTeacher) and source.module is None
    assert np.array_equal(source.logits, np.load(paths.TEACHER_TARGETS_DIR / "logits.npy"))
    # the rows are the teacher's outputs on the batches the student draws in that run
    runtime = setup_runtime(params.runtime, params.seed)
    batches = _batches(params, load_prepared(paths.PREPARED_DIR), runtime)
    online = OnlineTeacher(project, runtime).to(memory_format=runtime.memory_format)
    batch = next(iter(batches.epoch(2)))
    context = BatchContext(batch.indices, 2)
    assert torch.equal(source(batch.images, context), online(batch.images, context))
    live = _source(params, project, live=True)  # feature-based methods get the teacher too
    assert isinstance(live, CachedTeacher) and live.module.model is project
    online_source = _source(make_params(kd={"teacher_targets": "online"}), project)
    assert isinstance(online_source, OnlineTeacher) and online_source.module.model is project


@pytest.mark.parametrize(("change", "key"), [
    ({"student__batch_size": 16}, "batch_size"),
    ({"data__augment__crop_padding": 1}, "crop_padding"),
    ({"data__augment__flip": False}, "flip"),
    ({"seed": 4}, "seed"),
    ({"student__epochs": 4}, "epochs"),
    ({"runtime__channels_last": "off"}, "channels_last"),
    ({"data__augment__mix": "mixup"}, "mix"),
    ({"data__augment__mix": "cutmix"}, "mix"),
])
def test_a_distill_run_with_other_batch_settings_than_the_cache_is_refused(project, change, key):
    build_teacher_targets(make_params())  # the cache: batch size 24, crop padding 2, flips, seed 3, 3 epochs
    with pytest.raises(KdpipeError) as info:
        _source(make_params(**change), project)
    message = str(info.value)
    assert "computed for another run" in message and f"{key}: cache" in message, message
    assert "dvc repro" in message


def test_a_flip_averaged_cache_serves_only_flip_averaged_runs_and_needs_mirrored_views(project):
    flipped = make_params(kd={"teacher_flip": True})
    meta = build_teacher_targets(flipped)
    assert meta["teacher_flip"] is True
    source = _source(flipped, project)
    runtime = setup_runtime(flipped.runtime, flipped.seed)
    batch = next(iter(_batches(flipped, load_prepared(paths.PREPARED_DIR), runtime).epoch(1)))
    context = BatchContext(batch.indices, 1)
    online = OnlineTeacher(project, runtime, flip=True).to(memory_format=runtime.memory_format)
    assert isinstance(source, CachedTeacher) and torch.equal(source(batch.images, context), online(batch.images, context))
    with pytest.raises(KdpipeError, match="teacher_flip: cache True vs run False"):
        _source(make_params(), project)
    build_teacher_targets(make_params())
    with pytest.raises(KdpipeError, match="teacher_flip: cache False vs run True"):
        _source(flipped, project)
    # data whose classes a mirror changes (digits: its views are never mirrored, whatever
    # data.augment.flip says) refuses it, cached or online, writing nothing
    shutil.rmtree(paths.PREPARED_DIR)
    write_prepared(paths.PREPARED_DIR, make_prepared(n_train=80, n_val=24, n_test=8, channels=3, size=8, classes=4,
                                                     flip=False))
    for kd in ({"teacher_flip": True}, {"teacher_flip": True, "teacher_targets": "online"}):
        with pytest.raises(KdpipeError, match=r"kd.teacher_flip is true but this run never mirrors its images.*"
                                              r"set kd.teacher_flip: false"):
            _source(make_params(kd=kd), project)
    shutil.rmtree(paths.TEACHER_TARGETS_DIR)
    with pytest.raises(KdpipeError, match="never mirrors its images"):
        build_teacher_targets(flipped)
    assert not paths.TEACHER_TARGETS_DIR.exists()


def test_a_cache_of_mixed_views_is_used_only_for_the_same_mixing(project):
    """A cache made with MixUp at α = 0.5 serves that run only: another α, CutMix or no mixing
    is refused, naming the key; without mixing, mix_alpha decides nothing and may differ."""
    mixup = make_params(data__augment__mix="mixup", data__augment__mix_alpha=0.5)
    meta = build_teacher_targets(mixup)
    assert (meta["mix"], meta["mix_alpha"]) == ("mixup", 0.5)
    assert isinstance(_source(mixup, project), CachedTeacher)
    for change, expected in (({"data__augment__mix_alpha": 1.0}, "mix_alpha: cache 0.5 vs run 1.0"),
                             ({"data__augment__mix": "cutmix"}, "mix: cache 'mixup' vs run 'cutmix'"),
                             ({"data__augment__mix": "none"}, "mix: cache 'mixup' vs run 'none'")):
        with pytest.raises(KdpipeError, match="computed for another run") as info:
            _source(make_params(**{"data__augment__mix": "mixup", "data__augment__mix_alpha": 0.5, **change}), project)
        assert expected in str(info.value), str(info.value)
    build_teacher_targets(make_params())  # no mixing
    assert isinstance(_source(make_params(data__augment__mix_alpha=3.0), project), CachedTeacher)
    with pytest.raises(KdpipeError, match=r"mix: cache 'none' vs run 'mixup'"):
        _source(make_params(data__augment__mix="mixup"), project)
