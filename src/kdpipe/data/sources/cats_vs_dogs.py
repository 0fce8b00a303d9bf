"""Cats vs Dogs (TensorFlow Datasets ``cats_vs_dogs``): 23,262 JPEGs of varying size, 2 classes.

Needs the optional extra: ``pip install -e '.[tfds]'`` (TensorFlow and TensorFlow Datasets,
imported only here, only when this source is used).

Raw layout: ``data/raw/cats_vs_dogs/`` *is* a TFDS data_dir, holding the prepared data set
(``cats_vs_dogs/<version>/*.tfrecord`` plus TFDS's metadata), so DVC versions exactly what
``tfds.load`` reads and ``prepare`` never needs the network. ``download`` either

- builds it there with TFDS (``download_and_prepare``; the ~800 MB source zip goes to TFDS's
  own download cache, ``$TFDS_DATA_DIR/downloads`` or ``~/tensorflow_datasets/downloads``,
  so it is neither cached twice by DVC nor downloaded again on a re-run), or
- copies it from ``data.cats_vs_dogs.data_dir``, an existing TFDS data_dir (built there
  first if it does not hold the data set yet) — the way to feed an offline machine.

``load`` reads the records with ``tfds.load``, decodes each JPEG with PIL (TFDS already
dropped the data set's 1,738 known-corrupt files; anything else unreadable is skipped and
counted) and resizes it to ``data.image_size`` (a plain resize: the whole animal stays in
the picture, the aspect ratio does not). There is no official test split: ``prepare``
carves one out.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from kdpipe.data.images import read_image
from kdpipe.data.sources import RawDataset, register
from kdpipe.data.store import ImageStore
from kdpipe.errors import KdpipeError
from kdpipe.validation import Settings, fail

DEFAULT_IMAGE_SIZE = 64


@dataclass(frozen=True)
class CatsVsDogsSettings(Settings):
    data_dir: Optional[str] = None  # a TFDS data_dir to copy cats_vs_dogs from (null: download and prepare it with TFDS)
    max_per_class: Optional[int] = None  # use at most this many images per class (null: all)

    def check(self, key: str) -> None:
        if self.max_per_class is not None and self.max_per_class <= 0:
            fail(f"{key}.max_per_class", self.max_per_class, "null or an integer > 0")
TFDS_NAME = "cats_vs_dogs"
MISSING_EXTRA = (
    "the cats_vs_dogs data set needs TensorFlow Datasets; install the optional extra with "
    "pip install -e '.[tfds]' (or make setup, which installs it)."
)


def tfds_module() -> Any:
    """``tensorflow_datasets``, imported on first use; one sentence when the extra is missing."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the logs
    try:
        import tensorflow  # noqa: F401  (TFDS imports it lazily; fail here, with the right message)
        import tensorflow_datasets as tfds
    except ImportError:
        raise KdpipeError(MISSING_EXTRA) from None
    return tfds


def default_download_dir() -> Path:
    """TFDS's own download cache (outside the project, shared by every TFDS user)."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser() / "downloads"


def _prepare_with_tfds(builder: Any, where: str) -> None:
    try:
        builder.download_and_prepare(download_dir=str(default_download_dir()))
    except Exception as exc:  # network, disk or TFDS errors: one sentence, not a traceback
        raise KdpipeError(
            f"TensorFlow Datasets could not download and prepare {TFDS_NAME} in {where} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); check the network "
            "connection, or set data.cats_vs_dogs.data_dir to a TFDS data_dir that already holds cats_vs_dogs."
        ) from None


def download(raw_dir: Path, settings: CatsVsDogsSettings) -> dict:
    if settings.data_dir and not Path(settings.data_dir).expanduser().is_dir():
        # a typo must not become a download target (minutes of retries into a new folder)
        raise KdpipeError(f"data.cats_vs_dogs.data_dir={settings.data_dir!r} is not a folder; point it at an existing "
                          "TFDS data_dir, or set it to null to download cats_vs_dogs with TFDS.")
    tfds = tfds_module()
    raw_dir.mkdir(parents=True, exist_ok=True)
    if settings.data_dir:
        source_dir = Path(settings.data_dir).expanduser()
        builder = tfds.builder(TFDS_NAME, data_dir=str(source_dir))
        if not builder.is_prepared():
            _prepare_with_tfds(builder, str(source_dir))
        version_dir = Path(builder.data_dir)  # <data_dir>/cats_vs_dogs/<version>
        target = raw_dir / TFDS_NAME / version_dir.name
        shutil.copytree(version_dir, target)
        origin = "data.cats_vs_dogs.data_dir"
    else:
        builder = tfds.builder(TFDS_NAME, data_dir=str(raw_dir))
        _prepare_with_tfds(builder, str(raw_dir))
        origin = "tfds"
    return {"origin": origin, "tfds_version": str(builder.version)}


def load(raw_dir: Path, settings: CatsVsDogsSettings, size: int, store: ImageStore | None = None) -> RawDataset:
    tfds = tfds_module()
    cap = settings.max_per_class
    try:
        builder = tfds.builder(TFDS_NAME, data_dir=str(raw_dir))
        class_names = list(builder.info.features["label"].names)
        total = builder.info.splits["train"].num_examples if builder.info.splits else None
        dataset = tfds.load(TFDS_NAME, split="train", data_dir=str(raw_dir), download=False, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as exc:  # AssertionError / DatasetNotFoundError when nothing was prepared there
        raise KdpipeError(
            f"{raw_dir} holds no prepared {TFDS_NAME} data set ({type(exc).__name__}); run the download stage "
            "first (dvc repro download)."
        ) from None
    counts = [0] * len(class_names)
    images, labels, skipped = (store or ImageStore()).writer((3, size, size)), [], 0
    for example in tqdm(tfds.as_numpy(dataset), total=total, desc="decoding Cats vs Dogs", unit="img",
                        mininterval=1.0):
        label = int(example["label"])
        if cap is not None and counts[label] >= cap:
            if min(counts) >= cap:
                break
            continue
        image = read_image(io.BytesIO(example["image"]), size)
        if image is None:
            skipped += 1
            continue
        images.append(image)
        labels.append(label)
        counts[label] += 1
    if skipped:
        print(f"skipped {skipped} unreadable image(s)")
    return RawDataset(
        train_images=images.finish(),
        train_labels=torch.tensor(labels, dtype=torch.int64),
        class_names=class_names,
        flip=True,  # a mirrored cat is still a cat
        skipped=skipped,
    )


register("cats_vs_dogs", CatsVsDogsSettings, download, load, DEFAULT_IMAGE_SIZE)
