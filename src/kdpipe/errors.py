"""The one exception type a stage turns into a one-sentence message and a non-zero exit."""

from __future__ import annotations


class KdpipeError(Exception):
    """A problem the user can fix: the message says what was wrong and what to do."""


class ConfigError(KdpipeError, ValueError):
    """A value in params.yaml is missing, of the wrong type or out of range."""
