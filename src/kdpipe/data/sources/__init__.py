"""The registry of data sources: one module of this package per source.

A source knows how to fetch its raw files into ``data/raw/<name>/`` (``download``) and how
to read them back as uint8 images at the configured image size (``load``), writing them into
the :class:`~kdpipe.data.store.ImageStore` it is given a chunk at a time. Everything after that
(splitting, statistics, the on-disk prepared format) is shared: see :mod:`kdpipe.data.prepare`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from kdpipe.data.store import ImageRows
from kdpipe.plugins import Registry

# uint8 N×C×H×W images: a tensor in memory, or ImageRows in the prepare stage's scratch store
Images = Union[torch.Tensor, ImageRows]


@dataclass
class RawDataset:
    """What a source hands to ``prepare``: uint8 N×C×H×W images (tensors when the source was
    given no store, else :class:`~kdpipe.data.store.ImageRows` in the store) and int64 labels.

    ``test_*`` is the source's official test split, or None when it has none (then
    ``prepare`` carves one out of ``train``); ``val_*`` likewise for a given validation split.
    ``flip`` says whether a horizontal flip keeps an image's label (true for photos, false for
    digits). ``skipped`` counts the files left out; ``skipped_examples`` names the first few.
    """

    train_images: Images
    train_labels: torch.Tensor
    class_names: list[str]
    flip: bool
    test_images: Optional[Images] = None
    test_labels: Optional[torch.Tensor] = None
    skipped: int = 0
    val_images: Optional[Images] = None
    val_labels: Optional[torch.Tensor] = None
    skipped_examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """A data source: ``download(raw_dir, settings)`` fetches its raw files into ``raw_dir``;
    ``load(raw_dir, settings, image_size, store=None)`` reads them back as a :class:`RawDataset`
    at ``image_size`` (``default_image_size`` when ``data.image_size`` is null), writing the
    decoded images into ``store`` (:class:`~kdpipe.data.store.ImageStore`; None: in memory, as
    tensors) a chunk at a time, so that a data set larger than memory can be prepared (a
    source that leaves ``store`` out returns tensors: see :meth:`read`).

    ``local_input(settings)`` is set by sources that read the user's own files: the file or
    folder whose changes must re-run ``download`` (``check_params`` fingerprints it)."""

    download: Callable[[Path, Any], dict]
    load: Callable[..., RawDataset]
    default_image_size: int
    local_input: Optional[Callable[[Any], str]] = None

    def read(self, raw_dir: Path, settings: Any, size: int, store: Any) -> RawDataset:
        """``load``, given ``store`` when it takes one: a source whose images always fit in
        memory may leave the argument out and return tensors."""
        if "store" in inspect.signature(self.load).parameters:
            return self.load(raw_dir, settings, size, store=store)
        return self.load(raw_dir, settings, size)


# data.name -> Source. Each module of this package registers one source under its own name;
# optional dependencies (TensorFlow, kaggle) are imported inside the functions that need them.
SOURCES: Registry[Source] = Registry("data source", "data.name", "kdpipe.data.sources")


def register(name: str, settings: type, download: Callable, load: Callable, default_image_size: int,
             local_input: Optional[Callable[[Any], str]] = None) -> Source:
    """Register the calling module as source ``name`` with ``settings`` its ``data.<name>`` section."""
    source = Source(download, load, default_image_size, local_input)
    SOURCES.register(name, settings, source, module=download.__module__)
    return source


def image_size(data_cfg: Any, source: Source) -> int:
    """``data.image_size``, or the source's default size when it is null."""
    return int(data_cfg.image_size or source.default_image_size)
