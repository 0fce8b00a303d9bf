"""What every stage script shares: one stage at a time per workspace, user errors as one
sentence and a non-zero exit, and a clean end on SIGTERM or Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from kdpipe import distributed
from kdpipe.errors import KdpipeError
from kdpipe.workspace import exclusive


class Terminated(BaseException):
    """SIGTERM, raised where the stage is so that every ``with`` block unwinds: temporary files
    are removed and the MLflow run is ended as failed instead of staying RUNNING."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def _lock() -> contextlib.AbstractContextManager:
    """The workspace lock, taken once per stage: by the process itself, or under torchrun by
    rank 0 unless kdpipe's own launcher (which holds it) started the group."""
    group = distributed.from_env()
    if not group.is_main or os.environ.get(distributed.LAUNCHED_ENV):
        return contextlib.nullcontext()
    return exclusive(sys.argv[0])


def main(run: Callable[[], Any], nproc: Callable[[], int] | None = None) -> None:
    """Run a stage body under the workspace lock; a :class:`KdpipeError` becomes
    ``error: <sentence>`` and exit 2, SIGTERM exit 143, Ctrl-C exit 130.

    A training stage passes ``nproc`` (``runtime.nproc``): above 1, and not already under
    torchrun, the stage runs again as that many processes under torchrun."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        processes = nproc() if nproc is not None and not distributed.under_torchrun() else 1
        if processes > 1:
            with exclusive(sys.argv[0]):
                status = distributed.relaunch(processes, sys.argv)
            if status != 0:
                print(f"error: the {processes}-process run of {sys.argv[0]} failed (exit status {status}); "
                      "the first error above says why.", file=sys.stderr)
            sys.exit(0 if status == 0 else 2 if status in (1, 2) else status)
        with _lock():
            try:
                run()
            finally:
                distributed.close()
    except KdpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; a re-run resumes training from the last finished epoch", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated; a re-run resumes training from the last finished epoch", file=sys.stderr)
        sys.exit(143)
