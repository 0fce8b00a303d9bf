"""One workspace, one run: a lock that keeps two kdpipe stages from writing the same files,
and the clean-up of what a killed stage left behind.

Two ``dvc exp run`` started in one workspace a second apart would interleave: the first
experiment's stages would read the second one's params and overwrite each other's outputs.
Each stage takes ``.kdpipe/lock`` (holding its PID) for its whole run; a second stage in
the same workspace stops with one sentence. A lock whose process is gone (a SIGKILL) is stale
and taken over; the temporary files that process left (``.<name>.*.tmp`` next to the outputs)
are then removed. ``dvc exp run --queue`` runs each experiment in its own copy, so queued
experiments never meet this lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from kdpipe.errors import KdpipeError

LOCK_FILE = Path(".kdpipe/lock")
# where stages write, and so where a killed one can leave temporary files
OUTPUT_ROOTS = ("data", "models", "metrics", "plots", "reports")


def _holder(lock: Path) -> dict | None:
    """The lock's holder if that process still runs, else None (a stale lock)."""
    import psutil

    try:
        info = json.loads(lock.read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return info if str(info.get("command", "")) in cmdline else None  # a reused PID is not the holder


def leftovers(roots: tuple[str, ...] = OUTPUT_ROOTS) -> list[Path]:
    """Temporary files and folders of interrupted atomic writes under ``roots``."""
    found: list[Path] = []
    for root in roots:
        if Path(root).is_dir():
            found += [p for p in Path(root).rglob(".*.tmp")]
            found += [p for p in Path(root).rglob(".*.extracting")]
            found += [p for p in Path(root).rglob(".*.old")]  # a folder replaced by atomic_dir
    return sorted(found)


def remove_leftovers(roots: tuple[str, ...] = OUTPUT_ROOTS) -> list[Path]:
    removed = leftovers(roots)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def exclusive(command: str, lock: Path = LOCK_FILE) -> Iterator[None]:
    """Hold the workspace lock for ``command`` (a stage script's path) while the body runs."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None:
                raise KdpipeError(
                    f"another kdpipe stage ({holder.get('command')}, PID {holder.get('pid')}) is running in this "
                    f"workspace since {holder.get('started')}; wait for it to finish, or run experiments side by "
                    "side with `dvc exp run --queue` and `dvc queue start` (each in its own copy).") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            removed = remove_leftovers()
            if removed:
                print(f"removed {len(removed)} temporary file(s) left by an interrupted stage: "
                      + ", ".join(map(str, removed[:3])) + ("…" if len(removed) > 3 else ""), file=sys.stderr)
    else:  # pragma: no cover - a third process won the race twice
        raise KdpipeError(f"could not take the workspace lock {lock}; run the stage again.")
    with os.fdopen(fd, "w") as fh:
        json.dump({"pid": os.getpid(), "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, fh)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
