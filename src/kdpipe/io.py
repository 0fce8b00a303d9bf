"""Atomic writes: a reader (or DVC) never sees a half-written output. Plus file hashing.

Every output (metrics, reports, figures, prepared data, models, downloads) is written through
:func:`atomic_path` or :func:`atomic_dir`, with the permissions a plain ``open(path, "w")`` would
give (0666/0777 less the umask)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import pickle
import secrets
import shlex
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kdpipe.errors import KdpipeError

CHUNK = 1 << 20  # 1 MiB: hash files of any size in constant memory


def _new_temp(folder: Path, name: str, suffix: str, make: Callable[[Path], None]) -> Path:
    """Create a new, unique ``folder/.<name>.<random><suffix>`` with ``make``; the name is
    random so that concurrent writers never share a temporary file."""
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}{suffix}"
        try:
            make(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name next to {folder / name}")


def _create_file(path: Path) -> None:
    # 0o666 filtered by the umask, like open(path, "w") (tempfile.mkstemp would give 0600)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a new, empty temporary file next to ``path``; rename it onto ``path`` only on
    success. Its permissions are the usual ones (0666 less the umask: 0644 under umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path.parent, path.name, suffix, _create_file)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new, empty temporary folder next to ``path`` (0777 less the umask); on success
    it replaces ``path`` (a previous ``path`` is removed only then), else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path.parent, path.name, ".tmp", lambda p: p.mkdir())
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write dict rows (same keys) as CSV; column order follows the first row."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` through a temporary file, byte-stable: given a file name, torch names the
    archive's root folder after it (the random temporary name), so the same object would give
    different bytes on every save and DVC would see a changed output; through an open file the
    root folder is always ``archive``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)


def restore_hint(path: str | Path) -> str:
    """How to get DVC's copy of a damaged output back: ``--force``, because DVC otherwise refuses
    to overwrite a changed file (a truncated one is changed) without a confirmation."""
    return f"restore it with `dvc checkout --force {shlex.quote(str(path))}`"


def load_torch(path: str | Path, rebuild: str = "re-run the stage that writes it (dvc repro -f -s <stage>)") -> Any:
    """Load a file written by :func:`save_torch` without unpickling arbitrary objects.

    A missing, truncated, corrupt or foreign file (one holding objects other than tensors and
    plain containers: ``weights_only`` refuses it) becomes one :class:`KdpipeError` sentence that
    names the file and says how to get a good one back (``rebuild``), never torch's advice to
    turn ``weights_only`` off.
    """
    path = Path(path)
    if not path.is_file():
        raise KdpipeError(f"{path} not found; {rebuild}.")
    if not zipfile.is_zipfile(path):  # every torch.save archive is a zip: this one is cut short or garbage
        raise KdpipeError(f"{path} is truncated or corrupt (not a complete PyTorch archive); {rebuild}, "
                          f"or {restore_hint(path)}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):  # the safe loader refused an object: a foreign file
            problem = "holds objects other than tensors (not a file kdpipe wrote; it was not unpickled)"
        else:
            problem = f"is truncated or corrupt ({str(exc).splitlines()[0][:120]})"
    except Exception as exc:  # a damaged archive can fail in many ways; none is worth a traceback
        problem = f"is truncated or corrupt ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
    raise KdpipeError(f"{path} {problem}; {rebuild}, or {restore_hint(path)}.")


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks (``algorithm``: any hashlib name).

    md5 is only ever a checksum here (matching published archive md5s), never a security
    measure, so it is created with ``usedforsecurity=False`` (it works on FIPS systems)."""
    digest = hashlib.new(algorithm, usedforsecurity=algorithm.lower() != "md5")
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
