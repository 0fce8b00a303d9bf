"""CIFAR-shaped data for the benchmarks: the shared CIFAR-10 mini archive when it is present
(md5-checked, then unpickled through a restricted unpickler), else generated images.

The archive is in the official ``cifar-10-python.tar.gz`` format: ``cifar-10-batches-py/``
with pickled ``data_batch_*`` and ``test_batch`` dicts (``data``: uint8 N×3072,
``labels``: list of ints) and ``batches.meta``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar-10-mini-python.tar.gz"
MINI_MD5 = "8e14025c9842c4ca1ee83a2a3f0cb121"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class _RestrictedUnpickler(pickle.Unpickler):
    """Only what a CIFAR batch holds: dicts, lists, bytes, str, ints and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _load_batch(raw: bytes) -> dict:
    """A batch dict with str keys (the official archive pickles bytes keys, re-exports str)."""
    batch = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


@dataclass
class CifarData:
    train_images: torch.Tensor  # uint8 N×3×32×32
    train_labels: torch.Tensor  # int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    source: str


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_archive(path: Path, md5: str | None = MINI_MD5) -> CifarData:
    """Read a CIFAR-10 python archive (checked against ``md5`` when given) into tensors."""
    if md5 is not None and md5sum(path) != md5:
        raise ValueError(f"{path}: md5 mismatch (expected {md5}); refusing to unpickle it")
    batches: dict[str, dict] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and (name.startswith("data_batch_") or name in ("test_batch", "batches.meta")):
                batches[name] = _load_batch(tar.extractfile(member).read())

    def stack(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.concatenate([np.asarray(batches[n]["data"], dtype=np.uint8) for n in names])
        labels = np.concatenate([np.asarray(batches[n]["labels"], dtype=np.int64) for n in names])
        return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)

    train_names = sorted(n for n in batches if n.startswith("data_batch_"))
    train_x, train_y = stack(train_names)
    test_x, test_y = stack(["test_batch"])
    names = [n.decode() if isinstance(n, bytes) else n for n in batches["batches.meta"]["label_names"]] \
        if "batches.meta" in batches else [str(i) for i in range(10)]
    return CifarData(train_x, train_y, test_x, test_y, names, str(path))


def generated(n_train: int, n_test: int, seed: int = 0) -> CifarData:
    """Random uint8 images with a weak class signal (for speed, not accuracy)."""
    gen = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 10, (n,), generator=gen)
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
        images[:, labels % 3, :4, :4] = 255
        return images, labels

    (a, b), (c, d) = make(n_train), make(n_test)
    return CifarData(a, b, c, d, [f"class{i}" for i in range(10)], "generated")


def load_cifar(archive: str | Path | None = None, n_train: int | None = None, n_test: int | None = None) -> CifarData:
    """The shared archive when present (``archive`` or the default path), else generated data."""
    path = Path(archive) if archive else DEFAULT_ARCHIVE
    data = read_archive(path, MINI_MD5 if path.name == "cifar-10-mini-python.tar.gz" else None) if path.exists() \
        else generated(n_train or 4068, n_test or 1017)
    if n_train is not None and n_train > len(data.train_labels):  # repeat real images to reach n_train
        reps = -(-n_train // len(data.train_labels))
        data.train_images, data.train_labels = data.train_images.repeat(reps, 1, 1, 1), data.train_labels.repeat(reps)
    if n_train is not None:
        data.train_images, data.train_labels = data.train_images[:n_train], data.train_labels[:n_train]
    if n_test is not None:
        data.test_images, data.test_labels = data.test_images[:n_test], data.test_labels[:n_test]
    return data
