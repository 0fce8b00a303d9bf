"""Tiny data sets in the real on-disk formats, made by the tests (never downloaded):
a CIFAR-10 python archive, Kaggle's Intel zip, the Cats vs Dogs source zip and a TFDS
data_dir built from it, plus a local HTTP server to serve them and a fixture that hides
any Kaggle credentials (import it by name into the test module that uses it)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
INTEL_CLASSES = ["buildings", "forest", "glacier", "mountain", "sea", "street"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _class_images(labels: np.ndarray, side: int, channels: int, seed: int) -> np.ndarray:
    """uint8 N×H×W×C images whose mean colour depends on the class (so they are learnable)."""
    rng = np.random.default_rng(seed)
    base = (labels[:, None] * 97 + np.arange(channels)[None, :] * 53) % 200 + 20
    noise = rng.integers(0, 40, (len(labels), side, side, channels))
    return (base[:, None, None, :] + noise).clip(0, 255).astype(np.uint8)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as it ships: float 0..16 images (N×8×8) and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


# --- CIFAR-10 -------------------------------------------------------------------------

def cifar_batch(n: int, seed: int) -> bytes:
    labels = np.arange(n) % 10
    images = _class_images(labels, 32, 3, seed)  # N×32×32×3
    data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # CIFAR rows: 1024 R, 1024 G, 1024 B
    batch = {"batch_label": f"batch {seed}", "labels": labels.tolist(), "data": data,
             "filenames": [f"img_{seed}_{i}.png" for i in range(n)]}
    return pickle.dumps(batch, protocol=2)


def cifar_members(per_batch: int = 20, train_batches: int = 2) -> dict[str, bytes]:
    folder = "cifar-10-batches-py"
    members = {f"{folder}/batches.meta": pickle.dumps(
        {"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, protocol=2)}
    for i in range(1, train_batches + 1):
        members[f"{folder}/data_batch_{i}"] = cifar_batch(per_batch, seed=i)
    members[f"{folder}/test_batch"] = cifar_batch(per_batch, seed=99)
    return members


def write_tar(path: Path, members: dict[str, bytes], links: dict[str, tuple[str, bytes]] | None = None) -> Path:
    """A .tar.gz of ``members``; ``links`` maps a member name to (tar type, link target)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target.decode() if isinstance(target, bytes) else target
            tf.addfile(info)
    return path


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_cifar_archive(path: Path, per_batch: int = 20, train_batches: int = 2) -> Path:
    return write_tar(path, cifar_members(per_batch, train_batches))


# --- JPEG folders (Intel, Cats vs Dogs) --------------------------------------------------

def jpeg(label: int, seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    image = _class_images(np.array([label]), max(size), 3, seed)[0][: size[1], : size[0]]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


CORRUPT_JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 40  # a JPEG header and then nothing


def make_intel_zip(path: Path, per_class_train: int = 6, per_class_test: int = 2, corrupt: int = 1) -> Path:
    """Kaggle's layout: seg_train/seg_train/<class>/, seg_test/seg_test/<class>/, seg_pred/seg_pred/."""
    members: dict[str, bytes] = {}
    for label, name in enumerate(INTEL_CLASSES):
        for i in range(per_class_train):
            members[f"seg_train/seg_train/{name}/{label * 1000 + i}.jpg"] = jpeg(label, i, (30, 30))
        for i in range(per_class_test):
            members[f"seg_test/seg_test/{name}/{label * 1000 + 500 + i}.jpg"] = jpeg(label, 500 + i, (30, 30))
    for i in range(corrupt):
        members[f"seg_train/seg_train/{INTEL_CLASSES[0]}/broken_{i}.jpg"] = CORRUPT_JPEG
    for i in range(3):
        members[f"seg_pred/seg_pred/{i}.jpg"] = jpeg(0, 900 + i, (30, 30))
    return write_zip(path, members)


KAGGLE_ENV = ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """An empty home and no Kaggle variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in KAGGLE_ENV:
        monkeypatch.delenv(name, raising=False)
    return home


def make_petimages_zip(path: Path, per_class: int = 8, corrupt: int = 1738) -> Path:
    """The layout of Microsoft's kagglecatsanddogs zip that TFDS's cats_vs_dogs builder reads.

    The builder skips files without a JFIF header and insists on exactly 1,738 of them
    (the count in the real archive), so the fixture carries that many 10-byte fakes.
    """
    members: dict[str, bytes] = {}
    for label, name in enumerate(("Cat", "Dog")):
        for i in range(per_class):
            members[f"PetImages/{name}/{i}.jpg"] = jpeg(label, i, (20 + i, 16 + label * 4))
    for i in range(corrupt):
        members[f"PetImages/Cat/{10_000 + i}.jpg"] = b"not a jpeg"
    return write_zip(path, members)


def build_tfds_cats_vs_dogs(data_dir: Path, petimages_zip: Path) -> Path:
    """A real TFDS data_dir made by TFDS's own cats_vs_dogs builder from ``petimages_zip``.

    Only the network fetch is replaced: the download manager hands the builder our zip
    instead of downloading Microsoft's; parsing, encoding and writing are TFDS's own.
    """
    from unittest import mock

    import tensorflow_datasets as tfds

    with mock.patch.object(tfds.download.DownloadManager, "download", lambda self, url: str(petimages_zip)):
        builder = tfds.builder("cats_vs_dogs", data_dir=str(data_dir))
        builder.download_and_prepare(download_dir=str(data_dir / "downloads"))
    assert builder.is_prepared()
    return data_dir


# --- a local HTTP server ----------------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- your own images: shapes in folders ------------------------------------------------------

SHAPES = ["circle", "square", "triangle"]


def shape_image(shape: str, seed: int, size: int = 32) -> Image.Image:
    """An RGB picture of one shape at a random place, size and colour on a random background."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (size, size), background)
    colour = tuple(int(255 - v) for v in background)  # always distinct from the background
    half = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(half, size - half, 2))
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return image


def make_shapes_folder(root: Path, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """``root/<shape>/NN.png``: a small learnable image folder (the shipped examples/shapes)."""
    for c, shape in enumerate(SHAPES):
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(shape, seed * 10_000 + c * 1000 + i, size).save(root / shape / f"{i:02d}.png", optimize=True)
    return root


def write_shapes_csv(path: Path, folder: Path) -> Path:
    """A CSV (path,label) listing every image of a shapes folder, relative to the CSV's folder."""
    rows = ["path,label"] + [f"{p.relative_to(path.parent).as_posix()},{p.parent.name}"
                             for p in sorted(folder.glob("*/*.png"))]
    path.write_text("\n".join(rows) + "\n")
    return path
