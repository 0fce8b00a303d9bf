"""What a timing was measured on, and whether it was measured alone.

A latency or a training time means nothing without the CPU, its instruction sets (bf16 and
AVX-512 change PyTorch's speed several-fold) and the thread count, and it is worthless when
another training of ours ran beside it (two 2-thread torch processes on 2 cores slow each
other 4–10×). Every timing file records :func:`describe`, and the evaluate stage waits for
:func:`other_stage_processes` to finish before it times anything.

Parallel experiments (``dvc queue start -j 2``) have several timing stages at once, each of
which would wait for the others until its timeout. So timing takes turns: one stage at a time
holds this machine's timing turn (:func:`timing_turn`, a file lock), and a stage waiting for the
turn is not one the holder waits for; it times next, alone.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# The instruction sets that decide how fast PyTorch runs here (/proc/cpuinfo names).
KEY_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")

# The command lines of kdpipe's stage scripts (as dvc.yaml runs them).
STAGE_SCRIPT = re.compile(r"stages/(download|prepare|train_teacher|train_student|teacher_targets|distill|evaluate|export)\.py")


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if info:  # the first processor is enough
                break
            continue
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The :data:`KEY_FLAGS` this CPU has, in that order."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in KEY_FLAGS if f in flags]


def available_cores() -> int:
    """The cores this process may run on (its affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe(threads: int) -> dict[str, Any]:
    """The machine a timing was taken on, for every timing file."""
    return {
        "cpu": cpu_model(),
        "flags": cpu_flags(),
        "cores": available_cores(),
        "threads": threads,
        "torch": torch.__version__,
    }


def other_stage_processes() -> list[int]:
    """PIDs of kdpipe stage scripts running besides this process and its ancestors (another
    `dvc repro`, a `dvc queue` worker, a second experiment)."""
    import psutil

    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if proc.info["pid"] not in mine and STAGE_SCRIPT.search(cmdline):
            found.append(proc.info["pid"])
    return found


def wait_until_alone(timeout_s: float, poll_s: float = 5.0,
                     others: Callable[[], list[int]] | None = None) -> list[int]:
    """Wait up to ``timeout_s`` for the other kdpipe stages (``others``: default
    :func:`other_stage_processes`) to finish; returns those still running (empty: the timings
    that follow are taken alone)."""
    others = others or other_stage_processes
    deadline = time.monotonic() + timeout_s
    running = others()
    if running:
        print(f"waiting up to {timeout_s:.0f}s for {len(running)} other kdpipe stage process(es) "
              f"(PIDs {', '.join(map(str, running))}) to finish before timing", file=sys.stderr)
    while running and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
        running = others()
    return running


def _turn_dir() -> Path:
    """This machine's (and user's) timing-turn folder: the lock file and one file per waiting pid."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"kdpipe-timing-{uid}"


def waiting_for_turn() -> set[int]:
    """PIDs of the stages waiting for the timing turn (:func:`timing_turn`)."""
    folder = _turn_dir() / "waiting"
    return {int(f.name) for f in folder.iterdir() if f.name.isdigit()} if folder.is_dir() else set()


@contextlib.contextmanager
def timing_turn(timeout_s: float, poll_s: float = 0.5) -> Iterator[bool]:
    """Hold this machine's timing turn for the body: wait up to ``timeout_s`` for the stage that
    holds it, listed meanwhile in :func:`waiting_for_turn`. Yields whether the turn was taken
    (False after the timeout, or where file locks are missing: the body runs anyway)."""
    try:
        import fcntl
    except ImportError:  # Windows: no turns
        yield False
        return
    folder = _turn_dir()
    (folder / "waiting").mkdir(parents=True, exist_ok=True)
    waiting = folder / "waiting" / str(os.getpid())
    waiting.touch()
    deadline = time.monotonic() + timeout_s
    with open(folder / "turn.lock", "a+") as lock:
        taken, said = False, False
        try:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    taken = True
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        break
                    if not said:
                        print(f"waiting up to {timeout_s:.0f}s for another kdpipe stage to finish its timings",
                              file=sys.stderr)
                        said = True
                    time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
        finally:
            waiting.unlink(missing_ok=True)
        try:
            yield taken
        finally:
            if taken:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _others_not_waiting() -> list[int]:
    waiting = waiting_for_turn()
    return [pid for pid in other_stage_processes() if pid not in waiting]


@contextlib.contextmanager
def timing_conditions(wait_alone_s: float, threads: int) -> Iterator[dict[str, Any]]:
    """Time alone and on a fixed thread count: take the timing turn and wait for the other
    kdpipe stages (those not waiting for the turn), both within ``wait_alone_s``; set torch to
    ``threads`` threads for the body (restored after), and yield the machine description every
    timing file records (with the load before and whether other stages still ran)."""
    deadline = time.monotonic() + wait_alone_s
    with timing_turn(wait_alone_s):
        still_running = wait_until_alone(max(deadline - time.monotonic(), 0.0), others=_others_not_waiting)
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield {**describe(threads), "load_avg_1min_before": load_before,
                   "other_kdpipe_stages_running": len(still_running)}
        finally:
            torch.set_num_threads(previous)
    if still_running:
        print(f"warning: {len(still_running)} other kdpipe stage(s) still ran while timing; the timings are "
              "slowed by them", file=sys.stderr)
