"""The download and prepare stages over the source registry."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kdpipe import paths
from kdpipe.config import Params
from kdpipe.data import store
from kdpipe.data.prepare import SPLITS, class_counts, save_prepared, split_dataset
from kdpipe.data.sources import SOURCES, RawDataset, image_size
from kdpipe.io import write_json


def raw_dir(params: Params):
    return paths.RAW_DIR / params.data.name


def download(params: Params) -> dict[str, Any]:
    """Fetch the configured data set into data/raw/<name>/ (replacing what was there)."""
    source = SOURCES.get(params.data.name).factory
    target = raw_dir(params)
    if target.exists():
        shutil.rmtree(target)
    try:
        info = source.download(target, params.data.source)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # nothing that looks complete is left behind
        raise
    print(f"downloaded {params.data.name} into {target}: {info}")
    return info


def data_source(params: Params) -> dict[str, Any]:
    """What check_params writes to data/data_source.json: the data set's name and, for a source
    that reads the user's own files, their fingerprint, so that a changed folder re-runs download."""
    from kdpipe.data.imagefiles import fingerprint

    source = SOURCES.get(params.data.name).factory
    info: dict[str, Any] = {"name": params.data.name}
    if source.local_input is not None:
        info["input"] = fingerprint(source.local_input(params.data.source), f"data.{params.data.name}.path")
    return info


def with_channels(raw: RawDataset, channels: int | None) -> RawDataset:
    """``raw`` with every split converted to ``data.channels`` (null: as the source gives it);
    images still in the store are converted a chunk at a time, as they are written out."""
    if channels is None:
        return raw
    convert = {name: store.with_channels(getattr(raw, name), channels)
               for name in ("train_images", "val_images", "test_images") if getattr(raw, name) is not None}
    return dataclasses.replace(raw, **convert)


def prepare(params: Params) -> dict[str, Any]:
    """Read the raw data, split it and write data/prepared/ plus metrics/data.json.

    The source decodes into a scratch image store next to data/prepared/ (removed at the end,
    whatever happens); the splits are copied out of it a chunk at a time, so memory stays
    bounded whatever the size of the data set."""
    source = SOURCES.get(params.data.name).factory
    paths.PREPARED_DIR.parent.mkdir(parents=True, exist_ok=True)
    # named like every temporary output (.*.tmp): a killed stage's scratch is found and removed
    with tempfile.TemporaryDirectory(prefix=".prepare.", suffix=".tmp", dir=paths.PREPARED_DIR.parent) as scratch:
        raw = source.read(raw_dir(params), params.data.source, image_size(params.data, source),
                          store.ImageStore(Path(scratch)))
        raw = with_channels(raw, params.data.channels)
        splits = split_dataset(raw, params.data.val_fraction, params.data.test_fraction, params.seed)
        meta = save_prepared(paths.PREPARED_DIR, splits, raw, params.data.name)
    summary = {
        "dataset": params.data.name,
        "classes": len(raw.class_names),
        "image_shape": [meta["channels"], meta["image_size"], meta["image_size"]],
        "skipped_images": raw.skipped,
        "skipped_examples": raw.skipped_examples,  # the first few, with the reason
        **{f"{name}_images": len(splits[name]) for name in SPLITS},
        "per_class": {name: class_counts(splits[name].labels, raw.class_names) for name in SPLITS},
    }
    write_json(paths.METRICS_DIR / "data.json", summary)
    print(f"prepared {params.data.name}: " + ", ".join(f"{n} {len(splits[n])}" for n in SPLITS)
          + f" images of {meta['channels']}×{meta['image_size']}×{meta['image_size']}")
    return summary
