"""CIFAR-10: 60,000 32×32 colour images of 10 classes, from the official python archive.

``download`` fetches ``data.cifar10.url`` (http(s)://, file:// or a local path) to a
temporary file, checks ``data.cifar10.md5`` and only then unpacks the archive (safely) into
``data/raw/cifar10/cifar-10-batches-py/``; the verified archive itself is not kept (DVC
would cache the same bytes twice). A ``checksums.json`` written next to it records the md5
of every unpacked file.

``load`` re-checks each pickled batch against that record before reading it, and reads it
with a restricted unpickler that can only rebuild numpy arrays: a pickle never gets to run
arbitrary code, even if someone swapped a file in ``data/raw/``. The official test batch
stays the test split.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kdpipe.data.archives import extract
from kdpipe.data.fetch import download_file
from kdpipe.data.images import resize_uint8
from kdpipe.data.sources import RawDataset, register
from kdpipe.data.store import ImageStore
from kdpipe.errors import KdpipeError
from kdpipe.validation import Settings, fail
from kdpipe.io import file_digest, read_json, write_json

DEFAULT_IMAGE_SIZE = 32


@dataclass(frozen=True)
class Cifar10Settings(Settings):
    url: str = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # or file:// or a local path
    md5: str = "c58f30108f718f92721af3b95e74349a"

    def check(self, key: str) -> None:
        scheme = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        if not self.url.strip() or scheme not in ("", "http", "https", "file"):
            fail(f"{key}.url", self.url, "an http(s):// or file:// URL or a local path")
        if len(self.md5) != 32 or any(c not in "0123456789abcdef" for c in self.md5.lower()):
            fail(f"{key}.md5", self.md5, "a 32-character hexadecimal md5")
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
MANIFEST = "checksums.json"
META = "batches.meta"
TEST_BATCH = "test_batch"
TRAIN_PREFIX = "data_batch_"
SIDE = 32

# Everything a CIFAR-10 batch pickle needs: numpy array reconstruction (old and new module
# paths) and the bytes helper that protocol-2 pickles written by Python 3 use.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")
        if module == "numpy.core.multiarray":  # numpy>=2 moved it; avoid the deprecated alias
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def restricted_loads(data: bytes) -> Any:
    # latin1 turns Python 2 strings into str and keeps numpy's raw buffers intact
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _batch_names(folder: Path) -> list[str]:
    train = sorted(p.name for p in folder.glob(TRAIN_PREFIX + "*"))
    missing = [n for n in (META, TEST_BATCH) if not (folder / n).is_file()]
    if not train or missing:
        raise KdpipeError(
            f"{folder} lacks {', '.join(missing) or 'data_batch_* files'}; the archive is not the CIFAR-10 python "
            "version (cifar-10-python.tar.gz) — check data.cifar10.url."
        )
    return [META, *train, TEST_BATCH]


def download(raw_dir: Path, settings: Cifar10Settings) -> dict:
    raw_dir.mkdir(parents=True, exist_ok=True)
    archive = download_file(settings.url, raw_dir / ARCHIVE, settings.md5, "data.cifar10", desc="CIFAR-10")
    # Only a complete archive whose md5 matched gets here.
    unpacked = extract(archive, raw_dir / ".unpacked", include=lambda name: name.split("/")[0] == FOLDER,
                       desc="unpacking CIFAR-10")
    if not (unpacked / FOLDER).is_dir():
        raise KdpipeError(f"the archive has no {FOLDER}/ folder; it is not cifar-10-python.tar.gz — check data.cifar10.url.")
    (unpacked / FOLDER).rename(raw_dir / FOLDER)
    shutil.rmtree(unpacked)
    archive.unlink()
    names = _batch_names(raw_dir / FOLDER)
    write_json(raw_dir / MANIFEST, {
        "archive_md5": settings.md5.lower(),
        "files": {name: file_digest(raw_dir / FOLDER / name, "md5") for name in names},
    })
    return {"archive_md5": settings.md5.lower(), "batches": names}


def _read_pickle(folder: Path, name: str, expected_md5: str | None) -> Any:
    path = folder / name
    data = path.read_bytes()
    if expected_md5 is None or hashlib.md5(data, usedforsecurity=False).hexdigest() != expected_md5:
        raise KdpipeError(
            f"{path} is not the file that was downloaded and verified; run the download stage again "
            "(dvc repro -f download)."
        )
    try:
        return restricted_loads(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise KdpipeError(f"{path} is not a readable CIFAR-10 batch ({exc}); check data.cifar10.url.") from None


def _field(batch: Any, key: str, path: Path) -> Any:
    if not isinstance(batch, dict) or key not in batch:
        raise KdpipeError(f"{path} has no '{key}' entry; it is not a CIFAR-10 batch — check data.cifar10.url.")
    return batch[key]


def _to_tensors(batch: Any, path: Path, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = _field(batch, "data", path)
    labels = np.asarray(_field(batch, "labels", path))
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3 * SIDE * SIDE or labels.shape != (data.shape[0],)
            or not np.issubdtype(labels.dtype, np.integer) or (labels.size and not 0 <= labels.min() <= labels.max() < classes)):
        raise KdpipeError(f"{path} does not hold uint8 N×3072 images with labels 0..{classes - 1}; check data.cifar10.url.")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, SIDE, SIDE))
    return images, torch.from_numpy(labels.astype(np.int64))


def load(raw_dir: Path, settings: Cifar10Settings, size: int, store: ImageStore | None = None) -> RawDataset:
    folder = raw_dir / FOLDER
    if not (raw_dir / MANIFEST).is_file():
        raise KdpipeError(f"{raw_dir / MANIFEST} not found; run the download stage first (dvc repro download).")
    checksums = read_json(raw_dir / MANIFEST)["files"]
    names = _batch_names(folder)
    meta = _read_pickle(folder, META, checksums.get(META))
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(meta, "label_names", folder / META)]
    store = store or ImageStore()
    train, test = store.writer((3, size, size)), store.writer((3, size, size))
    train_labels, test_labels = [], []
    for name in tqdm(names[1:], desc="reading CIFAR-10 batches", unit="batch"):  # one batch (10,000 images) at a time
        images, labels = _to_tensors(_read_pickle(folder, name, checksums.get(name)), folder / name, len(class_names))
        (test if name == TEST_BATCH else train).append(resize_uint8(images, size).numpy())
        (test_labels if name == TEST_BATCH else train_labels).append(labels)
    return RawDataset(
        train_images=train.finish(),
        train_labels=torch.cat(train_labels),
        class_names=class_names,
        flip=True,  # a mirrored car is still a car
        test_images=test.finish(),
        test_labels=torch.cat(test_labels),
    )


register("cifar10", Cifar10Settings, download, load, DEFAULT_IMAGE_SIZE)
