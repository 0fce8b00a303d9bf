"""What every stage script shares: one stage at a time per workspace, user errors as one
sentence and a non-zero exit, and a clean end on SIGTERM or Ctrl-C."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from kdpipe.errors import KdpipeError
from kdpipe.workspace import exclusive


class Terminated(BaseException):
    """SIGTERM, raised where the stage is so that every ``with`` block unwinds: temporary files
    are removed and the MLflow run is ended as failed instead of staying RUNNING."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def main(run: Callable[[], Any]) -> None:
    """Run a stage body under the workspace lock; a :class:`KdpipeError` becomes
    ``error: <sentence>`` and exit 2, SIGTERM exit 143, Ctrl-C exit 130."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with exclusive(sys.argv[0]):
            run()
    except KdpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; a re-run resumes training from the last finished epoch", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated; a re-run resumes training from the last finished epoch", file=sys.stderr)
        sys.exit(143)
