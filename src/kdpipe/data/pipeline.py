"""The download and prepare stages over the source registry."""

from __future__ import annotations

import shutil
from typing import Any

from kdpipe import paths
from kdpipe.config import Params
from kdpipe.data.prepare import SPLITS, class_counts, save_prepared, split_dataset
from kdpipe.data.sources import SOURCES, image_size
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


def prepare(params: Params) -> dict[str, Any]:
    """Read the raw data, split it and write data/prepared/ plus metrics/data.json."""
    source = SOURCES.get(params.data.name).factory
    raw = source.load(raw_dir(params), params.data.source, image_size(params.data, source))
    splits = split_dataset(raw, params.data.val_fraction, params.data.test_fraction, params.seed)
    meta = save_prepared(paths.PREPARED_DIR, splits, raw, params.data.name)
    summary = {
        "dataset": params.data.name,
        "classes": len(raw.class_names),
        "image_shape": [meta["channels"], meta["image_size"], meta["image_size"]],
        "skipped_images": raw.skipped,
        **{f"{name}_images": len(splits[name]) for name in SPLITS},
        "per_class": {name: class_counts(splits[name].labels, raw.class_names) for name in SPLITS},
    }
    write_json(paths.METRICS_DIR / "data.json", summary)
    print(f"prepared {params.data.name}: " + ", ".join(f"{n} {len(splits[n])}" for n in SPLITS)
          + f" images of {meta['channels']}×{meta['image_size']}×{meta['image_size']}")
    return summary
