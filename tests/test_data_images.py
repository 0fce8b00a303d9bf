"""Image tensor helpers (kdpipe.data.images): resizing uint8 batches like PIL's bilinear."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe.data.images import resize_uint8


def pil_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    out = []
    for img in images:
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        res = np.array(pil.resize((size, size), Image.BILINEAR))
        out.append(torch.from_numpy(res.reshape(size, size, -1)).permute(2, 0, 1))
    return torch.stack(out)


@pytest.mark.parametrize(("channels", "size"), [(1, 4), (1, 5), (3, 16), (3, 13)])
def test_resize_uint8_matches_pil_bilinear(channels, size):
    gen = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (5, channels, 8, 8), generator=gen, dtype=torch.uint8)
    out = resize_uint8(images, size)
    assert out.dtype == torch.uint8 and out.shape == (5, channels, size, size)
    assert (out.int() - pil_resize(images, size).int()).abs().max() <= 1


def test_resize_uint8_identity_constant_and_empty():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert resize_uint8(images, 8) is images
    flat = torch.full((2, 1, 8, 8), 200, dtype=torch.uint8)
    assert torch.equal(resize_uint8(flat, 4), torch.full((2, 1, 4, 4), 200, dtype=torch.uint8))
    assert torch.equal(resize_uint8(flat, 20), torch.full((2, 1, 20, 20), 200, dtype=torch.uint8))
    empty = resize_uint8(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), 4)
    assert empty.shape == (0, 3, 4, 4) and empty.dtype == torch.uint8
