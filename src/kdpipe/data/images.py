"""Image tensor helpers shared by the sources (never used inside the training loop)."""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

T = TypeVar("T")
R = TypeVar("R")


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


def map_in_order(fn: Callable[[T], R], items: Iterable[T], window: int, workers: int | None = None) -> Iterator[R]:
    """``fn(item)`` for every item, in order, computed by a pool of threads (PIL releases the GIL
    while decoding, so decoding runs on every core); at most ``window`` results wait in memory
    at any time, however many items there are. An error is raised at its item; after it (or
    when the caller stops early) nothing more is computed."""
    pool = ThreadPoolExecutor(max_workers=workers or max(1, min(8, os.cpu_count() or 1)))
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(1, window):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(cancel_futures=True)


# --- image files of any kind (the imagefolder and csv sources) -----------------------------

# The decoders a user's file may reach: the common photo formats. Restricting PIL to them keeps
# its rarely used parsers (EPS, PSD, ...) away from arbitrary files.
FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF")  # JPEG covers multi-picture (MPO) files
RESIZE_MODES = ("crop", "pad", "stretch")
_GREY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}  # more than 8 bits per pixel


class UnreadableImage(Exception):
    """A file that is not an image PIL can decode; ``str()`` says why, in a few words."""


def is_greyscale(image) -> bool:
    """Whether a PIL image holds no colour: a grey mode, or a palette of greys only."""
    if image.mode in _GREY_MODES:
        return True
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
    return False


def _to_8bit(image):
    """16-bit (and 32-bit) greyscale scaled to 0..255; PIL's own conversion clips at 255 instead."""
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    top = 255.0 if image.mode == "F" else 65535.0
    return Image.fromarray(np.rint(values.clip(0, top) * (255.0 / top)).astype(np.uint8), "L")


def _flatten(image, grey: bool):
    """``image`` as 8-bit L (``grey``) or RGB; transparent pixels become white, not whatever
    colour happens to be stored under them."""
    from PIL import Image

    if image.mode in _WIDE_MODES:
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("L" if grey else "RGB")


def fit_square(image, size: int, resize: str):
    """``image`` at size×size: ``crop`` scales the shorter side to ``size`` and cuts the centre,
    ``pad`` scales the longer side and adds black borders, ``stretch`` ignores the aspect ratio."""
    from PIL import Image, ImageOps

    bilinear = Image.Resampling.BILINEAR  # antialiased when shrinking, as in pil_to_chw
    if image.size == (size, size):
        return image
    if resize == "crop":
        return ImageOps.fit(image, (size, size), bilinear)
    if resize == "pad":
        return ImageOps.pad(image, (size, size), bilinear, color=0)
    return image.resize((size, size), bilinear)


def decode_image(data: bytes, size: int, resize: str) -> np.ndarray:
    """Decode an image file's bytes to uint8 C×size×size: C = 1 for a greyscale image, 3 otherwise.

    EXIF orientation is applied (phone photos), alpha is composited on white, 16-bit is scaled
    to 8 bits. Raises :class:`UnreadableImage` for anything that is not a decodable image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            image.draft(None, (size, size))  # JPEG: decode at a reduced scale that is still >= size
            image.load()  # decode now: a truncated or corrupt file fails here
            image = ImageOps.exif_transpose(image)
            grey = is_greyscale(image)
            image = fit_square(_flatten(image, grey), size, resize)
    except UnidentifiedImageError:
        raise UnreadableImage("not an image") from None
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, struct.error, ...) on bad files
        raise UnreadableImage(f"cannot be decoded: {type(exc).__name__}") from None
    array = np.asarray(image, dtype=np.uint8)
    return array[None].copy() if grey else array.transpose(2, 0, 1).copy()


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 N×C×H×W images as ``channels`` (1 or 3): greys repeated into RGB, or RGB to its
    luma with PIL's own integer weights (so a colour photo becomes what ``convert("L")`` gives)."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    out = images.new_empty((images.shape[0], 1, *images.shape[2:]))
    for start in range(0, images.shape[0], 1024):  # int32 sums of one channel at a time: ~3× a chunk's bytes
        chunk = images[start:start + 1024]
        luma = chunk[:, 0:1].to(torch.int32).mul_(19595)
        luma.add_(chunk[:, 1:2].to(torch.int32).mul_(38470)).add_(chunk[:, 2:3].to(torch.int32).mul_(7471))
        out[start:start + 1024] = luma.add_(0x8000).bitwise_right_shift_(16).to(torch.uint8)
    return out
