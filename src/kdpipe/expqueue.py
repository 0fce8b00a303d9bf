"""Named DVC experiments through DVC's queue: queue them, start N workers, wait for all of them.

The one queue runner of ``kdpipe replicate`` (seeds) and ``kdpipe sweep`` (a T×α grid). What it
relies on, checked with DVC 3.67 (tests/test_e2e_team.py runs it for real):

* ``dvc queue start -j N`` starts up to N workers on this machine; each experiment runs in a
  temporary copy of the repository (``.dvc/tmp/exps/tmp…``) with ``DVC_ROOT`` set to the
  repository itself, so kdpipe's default MLflow store (``<DVC_ROOT>/mlflow.db``) is the project's.
* The workers inherit the environment of ``dvc queue start`` (``MLFLOW_TRACKING_URI``, ``PATH``,
  ``PYTHONPATH``), not that of ``dvc exp run --queue``; a worker that already runs keeps its own,
  and DVC then starts fewer new ones (its "Started 'N' new … workers").
* ``dvc queue status`` lists every task as ``<task> <name> <created> <status>``.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError

FINAL_STATES = ("Success", "Failed")


def dvc(args: Sequence[str], repo: str | Path, runner: Callable[..., Any] = subprocess.run) -> str:
    """``dvc <args>`` in ``repo``; its stdout, or one sentence with dvc's last line when it fails."""
    cmd = ["dvc", *args]
    try:
        out = runner(cmd, cwd=repo, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise KdpipeError("the dvc command is not on PATH; activate the project's virtual environment.") from None
    if out.returncode != 0:
        last = (out.stderr or out.stdout or "").strip().splitlines()[-1:] or ["?"]
        raise KdpipeError(f"'{' '.join(cmd)}' failed in {repo}: {last[0]}")
    return out.stdout


def queue_states(status_output: str, names: Sequence[str]) -> dict[str, str]:
    """The state (Queued, Running, Success, Failed, ...) of each of ``names`` in the output of
    ``dvc queue status`` (a table: task, name, created, status)."""
    states = {}
    for line in status_output.splitlines():
        tokens = line.split()
        for name in names:
            if name in tokens[1:-1]:
                states[name] = tokens[-1]
    return states


def workers_started(start_output: str) -> int | None:
    """How many new workers ``dvc queue start`` says it started (None: it did not say)."""
    found = re.search(r"Started '(\d+)' new", start_output)
    return int(found.group(1)) if found else None


def tracking_note(repo: str | Path) -> str:
    """Where the queued experiments' MLflow runs go, as one line for the log."""
    from kdpipe.redact import redact
    from kdpipe.tracking import default_tracking_uri, unreachable

    uri = default_tracking_uri(Path(repo).resolve())
    problem = unreachable(uri) if uri.startswith(("http://", "https://")) else None
    if problem:
        return (f"warning: the MLflow server {redact(uri)} does not answer ({problem}): the experiments run without "
                "tracking (mlflow.required: false) or fail (true); start it first (make server).")
    return f"MLflow: the experiments log to {redact(uri)} (MLFLOW_TRACKING_URI at dvc queue start)"


def run_queued(experiments: Sequence[tuple[str, Sequence[str]]], repo: str | Path = ".", jobs: int = 1,
               poll_seconds: float = 5.0, timeout_seconds: float | None = None,
               runner: Callable[..., Any] = subprocess.run, log: Callable[[str], None] = print,
               what: str = "experiments", taken_hint: str = "") -> dict[str, str]:
    """Queue ``experiments`` (name, ``dvc exp run`` arguments: ``-S`` flags, targets) as
    ``dvc exp run --queue -n <name> <args>``, start ``jobs`` workers, wait until all of them
    ended; return name -> final state. Names that exist already for this commit are refused
    before anything is queued (``taken_hint``: what else to do); failures are one error naming them."""
    names = [name for name, _ in experiments]
    if not names:
        raise KdpipeError(f"no {what} to run.")
    if len(set(names)) != len(names):
        raise KdpipeError(f"the {what} repeat a name: {', '.join(sorted({n for n in names if names.count(n) > 1}))}.")
    existing = set(dvc(["exp", "list", "--name-only"], repo, runner).split())
    taken = [n for n in names if n in existing]
    if taken:
        raise KdpipeError(f"experiments {', '.join(taken)} already exist for this commit; remove them "
                          f"(dvc exp remove {' '.join(taken)}){taken_hint}.")
    for name, args in experiments:
        dvc(["exp", "run", "--queue", "-n", name, *args], repo, runner)
        log(f"queued {name} ({' '.join(args)})")
    started = workers_started(dvc(["queue", "start", "-j", str(jobs)], repo, runner))
    if started is not None and started < jobs:
        log(f"note: {jobs - started} queue worker(s) were already running; they keep the environment they were "
            "started with (MLFLOW_TRACKING_URI, PATH)")
    log(f"started {jobs} worker(s); waiting for {len(names)} {what}")
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    seen: dict[str, str] = {}
    while True:
        states = queue_states(dvc(["queue", "status"], repo, runner), names)
        for name, state in states.items():
            if state != seen.get(name):
                log(f"{name}: {state}")
        seen.update(states)
        if all(seen.get(n) in FINAL_STATES for n in names):
            break
        if deadline is not None and time.monotonic() > deadline:
            where = ", ".join(f"{n}: {seen.get(n, '?')}" for n in names)
            raise KdpipeError(f"the {what} did not finish within {timeout_seconds:g}s ({where}); "
                              "see dvc queue status.")
        time.sleep(poll_seconds)
    failed = [n for n in names if seen[n] != "Success"]
    if failed:
        raise KdpipeError(f"{len(failed)} of {len(names)} {what} failed ({', '.join(failed)}); "
                          f"see dvc queue logs {failed[0]}.")
    return {n: seen[n] for n in names}
