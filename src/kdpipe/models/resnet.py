"""ResNet-18 teachers with a small-image stem (3×3 stride-1 first conv, no max-pool).

``width`` is the channel count of the first stage (the stages have width, 2·width, 4·width,
8·width channels): 64 is the standard ResNet-18 (11.2M parameters, 0.56 GFLOPs per 32×32
image); 32 and 16 keep its depth at a quarter and a sixteenth of the cost, a teacher that a
laptop CPU can train on CIFAR-10 in minutes rather than hours. Blocks are torchvision's
``BasicBlock`` and the module names follow torchvision's ResNet (``conv1``, ``layer1.0.conv1``,
``fc``...), with torchvision's initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kdpipe.models.registry import register
from kdpipe.validation import Settings, fail

STANDARD_WIDTH = 64


@dataclass(frozen=True)
class ResNetSettings(Settings):
    # first-stage channels: 64 is the standard ResNet-18; the default 32 costs about a quarter of
    # its compute, and on digits it taught the students as well (validation, README Results)
    width: int = 32

    def check(self, key: str) -> None:
        if not 8 <= self.width <= 256:
            fail(f"{key}.width", self.width, "an integer between 8 and 256 (64: the standard ResNet-18)")


def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    # imported here: torchvision.models pulls in torch._dynamo (~3 s), which stages that only
    # validate params or read metrics never need
    from torchvision.models.resnet import BasicBlock

    return nn.Sequential(BasicBlock(in_planes, planes, stride, downsample), BasicBlock(planes, planes))


class SmallImageResNet18(nn.Module):
    """ResNet-18 for small images, any channel count and any base width."""

    feature_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, in_channels: int, num_classes: int, width: int = STANDARD_WIDTH) -> None:
        super().__init__()
        self.stage_channels = (width, 2 * width, 4 * width, 8 * width)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        prev = width
        for i, (name, planes) in enumerate(zip(self.feature_names, self.stage_channels)):
            setattr(self, name, _stage(prev, planes, 1 if i == 0 else 2))
            prev = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register("resnet18", ResNetSettings, roles=("teacher",))
def resnet18(in_channels: int, num_classes: int, image_size: int, width: int = STANDARD_WIDTH) -> nn.Module:
    return SmallImageResNet18(in_channels, num_classes, width)
