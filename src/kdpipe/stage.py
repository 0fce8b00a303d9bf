"""What every stage script shares: load params, turn user errors into one sentence and a
non-zero exit, and a standard way to train-and-save one model."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from kdpipe.errors import KdpipeError


def main(run: Callable[[], Any]) -> None:
    """Run a stage body; a :class:`KdpipeError` becomes ``error: <sentence>`` and exit 2."""
    try:
        run()
    except KdpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
