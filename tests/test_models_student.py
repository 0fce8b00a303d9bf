"""kdpipe.models.student: the compact student CNN, its size knobs and its feature maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdpipe import models
from kdpipe.models import FeatureTap

STUDENT_ARGS = {"widths": [32, 64, 128], "dropout": 0.2}


def student_param_count(in_channels: int, widths: list[int], num_classes: int) -> int:
    """By hand: per block a bias-free 3×3 conv and a BatchNorm (weight + bias); then a linear layer."""
    total, prev = 0, in_channels
    for w in widths:
        total += prev * w * 3 * 3 + 2 * w
        prev = w
    return total + prev * num_classes + num_classes


@pytest.mark.parametrize("channels", [1, 3])
def test_parameter_count_by_hand(channels):
    for size in (8, 100):  # the global pool makes the count independent of the image size
        student = models.build("student_cnn", channels, 7, size, **STUDENT_ARGS)
        assert models.count_params(student) == student_param_count(channels, [32, 64, 128], 7)


def test_at_cifar_shape_it_has_about_95k_parameters():
    student = models.build("student_cnn", 3, 10, 32, **STUDENT_ARGS)
    # 3·32·9 + 2·32  +  32·64·9 + 2·64  +  64·128·9 + 2·128  +  128·10 + 10
    expected = (864 + 64) + (18_432 + 128) + (73_728 + 256) + (1_280 + 10)
    assert expected == 94_762 == student_param_count(3, [32, 64, 128], 10)
    assert models.count_params(student) == expected


def test_layout_is_conv_bn_relu_pool_then_gap_dropout_linear():
    student = models.build("student_cnn", 3, 10, 32, widths=[16, 32], dropout=0.3)
    block = list(student.blocks[0])
    assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    head = list(student.head)
    assert [type(m) for m in head] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Linear]
    assert head[2].p == 0.3 and head[3].in_features == 32


def test_seed_family_grows_with_its_widths():
    sizes = [models.count_params(models.build("student_cnn", 3, 10, 32, widths=w))
             for w in ([16, 32, 64], [32, 64, 128], [48, 96, 256])]
    assert sizes == sorted(sizes)


def test_depth_knob():
    shallow = models.build("student_cnn", 1, 10, 8, widths=[16, 32])
    deep = models.build("student_cnn", 1, 10, 8, widths=[16, 32], convs_per_block=2)
    assert models.count_params(deep) - models.count_params(shallow) == (16 * 16 * 9 + 2 * 16) + (32 * 32 * 9 + 2 * 32)
    assert deep(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert [type(m) for m in deep.blocks[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2 + [nn.MaxPool2d]
    # convs_per_block=1 keeps the layout of files saved before the knob existed
    assert set(shallow.state_dict()) == {
        f"blocks.{b}.{i}.{p}" for b in range(2) for i, p in ((0, "weight"), (1, "weight"), (1, "bias"),
                                                               (1, "running_mean"), (1, "running_var"),
                                                               (1, "num_batches_tracked"))
    } | {"head.3.weight", "head.3.bias"}


@pytest.mark.parametrize(("channels", "size", "expected"), [
    (1, 8, [(32, 4, 4), (64, 2, 2), (128, 1, 1)]),
    (3, 32, [(32, 16, 16), (64, 8, 8), (128, 4, 4)]),
    (3, 100, [(32, 50, 50), (64, 25, 25), (128, 12, 12)]),
])
def test_feature_maps_are_the_pooled_block_outputs(channels, size, expected):
    model = models.build("student_cnn", channels, 5, size, **STUDENT_ARGS).eval()
    assert model.feature_names == ("blocks.0", "blocks.1", "blocks.2")
    with torch.no_grad(), FeatureTap(model, model.feature_names) as tap:
        model(torch.randn(3, channels, size, size))
    assert [tuple(f.shape) for f in tap.features] == [(3, *s) for s in expected]


def test_tiny_inputs_still_work():
    # 4×4 with four blocks: pooling stops at 1×1 instead of failing
    student = models.build("student_cnn", 1, 3, 4, widths=[4, 4, 4, 4], dropout=0.0).eval()
    with torch.no_grad():
        assert student(torch.randn(2, 1, 4, 4)).shape == (2, 3)
    assert sum(isinstance(m, nn.MaxPool2d) for m in student.modules()) == 2
