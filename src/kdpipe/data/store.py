"""The image store: uint8 N×C×H×W images on disk, written and read a chunk at a time, so that
neither ``prepare`` nor training holds a whole data set in memory.

``prepare``: a source decodes its images, a chunk at a time, through an :class:`ImageWriter` into
a scratch file (:class:`ImageStore`); the splits are selected from it lazily (:class:`ImageRows`)
and copied out, a chunk at a time, into ``data/prepared/<split>_images.npy``. Every byte goes
through plain file reads and writes: it passes the page cache, never the process's own memory
more than a chunk (:data:`CHUNK_BYTES`) at a time.

Training: :func:`open_images` maps a split's ``.npy`` read-only (``mmap_mode="r"``); the loader
gathers each batch from the mapped pages, which the kernel keeps cached while memory allows and
drops (to read again) when it does not, so a data set larger than RAM still trains.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import numpy as np
import torch

from kdpipe.errors import KdpipeError
from kdpipe.io import restore_hint

# The most image bytes prepare holds at once per step (decoded images waiting to be written,
# a block read back, a block written). A module constant, not a parameter: it changes how much
# memory prepare takes, never what it writes.
CHUNK_BYTES = 8 << 20
NPY_HEADER = {"descr": "|u1", "fortran_order": False}


def chunk_rows(chw: tuple[int, ...]) -> int:
    """How many images of shape ``chw`` (C, H, W) make one chunk (at least one)."""
    return max(1, CHUNK_BYTES // max(1, int(np.prod(chw))))


class ImageRows:
    """uint8 N×C×H×W images that stay where they are (a file of rows, or an array) until read,
    a chunk at a time: ``take`` selects rows and ``to_channels`` converts channels, both lazily.

    ``source`` is a file holding ``count`` rows of C×H×W bytes after ``offset`` header bytes,
    or an array of shape N×C×H×W."""

    def __init__(self, source: Path | np.ndarray, chw: tuple[int, int, int], count: int, offset: int = 0,
                 index: np.ndarray | None = None, channels: int | None = None):
        self.source, self.chw, self.count, self.offset = source, tuple(int(v) for v in chw), int(count), int(offset)
        self.index = index  # positions in the source, in the order read (None: all, in order)
        self.channels = channels  # converted to this many channels when read (None: as stored)

    @classmethod
    def of(cls, images: Union[torch.Tensor, np.ndarray, "ImageRows"]) -> "ImageRows":
        """``images`` as ImageRows (an in-memory tensor or array is read without a copy)."""
        if isinstance(images, ImageRows):
            return images
        array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.dtype != np.uint8 or array.ndim != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {array.dtype} {tuple(array.shape)}")
        return cls(array, array.shape[1:], len(array))

    def __len__(self) -> int:
        return self.count if self.index is None else len(self.index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        c, h, w = self.chw
        return (len(self), self.channels or c, h, w)

    def _replace(self, index: np.ndarray | None, channels: int | None) -> "ImageRows":
        return ImageRows(self.source, self.chw, self.count, self.offset, index, channels)

    def take(self, index: torch.Tensor | np.ndarray) -> "ImageRows":
        """The rows at ``index`` (positions in these rows), in that order."""
        index = np.asarray(index.numpy() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} images")
        return self._replace(index if self.index is None else self.index[index], self.channels)

    def to_channels(self, channels: int | None) -> "ImageRows":
        """These images read as ``channels`` channels (see :func:`kdpipe.data.images.to_channels`)."""
        if channels is None or channels == self.shape[1]:
            return self
        return self._replace(self.index, channels)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` as a new uint8 array (converted, if asked)."""
        from kdpipe.data.images import to_channels

        stop = len(self) if stop is None else min(stop, len(self))
        start = max(0, min(start, stop))
        positions = np.arange(start, stop, dtype=np.int64) if self.index is None else self.index[start:stop]
        if isinstance(self.source, np.ndarray):
            block = self.source[positions]
        else:
            block = _read_rows(self.source, self.offset, self.chw, positions)
        if self.channels is not None and self.channels != block.shape[1]:
            block = to_channels(torch.from_numpy(block), self.channels).numpy()
        return block

    def chunks(self) -> Iterator[np.ndarray]:
        """Every image, in order, a chunk at a time."""
        step = chunk_rows(self.shape[1:])
        for start in range(0, len(self), step):
            yield self.read(start, start + step)

    def tensor(self) -> torch.Tensor:
        """All of them in memory, as one tensor (for small data and tests)."""
        return torch.from_numpy(self.read())


def _read_rows(path: Path, offset: int, chw: tuple[int, int, int], positions: np.ndarray) -> np.ndarray:
    """Rows ``positions`` of a file of C×H×W-byte rows, read run by run (consecutive rows at once)."""
    row = int(np.prod(chw))
    out = np.empty((len(positions), *chw), dtype=np.uint8)
    if not len(positions):
        return out
    flat = out.reshape(len(positions), row)
    starts = np.flatnonzero(np.diff(positions, prepend=positions[0] - 2) != 1)  # where a run begins
    ends = np.append(starts[1:], len(positions))
    with open(path, "rb", buffering=0) as fh:
        for a, b in zip(starts.tolist(), ends.tolist()):
            fh.seek(offset + int(positions[a]) * row)
            view, done = memoryview(flat[a:b]).cast("B"), 0
            while done < len(view):
                got = fh.readinto(view[done:])
                if not got:
                    raise KdpipeError(f"{path} ended early: it holds fewer images than it should.")
                done += got
    return out


