"""Image tensor helpers shared by the sources (never used inside the training loop)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 N×C×H×W images to size×size (antialiased bilinear), keeping uint8."""
    if images.shape[-2:] == (size, size):
        return images
    out = []
    for chunk in images.split(1024):
        resized = F.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out.append(resized.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_empty((0, images.shape[1], size, size))


def pil_to_chw(image, size: int) -> np.ndarray:
    """A PIL image as uint8 3×size×size RGB (bilinear, antialiased when shrinking)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def read_image(path: str | Path | BinaryIO, size: int) -> np.ndarray | None:
    """Decode an image (a file, or a binary stream) to uint8 3×size×size RGB, or None when it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated or corrupt file fails here, not later
            return pil_to_chw(image, size)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None


def stack_chw(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Stack uint8 3×size×size arrays into an N×3×size×size tensor (N may be 0)."""
    if not images:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(images))
