"""``vea_resnet18``: the small-image ResNet-18 with a convolutional spatial-attention module
after each of its four stages, in the spirit of Vision Eagle Attention (Hasan, 2024,
arXiv 2411.10564): convolutions look at a local neighbourhood of every position, produce one
attention map in (0, 1) and the stage's features are re-weighted by it, emphasising the
informative regions and damping the background.

Our module (written for kdpipe, not a port of the paper's code)::

    a = sigmoid(conv1x1(ReLU(BN(depthwise_conv3x3(x)))))     # N×1×H×W, one map shared by all channels
    out = x · a

The stage outputs the re-weighted features, so the feature names (``layer1``..``layer4``)
are the same as ``resnet18``'s and feature-based distillation taps the attended maps.
"""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.models.registry import register
from kdpipe.models.resnet import STANDARD_WIDTH, ResNetSettings, SmallImageResNet18


class SpatialAttention(nn.Module):
    """One attention map per image from a depthwise 3×3 (local context per channel), BN, ReLU
    and a 1×1 projection to one channel; the input is multiplied by its sigmoid."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.local = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.project = nn.Conv2d(channels, 1, 1)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.project(self.relu(self.bn(self.local(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class AttendedStage(nn.Module):
    """A ResNet stage followed by spatial attention; its output is the attended feature map."""

    def __init__(self, stage: nn.Module, channels: int) -> None:
        super().__init__()
        self.stage = stage
        self.attention = SpatialAttention(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.stage(x))


class VeaResNet18(SmallImageResNet18):
    feature_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, in_channels: int, num_classes: int, width: int = STANDARD_WIDTH) -> None:
        super().__init__(in_channels, num_classes, width)
        for name, channels in zip(self.feature_names, self.stage_channels):
            setattr(self, name, AttendedStage(getattr(self, name), channels))


@register("vea_resnet18", ResNetSettings, roles=("teacher",))
def vea_resnet18(in_channels: int, num_classes: int, image_size: int, width: int = STANDARD_WIDTH) -> nn.Module:
    return VeaResNet18(in_channels, num_classes, width)
