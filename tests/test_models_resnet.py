"""kdpipe.models.resnet: ResNet-18 for small images, any channel count and base width, with
torchvision's module names and initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from kdpipe import models
from kdpipe.models import FeatureTap


def teacher_param_count(in_channels: int, num_classes: int) -> int:
    """torchvision's ImageNet ResNet-18 has 11,689,512 parameters; swap its 7×7×3 stem for a
    3×3×C one and its 1000-way head for a K-way one."""
    stem = 3 * 3 * in_channels * 64 - 7 * 7 * 3 * 64
    head = 512 * num_classes + num_classes - (512 * 1000 + 1000)
    return 11_689_512 + stem + head


def stage_channels(model: nn.Module, channels: int, size: int) -> list[int]:
    with torch.no_grad(), FeatureTap(model, model.feature_names) as tap:
        model.eval()(torch.randn(1, channels, size, size))
    return [f.shape[1] for f in tap.features]


@pytest.mark.parametrize("channels", [1, 3])
def test_parameter_count_is_torchvisions_with_a_small_stem_and_k_classes(channels):
    for size in (8, 100):  # the global pool makes the count independent of the image size
        assert models.count_params(models.build("resnet18", channels, 7, size)) == teacher_param_count(channels, 7)
    assert models.count_params(models.build("resnet18", 3, 10, 32)) == 11_173_962


def test_small_image_stem():
    teacher = models.build("resnet18", 1, 10, 8)
    assert teacher.conv1.kernel_size == (3, 3) and teacher.conv1.stride == (1, 1)
    assert teacher.conv1.in_channels == 1
    assert not any(isinstance(m, nn.MaxPool2d) for m in teacher.modules())


@pytest.mark.parametrize(("channels", "size", "expected"), [
    (1, 8, [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]),
    (3, 32, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]),
])
def test_feature_maps_halve_the_resolution_at_each_stage(channels, size, expected):
    model = models.build("resnet18", channels, 5, size).eval()
    assert model.feature_names == ("layer1", "layer2", "layer3", "layer4")
    with torch.no_grad(), FeatureTap(model, model.feature_names) as tap:
        model(torch.randn(3, channels, size, size))
    assert [tuple(f.shape) for f in tap.features] == [(3, *s) for s in expected]


def test_width_scales_every_stage_and_keeps_torchvision_names():
    standard = models.build("resnet18", 3, 10, 32)
    narrow = models.build("resnet18", 3, 10, 32, width=16)
    assert stage_channels(narrow, 3, 32) == [16, 32, 64, 128]
    assert stage_channels(standard, 3, 32) == [64, 128, 256, 512]
    # convs scale with width², so a quarter of the width is about a sixteenth of the weights
    assert 12 < models.count_params(standard) / models.count_params(narrow) < 17
    # same module names and shapes as torchvision's ResNet-18 (stem aside)
    ours = {k: v.shape for k, v in standard.state_dict().items()}
    theirs = {k: v.shape for k, v in tv_resnet18(num_classes=10).state_dict().items()}
    assert ours.keys() == theirs.keys()
    assert all(ours[k] == theirs[k] for k in ours if k != "conv1.weight")


def test_torchvision_initialisation():
    model = models.build("resnet18", 3, 10, 32)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in bns)
    # kaiming normal, fan_out: std = sqrt(2 / (out_channels · k²))
    conv = model.layer3[0].conv1
    std = (2 / (conv.out_channels * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(std, rel=0.05)
