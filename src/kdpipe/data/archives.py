"""Safe extraction of tar and zip archives.

Every member is checked before anything is written: a member whose path is absolute or
climbs out with ``..``, any link (symbolic or hard, wherever it points), a device file or a
FIFO makes the whole archive refused, so nothing at all is extracted from it. Extraction goes to a temporary sibling folder that is
renamed onto the target only when complete, so an interrupted extraction leaves nothing
that looks finished.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from kdpipe.errors import KdpipeError

Include = Callable[[str], bool]


class UnsafeArchiveError(KdpipeError):
    """An archive member would land outside the extraction folder."""


def _refuse(archive: Path, member: str, why: str) -> None:
    raise UnsafeArchiveError(
        f"refusing to extract {archive.name}: member {member!r} {why}; nothing was extracted "
        "(the archive is corrupted or was tampered with — get a fresh copy from the official source)."
    )


def _normalized(name: str) -> str | None:
    """``name`` as a clean relative POSIX path, or None when it is absolute or escapes."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":"):  # /etc/x, C:/x
        return None
    clean = posixpath.normpath(name)
    if clean == ".." or clean.startswith("../") or posixpath.isabs(clean):
        return None
    return clean


def _check_name(archive: Path, name: str) -> str:
    clean = _normalized(name)
    if clean is None:
        _refuse(archive, name, "has an absolute path or climbs out of the target folder with '..'")
    return clean  # type: ignore[return-value]


def _refuse_link(archive: Path, name: str, target: str) -> None:
    # No data set kdpipe reads contains links, and one pointing inside is no safer than one
    # pointing out: `data_batch_5 -> test_batch` would quietly put the test images into training.
    _refuse(archive, name, f"is a link (to {target!r}); data archives hold only files and folders")


def check_tar(archive: Path, members: list[tarfile.TarInfo]) -> None:
    for m in members:
        _check_name(archive, m.name)
        if m.issym() or m.islnk():
            _refuse_link(archive, m.name, m.linkname)
        elif not (m.isfile() or m.isdir()):
            _refuse(archive, m.name, "is a device file or FIFO")


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def check_zip(archive: Path, zf: zipfile.ZipFile) -> None:
    for info in zf.infolist():
        _check_name(archive, info.filename)
        if _zip_is_symlink(info):
            _refuse_link(archive, info.filename, zf.read(info).decode("utf-8", "replace"))


def _staging_dir(dest: Path) -> Path:
    staging = dest.parent / f".{dest.name}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def extract(archive: str | Path, dest: str | Path, include: Include | None = None, desc: str | None = None) -> Path:
    """Check every member of ``archive`` (tar, tar.gz, zip), then extract it into ``dest``.

    ``dest`` must not exist yet. ``include`` (a predicate on the member's clean relative
    path) selects what is written; the safety check still covers every member.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise FileExistsError(dest)  # a bug in the caller, not a user problem
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest, include, desc)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, dest, include, desc)
    else:
        raise KdpipeError(f"{archive.name} is neither a tar nor a zip archive; get a fresh copy of it.")
    return dest


def _extract_tar(archive: Path, dest: Path, include: Include | None, desc: str | None) -> None:
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            check_tar(archive, members)
            chosen = [m for m in members if include is None or include(_normalized(m.name) or "")]
            staging = _staging_dir(dest)
            try:
                for m in tqdm(chosen, desc=desc or f"extracting {archive.name}", unit="file", leave=False):
                    # The "data" filter re-checks every member (defence in depth) and drops
                    # owners and special permission bits.
                    tf.extract(m, staging, filter="data")
                os.replace(staging, dest)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, FileExistsError):
            raise
        raise KdpipeError(f"{archive.name} is not a readable tar archive ({exc}); get a fresh copy of it.") from None


def _extract_zip(archive: Path, dest: Path, include: Include | None, desc: str | None) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            check_zip(archive, zf)
            chosen = [i for i in zf.infolist()
                      if not _zip_is_symlink(i) and (include is None or include(_normalized(i.filename) or ""))]
            staging = _staging_dir(dest)
            try:
                for info in tqdm(chosen, desc=desc or f"extracting {archive.name}", unit="file", leave=False):
                    target = staging / _normalized(info.filename)  # type: ignore[operator]
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                os.replace(staging, dest)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        if isinstance(exc, FileExistsError):
            raise
        raise KdpipeError(f"{archive.name} is not a readable zip archive ({exc}); get a fresh copy of it.") from None
