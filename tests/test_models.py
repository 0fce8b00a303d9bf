"""Teacher and student architectures, feature taps, and self-describing model files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdpipe import models
from kdpipe.errors import KdpipeError
from kdpipe.models import FeatureTap

SHAPES = [(1, 8), (3, 32), (3, 100)]
STUDENT_ARGS = {"widths": [32, 64, 128], "dropout": 0.2}


def student_param_count(in_channels: int, widths: list[int], num_classes: int) -> int:
    """By hand: per block a bias-free 3×3 conv and a BatchNorm (weight + bias); then a linear layer."""
    total, prev = 0, in_channels
    for w in widths:
        total += prev * w * 3 * 3 + 2 * w
        prev = w
    return total + prev * num_classes + num_classes


def teacher_param_count(in_channels: int, num_classes: int) -> int:
    """torchvision's ImageNet ResNet-18 has 11,689,512 parameters; swap its 7×7×3 stem for a
    3×3×C one and its 1000-way head for a K-way one."""
    return 11_689_512 - 7 * 7 * 3 * 64 + 3 * 3 * in_channels * 64 - (512 * 1000 + 1000) + 512 * num_classes + num_classes


@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_teacher_and_student_run_on_any_channels_and_size(channels, size):
    torch.manual_seed(0)
    x = torch.randn(2, channels, size, size)
    teacher = models.build("resnet18", channels, 7, size).eval()
    student = models.build("student_cnn", channels, 7, size, **STUDENT_ARGS).eval()
    with torch.no_grad():
        assert teacher(x).shape == (2, 7)
        assert student(x).shape == (2, 7)
    assert models.count_params(teacher) == teacher_param_count(channels, 7)
    assert models.count_params(student) == student_param_count(channels, [32, 64, 128], 7)


def test_student_at_cifar_shape_has_about_95k_parameters():
    student = models.build("student_cnn", 3, 10, 32, **STUDENT_ARGS)
    # 3·32·9 + 2·32  +  32·64·9 + 2·64  +  64·128·9 + 2·128  +  128·10 + 10
    expected = (864 + 64) + (18_432 + 128) + (73_728 + 256) + (1_280 + 10)
    assert expected == 94_762 == student_param_count(3, [32, 64, 128], 10)
    assert models.count_params(student) == expected


def test_student_layout_is_conv_bn_relu_pool_then_gap_dropout_linear():
    student = models.build("student_cnn", 3, 10, 32, widths=[16, 32], dropout=0.3)
    block = list(student.blocks[0])
    assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    head = list(student.head)
    assert [type(m) for m in head] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Linear]
    assert head[2].p == 0.3 and head[3].in_features == 32


def test_teacher_has_a_small_image_stem():
    teacher = models.build("resnet18", 1, 10, 8)
    assert teacher.conv1.kernel_size == (3, 3) and teacher.conv1.stride == (1, 1)
    assert teacher.conv1.in_channels == 1
    assert not any(isinstance(m, nn.MaxPool2d) for m in teacher.modules())


@pytest.mark.parametrize(
    ("arch", "channels", "size", "expected"),
    [
        ("resnet18", 1, 8, [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]),
        ("resnet18", 3, 32, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]),
        ("student_cnn", 1, 8, [(32, 4, 4), (64, 2, 2), (128, 1, 1)]),
        ("student_cnn", 3, 32, [(32, 16, 16), (64, 8, 8), (128, 4, 4)]),
        ("student_cnn", 3, 100, [(32, 50, 50), (64, 25, 25), (128, 12, 12)]),
    ],
)
def test_feature_tap_returns_the_named_feature_maps(arch, channels, size, expected):
    kwargs = STUDENT_ARGS if arch == "student_cnn" else {}
    model = models.build(arch, channels, 5, size, **kwargs).eval()
    names = list(model.feature_names)
    modules = dict(model.named_modules())
    assert len(names) == len(expected) and all(n in modules for n in names)
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        plain = model(x)
        with FeatureTap(model, names) as tap:
            tapped = model(x)
            feats = tap.features
    assert torch.equal(plain, tapped)  # tapping does not change the output
    assert [tuple(f.shape) for f in feats] == [(3, *s) for s in expected]
    # the hooks are gone after the block
    assert all(not m._forward_hooks for m in modules.values())


def test_tiny_inputs_still_work_for_the_student():
    # 4×4 with four blocks: pooling stops at 1×1 instead of failing
    student = models.build("student_cnn", 1, 3, 4, widths=[4, 4, 4, 4], dropout=0.0).eval()
    with torch.no_grad():
        assert student(torch.randn(2, 1, 4, 4)).shape == (2, 3)


def test_unknown_architecture():
    with pytest.raises(KdpipeError, match="unknown architecture 'vgg'"):
        models.build("vgg", 3, 10, 32)


META = {"class_names": ["zero", "one", "two"], "channels": 1, "image_size": 8, "mean": [0.25], "std": [0.5]}


@pytest.mark.parametrize(("arch", "arch_params"), [("student_cnn", {"widths": [8, 16], "dropout": 0.1}),
                                                   ("resnet18", {})])
def test_save_load_round_trip(tmp_path, arch, arch_params):
    torch.manual_seed(0)
    model = models.build(arch, 1, 3, 8, **arch_params)
    # make BatchNorm statistics non-trivial so the buffers must round-trip too
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8) * 3 + 1)
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    path = tmp_path / "m.pt"
    models.save(path, model, arch, arch_params, META, extra={"best_epoch": 3})

    loaded, meta = models.load(path)
    assert not loaded.training and all(not m.training for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
    assert meta["arch"] == arch and meta["arch_params"] == arch_params
    assert meta["class_names"] == ["zero", "one", "two"]
    pre = meta["preprocessing"]
    assert (pre["channels"], pre["image_size"], pre["mean"], pre["std"]) == (1, 8, [0.25], [0.5])
    assert meta["extra"] == {"best_epoch": 3}
    assert "state_dict" not in meta
    # the file is plain tensors and containers: the safe loader reads it
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert set(blob["state_dict"]) == set(model.state_dict())


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "kdpipe-model/1", "payload": nn.Linear(2, 2)}, path)  # a pickled module
    with pytest.raises(Exception) as info:
        models.load(path)
    assert "weights_only" in str(info.value) or "Unsupported" in str(info.value)


def test_load_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(KdpipeError, match="dvc repro"):
        models.load(tmp_path / "nope.pt")


def test_size_mb_counts_parameters_and_buffers():
    model = models.build("student_cnn", 3, 10, 32, **STUDENT_ARGS)
    params = models.count_params(model)
    bn_channels = 32 + 64 + 128
    # float32 params; BatchNorm running mean and var (float32) and num_batches_tracked (int64) per layer
    expected_bytes = 4 * params + 4 * 2 * bn_channels + 8 * 3
    assert models.size_mb(model) == pytest.approx(expected_bytes / 2**20, rel=1e-12)
    # and it tracks the dtype
    assert models.size_mb(model.half()) < models.size_mb(models.build("student_cnn", 3, 10, 32, **STUDENT_ARGS))
