"""scikit-learn's bundled digits: 1,797 greyscale 8×8 images of 0-9, no network needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdpipe.data.images import resize_uint8
from kdpipe.data.sources import RawDataset, register
from kdpipe.plugins import NoSettings

DEFAULT_IMAGE_SIZE = 8
RAW_FILE = "digits.npz"


def download(raw_dir: Path, settings: NoSettings) -> dict:
    """Copy the data set out of scikit-learn into ``raw_dir`` as uint8 1×8×8 images."""
    from sklearn.datasets import load_digits

    from kdpipe.io import atomic_path

    bunch = load_digits()
    # Pixel values are 0..16; scale to the 0..255 range every other source uses.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    raw_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(raw_dir / RAW_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=images, labels=labels, class_names=np.array([str(c) for c in bunch.target_names]))
    return {"source": "sklearn.datasets.load_digits", "images": int(len(labels))}


def load(raw_dir: Path, settings: NoSettings, size: int) -> RawDataset:
    with np.load(raw_dir / RAW_FILE, allow_pickle=False) as raw:
        images = torch.from_numpy(raw["images"])
        labels = torch.from_numpy(raw["labels"])
        class_names = [str(c) for c in raw["class_names"]]
    return RawDataset(
        train_images=resize_uint8(images, size),
        train_labels=labels,
        class_names=class_names,
        flip=False,  # a mirrored 2 or 5 is not a digit
    )


register("digits", NoSettings, download, load, DEFAULT_IMAGE_SIZE)  # no settings: data.digits is {}
