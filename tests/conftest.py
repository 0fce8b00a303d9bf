"""Shared fixtures: small prepared data sets made by the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kdpipe.data.prepare import PreparedData, Split

PROJECT_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("PYTHONWARNINGS", "ignore")


def make_prepared(n_train: int = 64, n_val: int = 32, n_test: int = 32, channels: int = 1, size: int = 8,
                  classes: int = 4, flip: bool = False, seed: int = 0) -> PreparedData:
    """A learnable toy data set: each class is a bright square in its own quadrant, plus noise."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        labels = torch.arange(n) % classes
        images = torch.randint(0, 60, (n, channels, size, size), generator=gen, dtype=torch.uint8)
        half = size // 2
        for i, c in enumerate(labels.tolist()):
            r, q = divmod(c % 4, 2)
            images[i, :, r * half:(r + 1) * half, q * half:(q + 1) * half] += 150
        return Split(images, labels)

    meta = {
        "dataset": "toy", "class_names": [f"c{i}" for i in range(classes)], "channels": channels,
        "image_size": size, "mean": [0.3] * channels, "std": [0.3] * channels, "flip": flip,
        "sizes": {"train": n_train, "val": n_val, "test": n_test},
    }
    return PreparedData(split(n_train), split(n_val), split(n_test), meta)


@pytest.fixture
def toy_data() -> PreparedData:
    return make_prepared()
