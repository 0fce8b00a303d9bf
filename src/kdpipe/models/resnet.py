"""ResNet-18 teachers with a small-image stem (3×3 stride-1 first conv, no max-pool)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from kdpipe.models.registry import register


class SmallImageResNet18(nn.Module):
    """torchvision's ResNet-18 for small images and any channel count."""

    feature_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        net = tv_resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool, self.fc = net.avgpool, net.fc

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return SmallImageResNet18(in_channels, num_classes)
