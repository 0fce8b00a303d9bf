"""Cached teacher targets are exact: distilling from the stored logits trains the very same
student as running the teacher online (same views, same batches, same precision)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from kdpipe import models
from kdpipe.config import AugmentConfig, RuntimeConfig, TrainConfig
from kdpipe.data.loader import Normalizer, augmentation, train_batches
from kdpipe.distill import OnlineTeacher
from kdpipe.distill.base import BatchContext
from kdpipe.distill.logit import LogitKD
from kdpipe.distill.targets import CachedTeacher
from kdpipe.errors import KdpipeError
from kdpipe.runtime import cpu_supports_bf16, setup_runtime
from kdpipe.teacher_targets import (compute_teacher_logits, fingerprint, load_cached_teacher,
                                    write_teacher_targets)
from kdpipe.train import fit
from tests.conftest import make_prepared

RECIPE = TrainConfig(epochs=3, batch_size=24, lr=0.05, label_smoothing=0.0, warmup_fraction=0.3)
AUGMENT = AugmentConfig(crop_padding=2, flip=True)


def _setup(bf16: str):
    runtime = setup_runtime(RuntimeConfig(bf16=bf16, channels_last="on", threads=0), seed=0)
    data = make_prepared(n_train=80, n_val=24, n_test=8, channels=3, size=8, classes=4, flip=True)
    torch.manual_seed(1)
    teacher = models.build("resnet18", 3, 4, 8).eval()
    with torch.no_grad():  # a teacher with non-trivial BN statistics
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return runtime, data, teacher


def _distill(runtime, data, teacher, targets_factory):
    torch.manual_seed(5)
    student = models.build("student_cnn", 3, 4, 8, widths=[8, 16], dropout=0.2)
    objective = LogitKD(student, targets_factory(teacher), temperature=4.0, alpha=0.9)
    torch.manual_seed(6)  # dropout draws
    result = fit(objective, data, RECIPE, AUGMENT, runtime, seed=3, desc="test")
    history = [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in result.history]
    return student.state_dict(), history


@pytest.mark.parametrize("bf16", ["off", pytest.param("on", marks=pytest.mark.skipif(
    not cpu_supports_bf16(), reason="this CPU has no native bf16"))])
def test_cached_targets_train_the_same_student_as_the_online_teacher(bf16):
    """fp32 (bf16=off): identical weights and metrics. bf16=on: still identical, because the
    cache stores the bf16 teacher's logits exactly (they are not the fp32 teacher's logits)."""
    runtime, data, teacher = _setup(bf16)
    logits = compute_teacher_logits(teacher, data, RECIPE.epochs, RECIPE.batch_size, AUGMENT, runtime, seed=3)
    assert logits.shape == (3, 80, 4) and logits.dtype == np.float32 and np.isfinite(logits).all()
    online_state, online_history = _distill(runtime, data, teacher, lambda t: OnlineTeacher(t, runtime))
    cached_state, cached_history = _distill(runtime, data, teacher, lambda t: CachedTeacher(logits))
    assert online_history == cached_history
    for name, value in online_state.items():
        assert torch.equal(value, cached_state[name]), name
    assert online_history[-1]["train_kd"] > 0


def test_cached_rows_are_the_online_teacher_outputs_on_the_same_views():
    runtime, data, teacher = _setup("off")
    logits = compute_teacher_logits(teacher, data, 2, 32, AUGMENT, runtime, seed=3)
    normalize = Normalizer.from_meta(data.meta["mean"], data.meta["std"])
    online = OnlineTeacher(teacher, runtime).to(memory_format=torch.channels_last)
    pad, flip = augmentation(AUGMENT, data.meta)
    for epoch in range(2):
        for batch in train_batches(data.train, 32, 3, epoch, pad, flip, normalize, torch.channels_last):
            expected = online(batch.images, BatchContext(batch.indices, epoch))
            cached = CachedTeacher(logits)(batch.images, BatchContext(batch.indices, epoch))
            assert torch.equal(cached, expected)
    # the views really differ between epochs, so do the teacher's outputs on them
    assert not np.allclose(logits[0], logits[1])


def test_cache_round_trip_and_fingerprint_checks(tmp_path):
    runtime, data, teacher = _setup("off")
    out = tmp_path / "teacher_targets"
    meta = write_teacher_targets(out, "cached", teacher=teacher, teacher_sha256="abc", data=data, epochs=2,
                                 batch_size=16, augment=AUGMENT, runtime=runtime, seed=3)
    assert meta["shape"] == [2, 80, 4] and meta["dtype"] == "float32"
    expected = fingerprint(data, 2, 16, AUGMENT, 3, teacher, "abc", runtime)
    cached = load_cached_teacher(out, expected)
    direct = compute_teacher_logits(teacher, data, 2, 16, AUGMENT, runtime, seed=3)
    idx = torch.tensor([5, 0, 79])
    assert torch.equal(cached(torch.zeros(3, 3, 8, 8), BatchContext(idx, 1)), torch.from_numpy(direct[1][idx.numpy()]))
    with pytest.raises(KdpipeError, match="epochs 0..1"):
        cached(torch.zeros(3, 3, 8, 8), BatchContext(idx, 2))
    for change in ({"epochs": 3}, {"batch_size": 32}, {"seed": 4}, {"teacher_sha256": "def"}):
        with pytest.raises(KdpipeError, match="another run"):
            load_cached_teacher(out, {**expected, **change})
    other_aug = fingerprint(data, 2, 16, dataclasses.replace(AUGMENT, crop_padding=1), 3, teacher, "abc", runtime)
    with pytest.raises(KdpipeError, match="crop_padding"):
        load_cached_teacher(out, other_aug)
    write_teacher_targets(out, "online")  # replaces the directory: nothing heavy left
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"]
    assert json.loads((out / "meta.json").read_text())["mode"] == "online"
    with pytest.raises(KdpipeError, match="holds no logits"):
        load_cached_teacher(out, expected)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind
