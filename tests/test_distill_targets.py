"""kdpipe.distill.targets: where a batch's teacher logits come from. The frozen teacher stays
in eval mode without gradients; the online teacher runs in its own precision; the cache looks
rows up by (epoch, image index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe import models
from kdpipe.distill import BatchContext, CachedTeacher, FrozenTeacher, OnlineTeacher, TeacherLogits
from kdpipe.distill.targets import flip_mean
from kdpipe.errors import KdpipeError
from kdpipe.runtime import Runtime


class BnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(12, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.fc(x)))


# ---- FrozenTeacher ----------------------------------------------------------------------------


def test_frozen_teacher_stays_in_eval_mode_without_gradients():
    model = BnNet().train()
    frozen = FrozenTeacher(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    frozen.train()
    frozen.train(True)
    assert not frozen.training and not any(m.training for m in model.modules())
    running = model.bn.running_mean.clone()
    x = torch.randn(8, 12, requires_grad=True)
    a, b = frozen(x), frozen(x)
    assert torch.equal(a, b)  # no dropout
    assert torch.equal(model.bn.running_mean, running)  # BatchNorm statistics untouched
    assert not a.requires_grad  # no graph, even for an input that wants one


# ---- TeacherLogits ----------------------------------------------------------------------------


def test_teacher_logits_wrap_a_live_module_once_and_say_whether_they_are_precomputed():
    model = BnNet()
    online = OnlineTeacher(model)
    assert isinstance(online.module, FrozenTeacher) and online.module.model is model
    assert online.teacher is online.module and not online.precomputed
    assert OnlineTeacher(online.module).module is online.module  # a FrozenTeacher is not wrapped again
    assert online.require_module("attention") is online.module
    cached = CachedTeacher(torch.zeros(1, 2, 4))
    assert cached.module is None and cached.precomputed
    with pytest.raises(KdpipeError, match="kd method 'fitnets' reads the teacher's feature maps"):
        cached.require_module("fitnets")
    both = CachedTeacher(torch.zeros(1, 2, 4), module=model)
    assert both.precomputed and isinstance(both.module, FrozenTeacher)
    assert both.require_module("combined").model is model
    assert TeacherLogits().precomputed


# ---- OnlineTeacher ----------------------------------------------------------------------------


def test_online_teacher_runs_the_frozen_teacher_on_the_students_batch():
    model = BnNet()
    online = OnlineTeacher(model)
    online.train()
    x = torch.randn(8, 12)
    with torch.no_grad():
        expected = model.eval()(x)
    assert torch.equal(online(x, BatchContext(torch.arange(8), 0)), expected)
    assert torch.equal(online(x, BatchContext(torch.arange(8), 5)), expected)  # the epoch does not matter


def test_online_teacher_with_a_runtime_runs_in_the_teachers_precision_whatever_the_caller():
    teacher = models.build("resnet18", 1, 4, 8, width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    batch = BatchContext(torch.arange(3), 0)
    with torch.no_grad():
        fp32 = teacher(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = teacher(x).float()
    assert not torch.equal(fp32, bf16)
    cpu = torch.device("cpu")
    off = OnlineTeacher(teacher, Runtime(cpu, 1, None, False, False, bf16_policy="off"))
    on = OnlineTeacher(teacher, Runtime(cpu, 1, torch.bfloat16, False, False, bf16_policy="on"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast is overridden
        assert torch.equal(off(x, batch), fp32)
    got = on(x, batch)  # no autocast around the caller: the teacher's own bf16 is used
    assert got.dtype == torch.float32 and torch.equal(got, bf16)
    # without a runtime the caller's autocast decides
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(OnlineTeacher(teacher)(x, batch).float(), bf16)


def test_flip_mean_averages_each_images_logits_with_its_mirror_images():
    """Checked against the teacher run on each image and on its mirror one at a time: the mean
    of the two, the same for an image and its mirror, and not the teacher's own output."""
    torch.manual_seed(0)
    teacher = models.build("resnet18", 3, 4, 8, width=8).eval()
    x = torch.randn(5, 3, 8, 8)
    got = flip_mean(teacher, x)
    with torch.no_grad():
        for i in range(5):
            one = teacher(x[i:i + 1])[0]
            mirrored = teacher(torch.from_numpy(x[i:i + 1].numpy()[..., ::-1].copy()))[0]
            assert torch.allclose(got[i], (one + mirrored) / 2, atol=1e-5), i
        assert torch.allclose(flip_mean(teacher, x.flip(3)), got, atol=1e-5)  # mirror-invariant
        assert not torch.allclose(teacher(x), got, atol=1e-3)


def test_online_teacher_with_flip_gives_the_flip_mean_in_the_teachers_precision():
    teacher = models.build("resnet18", 1, 4, 8, width=8).eval()
    x = torch.randn(3, 1, 8, 8)
    batch = BatchContext(torch.arange(3), 0)
    cpu = torch.device("cpu")
    with torch.no_grad():
        fp32 = flip_mean(teacher, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = flip_mean(teacher, x)
    off = OnlineTeacher(teacher, Runtime(cpu, 1, None, False, False, bf16_policy="off"), flip=True)
    on = OnlineTeacher(teacher, Runtime(cpu, 1, torch.bfloat16, False, False, bf16_policy="on"), flip=True)
    assert torch.equal(off(x, batch), fp32)
    got = on(x, batch)
    assert got.dtype == torch.float32 and torch.equal(got, bf16) and not torch.equal(bf16, fp32)
    assert not torch.equal(OnlineTeacher(teacher, flip=False)(x, batch), fp32)


# ---- CachedTeacher ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tensor", "numpy", "memmap"])
def test_cached_teacher_looks_rows_up_by_epoch_and_index(kind, tmp_path):
    table = np.random.default_rng(0).standard_normal((3, 10, 4)).astype(np.float32)
    if kind == "tensor":
        logits = torch.from_numpy(table.copy())
    elif kind == "numpy":
        logits = table
    else:
        np.save(tmp_path / "logits.npy", table)
        logits = np.load(tmp_path / "logits.npy", mmap_mode="r")
    cached = CachedTeacher(logits)
    assert (cached.epochs, cached.size, cached.num_classes) == (3, 10, 4)
    idx = torch.tensor([5, 0, 9, 5])
    out = cached(torch.zeros(4, 1, 8, 8), BatchContext(idx, 2))
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(table[2][idx.numpy()]))


def test_cached_teacher_refuses_an_epoch_it_does_not_cover():
    cached = CachedTeacher(torch.zeros(2, 5, 3))
    with pytest.raises(KdpipeError, match=r"epochs 0\.\.1, not epoch 2"):
        cached(torch.zeros(1, 1, 8, 8), BatchContext(torch.tensor([0]), 2))
    with pytest.raises(KdpipeError, match="not epoch -1"):
        cached(torch.zeros(1, 1, 8, 8), BatchContext(torch.tensor([0]), -1))
