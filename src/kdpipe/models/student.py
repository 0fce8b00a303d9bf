"""The compact student CNN: Conv→BN→ReLU(→MaxPool) blocks, global average pool, dropout, linear.

Size knobs: ``widths`` (one block per entry, its channel count: the seeds' family is
[16,32,64], [32,64,128], [48,96,256]) and ``convs_per_block`` (depth: Conv-BN-ReLU layers per
block before the pool; 1 keeps the seeds' design and the layout of older model files).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from kdpipe.models.registry import register
from kdpipe.validation import Settings, fail


@dataclass(frozen=True)
class StudentCnnSettings(Settings):
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels of the Conv-BN-ReLU-MaxPool blocks
    convs_per_block: int = 1  # depth: Conv-BN-ReLU layers per block
    dropout: float = 0.2

    def check(self, key: str) -> None:
        if not self.widths or any(w <= 0 for w in self.widths):
            fail(f"{key}.widths", self.widths, "a non-empty list of integers > 0")
        if not 1 <= self.convs_per_block <= 8:
            fail(f"{key}.convs_per_block", self.convs_per_block, "an integer between 1 and 8")
        if not 0 <= self.dropout < 1:
            fail(f"{key}.dropout", self.dropout, "a number in [0, 1)")


class StudentCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, widths: list[int], dropout: float,
                 convs_per_block: int = 1) -> None:
        super().__init__()
        blocks, size, prev = [], image_size, in_channels
        for width in widths:
            layers: list[nn.Module] = []
            for _ in range(convs_per_block):
                layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                prev = width
            if size >= 2:  # pool while there is something to pool, so tiny inputs still work
                layers.append(nn.MaxPool2d(2))
                size //= 2
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.feature_names = tuple(f"blocks.{i}" for i in range(len(widths)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(prev, num_classes))

    def forward(self, x):
        return self.head(self.blocks(x))


@register("student_cnn", StudentCnnSettings, roles=("student",))
def student_cnn(in_channels: int, num_classes: int, image_size: int, widths: list[int] = (32, 64, 128),
                dropout: float = 0.2, convs_per_block: int = 1) -> nn.Module:
    return StudentCNN(in_channels, num_classes, image_size, list(widths), dropout, convs_per_block)