class ImageWriter:
    """Appends uint8 C×H×W images, one at a time or in blocks, to a file (or to memory);
    :meth:`finish` gives them back as :class:`ImageRows` (from a file) or a tensor (from memory)."""

    def __init__(self, path: Path | None, chw: tuple[int, int, int]):
        self.path, self.chw, self.count = path, tuple(int(v) for v in chw), 0
        self._blocks: list[np.ndarray] = []
        self._file = open(path, "wb") if path is not None else None

    def append(self, images: np.ndarray) -> None:
        """Add one C×H×W image or a block of k×C×H×W images (a 1-channel image fills every channel)."""
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim == 3:
            images = images[None]
        if images.shape[2:] != self.chw[1:] or images.shape[1] not in (1, self.chw[0]):
            raise ValueError(f"expected images of {self.chw}, got {images.shape[1:]}")
        images = np.ascontiguousarray(np.broadcast_to(images, (len(images), *self.chw)))
        if self._file is not None:
            self._file.write(memoryview(images).cast("B"))
        else:
            self._blocks.append(images)
        self.count += len(images)

    def finish(self) -> Union[ImageRows, torch.Tensor]:
        if self._file is None:
            empty = np.empty((0, *self.chw), dtype=np.uint8)
            return torch.from_numpy(np.concatenate(self._blocks) if self._blocks else empty)
        self._file.close()
        return ImageRows(self.path, self.chw, self.count)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class ImageStore:
    """Where a source puts the images it decodes: files in ``folder`` (the prepare stage's scratch
    folder, so the data set never has to fit in memory), or memory when ``folder`` is None (a
    source called on its own, as in the tests: it then returns tensors, as it always did)."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self._made = 0

    def writer(self, chw: tuple[int, int, int]) -> ImageWriter:
        path = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._made += 1
            path = self.folder / f"images-{self._made}.bin"
        return ImageWriter(path, chw)


def take(images: Union[torch.Tensor, ImageRows], index: torch.Tensor) -> Union[torch.Tensor, ImageRows]:
    """The images at ``index``: a tensor's are gathered now, ImageRows' only when read."""
    return images.take(index) if isinstance(images, ImageRows) else images[index]


def with_channels(images: Union[torch.Tensor, ImageRows], channels: int) -> Union[torch.Tensor, ImageRows]:
    """The images as ``channels`` channels: a tensor converted now, ImageRows when read."""
    from kdpipe.data.images import to_channels

    return images.to_channels(channels) if isinstance(images, ImageRows) else to_channels(images, channels)


# --- the .npy files of data/prepared -------------------------------------------------------------

def write_npy(path: Path, images: Union[torch.Tensor, ImageRows], on_chunk=None) -> None:
    """Write uint8 N×C×H×W ``images`` as a ``.npy`` file, a chunk at a time (the same bytes
    ``np.save`` writes); ``on_chunk(block)`` sees every block on its way (e.g. statistics)."""
    rows = ImageRows.of(images)
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {**NPY_HEADER, "shape": rows.shape})
        for block in rows.chunks():
            if on_chunk is not None:
                on_chunk(block)
            fh.write(memoryview(np.ascontiguousarray(block)).cast("B"))


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of a C-ordered ``.npy`` file; ValueError when it is not one."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if fortran:
            raise ValueError("Fortran-ordered array")
        return tuple(shape), dtype, fh.tell()


def open_images(path: Path, rebuild: str) -> torch.Tensor:
    """A prepared split's images as a tensor over the file, mapped read-only: nothing is read
    until used, and what is read stays in the page cache, not in the process's memory.

    The mapping cannot be written: torch warns about that once (it has no read-only tensors);
    that warning is silenced here because nothing writes into prepared images — a batch is
    always a gathered copy (:mod:`kdpipe.data.loader`)."""
    if not path.is_file():
        raise KdpipeError(f"{path} not found; {rebuild}.")
    try:
        shape, dtype, offset = read_npy_header(path)
    except (ValueError, OSError, SyntaxError) as exc:
        raise KdpipeError(f"{path} is not a .npy file of images ({str(exc).splitlines()[0][:120]}); {rebuild}.") from None
    if dtype != np.uint8 or len(shape) != 4:
        raise KdpipeError(f"{path} is not a prepared split (uint8 N×C×H×W images, found {dtype} {shape}); {rebuild}.")
    expected = offset + int(np.prod(shape))
    if os.path.getsize(path) != expected:
        raise KdpipeError(f"{path} is truncated or corrupt ({os.path.getsize(path)} bytes, expected {expected}); "
                          f"{rebuild}, or {restore_hint(path.parent)}.")
    if not int(np.prod(shape)):
        return torch.empty(shape, dtype=torch.uint8)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(mapped)
