"""The registry of data sources.

A source knows how to fetch its raw files into ``data/raw/<name>/`` (``download``) and how
to read them back as uint8 tensors at the configured image size (``load``). Everything
after that (splitting, statistics, the on-disk prepared format) is shared: see
:mod:`kdpipe.data.prepare`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch

from kdpipe.config import DataConfig
from kdpipe.errors import ConfigError


@dataclass
class RawDataset:
    """What a source hands to ``prepare``: uint8 N×C×H×W images and int64 labels.

    ``test_*`` is the source's official test split, or None when it has none (then
    ``prepare`` carves one out of ``train``). ``flip`` says whether a horizontal flip keeps
    an image's label (true for photos, false for digits).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    class_names: list[str]
    flip: bool
    test_images: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None
    skipped: int = 0


class Source(Protocol):
    """A data source module: ``download`` fetches raw files, ``load`` reads them back at
    ``cfg.image_size`` (``DEFAULT_IMAGE_SIZE`` when that is null)."""

    DEFAULT_IMAGE_SIZE: int

    def download(self, raw_dir: Path, cfg: DataConfig) -> dict: ...

    def load(self, raw_dir: Path, cfg: DataConfig) -> RawDataset: ...


# data.name -> module implementing Source. Modules are imported on use, so an optional
# dependency (TensorFlow, kaggle) only matters for the source that needs it.
SOURCES: dict[str, str] = {
    "digits": "kdpipe.data.digits",
    "cifar10": "kdpipe.data.cifar10",
    "intel": "kdpipe.data.intel",
    "cats_vs_dogs": "kdpipe.data.cats_vs_dogs",
}


def with_image_size(cfg: DataConfig, source: Source) -> DataConfig:
    """``cfg`` with ``image_size`` resolved: null means the source's default size."""
    return dataclasses.replace(cfg, image_size=cfg.image_size or source.DEFAULT_IMAGE_SIZE)


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ConfigError(
            f"params.yaml: data.name={name!r} is not allowed; expected one of "
            + ", ".join(SOURCES)
            + "."
        )
    return importlib.import_module(SOURCES[name])  # type: ignore[return-value]
