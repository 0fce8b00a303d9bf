"""Intel Image Classification (Kaggle ``puneet6060/intel-image-classification``): 6 scene
classes of 150×150 JPEGs.

``download`` gets the data set's zip from the Kaggle API (or takes ``data.intel.zip_path``,
an already-downloaded copy, on offline machines) and safely unpacks the labelled part of
Kaggle's layout into ``data/raw/intel/``::

    seg_train/seg_train/<class>/*.jpg   training images
    seg_test/seg_test/<class>/*.jpg     the official test split (kept as the test split)

The unlabelled ``seg_pred/`` folder is not unpacked. ``load`` decodes the JPEGs with PIL (in parallel threads, a
chunk at a time) and resizes them to ``data.image_size``; files that cannot be decoded are skipped and counted
(``skipped_images`` in ``metrics/data.json``).

Credentials (never logged): ``KAGGLE_API_TOKEN``, or ``KAGGLE_USERNAME`` + ``KAGGLE_KEY``,
or a token file in ``~/.kaggle/`` (``access_token`` or ``kaggle.json``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from kdpipe.data.archives import extract
from kdpipe.data.images import map_in_order, read_image
from kdpipe.data.sources import Images, RawDataset, register
from kdpipe.data.store import ImageStore, chunk_rows
from kdpipe.errors import KdpipeError
from kdpipe.validation import Settings, fail

DEFAULT_IMAGE_SIZE = 64


@dataclass(frozen=True)
class IntelSettings(Settings):
    kaggle_dataset: str = "puneet6060/intel-image-classification"
    zip_path: Optional[str] = None  # a local copy of the Kaggle zip, for offline machines (null: Kaggle API)
    max_per_class: Optional[int] = None  # use at most this many images per class and split (null: all)

    def check(self, key: str) -> None:
        if "/" not in self.kaggle_dataset:
            fail(f"{key}.kaggle_dataset", self.kaggle_dataset, "'owner/dataset'")
        if self.max_per_class is not None and self.max_per_class <= 0:
            fail(f"{key}.max_per_class", self.max_per_class, "null or an integer > 0")
SPLIT_DIRS = {"train": "seg_train", "test": "seg_test"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SECRET_ENV = ("KAGGLE_API_TOKEN", "KAGGLE_KEY")

MISSING_CREDENTIALS = (
    "Kaggle credentials not found; set KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY, or put your "
    "API token in ~/.kaggle/ (access_token or kaggle.json) — or set data.intel.zip_path to an "
    "already-downloaded copy of the data set's zip."
)


def _config_dirs() -> list[Path]:
    """Where the Kaggle client looks for credential files."""
    home = Path(os.path.expanduser("~"))
    dirs = [Path(p) for p in [os.environ.get("KAGGLE_CONFIG_DIR")] if p]
    dirs += [home / ".kaggle", Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"]
    return dirs


def credentials_source() -> str | None:
    """Which kind of Kaggle credentials is available (a name, never the secret), or None."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    for folder in _config_dirs():
        for name in ("access_token", "access_token.txt", "credentials.json"):
            if (folder / name).is_file() and (folder / name).stat().st_size > 0:
                return str(folder / name)
        config = folder / "kaggle.json"
        if config.is_file():
            try:
                values = json.loads(config.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(values, dict) and values.get("username") and values.get("key"):
                return str(config)
    return None


def scrub(text: str) -> str:
    """``text`` with any Kaggle secret from the environment replaced by ***."""
    for name in SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def kaggle_api() -> Any:
    """The authenticated Kaggle client; one sentence and no secret when that fails.

    ``kaggle`` is imported here, not at module level: importing it authenticates, and its
    ``authenticate()`` calls ``exit(1)`` when no credentials work.
    """
    if credentials_source() is None:
        raise KdpipeError(MISSING_CREDENTIALS)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the client prints a long help text on failure
            import kaggle

            api = kaggle.api
            api.authenticate()
    except ImportError:
        raise KdpipeError("the kaggle package is missing; install the project again (pip install -e .).") from None
    except SystemExit:
        raise KdpipeError(MISSING_CREDENTIALS.replace("not found", "were rejected", 1)) from None
    except Exception as exc:  # network or server errors while checking a token
        raise KdpipeError(
            f"could not authenticate with Kaggle ({type(exc).__name__}: {scrub(str(exc))[:200]}); check the network "
            "connection and your credentials, or set data.intel.zip_path to an already-downloaded zip."
        ) from None
    return api


def fetch_from_kaggle(api: Any, dataset: str, dest: Path) -> Path:
    """The one call to the Kaggle service: download ``dataset``'s zip into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    api.dataset_download_files(dataset, path=str(dest), unzip=False, quiet=False)
    return dest / (dataset.split("/")[-1] + ".zip")


def _download_with_kaggle(dataset: str, dest: Path) -> Path:
    api = kaggle_api()
    try:
        archive = fetch_from_kaggle(api, dataset, dest)
    except (SystemExit, Exception) as exc:
        if isinstance(exc, KdpipeError):
            raise
        raise KdpipeError(
            f"the Kaggle download of {dataset} failed ({type(exc).__name__}: {scrub(str(exc))[:200]}); check the "
            "network connection and data.intel.kaggle_dataset, or set data.intel.zip_path to an "
            "already-downloaded zip."
        ) from None
    if not archive.is_file():
        raise KdpipeError(f"the Kaggle client did not produce {archive.name}; check data.intel.kaggle_dataset.")
    return archive


def split_root(raw_dir: Path, split: str) -> Path:
    """``seg_train/seg_train`` in Kaggle's layout (a single ``seg_train/`` is accepted too)."""
    outer = raw_dir / SPLIT_DIRS[split]
    inner = outer / SPLIT_DIRS[split]
    return inner if inner.is_dir() else outer


def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def download(raw_dir: Path, settings: IntelSettings) -> dict:
    raw_dir.mkdir(parents=True, exist_ok=True)
    if settings.zip_path:
        archive = Path(settings.zip_path).expanduser()
        if not archive.is_file():
            raise KdpipeError(
                f"data.intel.zip_path={settings.zip_path!r} does not exist; point it at the data set's zip "
                "or set it to null to download from Kaggle."
            )
        origin = "data.intel.zip_path"
    else:
        archive = _download_with_kaggle(settings.kaggle_dataset, raw_dir / ".kaggle-download")
        origin = f"kaggle:{settings.kaggle_dataset}"
    unpacked = extract(archive, raw_dir / ".unpacked", include=lambda name: name.split("/")[0] in SPLIT_DIRS.values(),
                       desc="unpacking Intel images")
    for folder in SPLIT_DIRS.values():
        if (unpacked / folder).is_dir():
            (unpacked / folder).rename(raw_dir / folder)
    shutil.rmtree(unpacked)
    shutil.rmtree(raw_dir / ".kaggle-download", ignore_errors=True)
    classes = {split: _class_dirs(split_root(raw_dir, split)) for split in SPLIT_DIRS}
    if len(classes["train"]) < 2 or not classes["test"]:
        raise KdpipeError(
            f"{archive.name} is not in the Intel Image Classification layout (seg_train/seg_train/<class>/, "
            "seg_test/seg_test/<class>/); check data.intel.kaggle_dataset or data.intel.zip_path."
        )
    return {"origin": origin, "classes": classes["train"]}


def _image_files(folder: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit] if limit else files


def load(raw_dir: Path, settings: IntelSettings, size: int, store: ImageStore | None = None) -> RawDataset:
    roots = {split: split_root(raw_dir, split) for split in SPLIT_DIRS}
    class_names = _class_dirs(roots["train"])
    if not class_names:
        raise KdpipeError(f"{roots['train']} has no class folders; run the download stage first (dvc repro download).")
    unknown = sorted(set(_class_dirs(roots["test"])) - set(class_names))
    if unknown:
        raise KdpipeError(f"{roots['test']} has classes {unknown} that the training split lacks; check the download.")
    store = store or ImageStore()
    skipped = 0
    tensors: dict[str, tuple[Images, torch.Tensor]] = {}
    for split, root in roots.items():
        files = [(label, path) for label, name in enumerate(class_names) if (root / name).is_dir()
                 for path in _image_files(root / name, settings.max_per_class)]
        images, labels = store.writer((3, size, size)), []
        decoded = map_in_order(lambda file: read_image(file[1], size), files, chunk_rows((3, size, size)))
        for (label, _), image in zip(files, tqdm(decoded, total=len(files), desc=f"decoding Intel {split}",
                                                 unit="img", mininterval=1.0)):
            if image is None:
                skipped += 1
                continue
            images.append(image)
            labels.append(label)
        tensors[split] = (images.finish(), torch.tensor(labels, dtype=torch.int64))
    if skipped:
        print(f"skipped {skipped} unreadable image(s)")
    return RawDataset(
        train_images=tensors["train"][0],
        train_labels=tensors["train"][1],
        class_names=class_names,
        flip=True,  # a mirrored street is still a street
        test_images=tensors["test"][0],
        test_labels=tensors["test"][1],
        skipped=skipped,
    )


register("intel", IntelSettings, download, load, DEFAULT_IMAGE_SIZE)
