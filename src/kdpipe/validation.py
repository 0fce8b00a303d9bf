"""Typed validation of YAML mappings into frozen dataclasses.

Every settings object in kdpipe (a params section, a plug-in's own settings) is a frozen
dataclass whose fields carry type hints and defaults, plus an optional ``check(key)`` for
range rules. :func:`build` turns a mapping read from YAML into one: an unknown key, a wrong
type or an out-of-range value raises :class:`ConfigError` with one sentence naming the
dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, NoReturn

from kdpipe.errors import ConfigError


class Settings:
    """Base of every settings dataclass: ``check`` adds the rules a type hint cannot say."""

    def check(self, key: str) -> None:
        pass


def fail(key: str, value: Any, allowed: str) -> NoReturn:
    raise ConfigError(f"params.yaml: {key}={value!r} is not allowed; expected {allowed}.")


def under(path: str, folder: str) -> bool:
    """True when relative ``path`` names something inside ``folder`` (no ``..`` escapes)."""
    norm = posixpath.normpath(path.replace("\\", "/"))
    return not posixpath.isabs(norm) and norm.startswith(folder + "/")


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return "null or " + " or ".join(type_name(a) for a in args)
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Return ``value`` checked against type hint ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return coerce(inner, value, key) if value is not None else fail(key, value, type_name(tp))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if isinstance(value, bool) or value not in allowed:
            fail(key, value, type_name(tp))
        return value
    if origin is list:
        if not isinstance(value, list):
            fail(key, value, type_name(tp))
        (inner,) = typing.get_args(tp)
        return [coerce(inner, v, key) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, value, "an integer")
        return value
    if tp is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            fail(key, value, "a finite number")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            fail(key, value, "a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in the settings class


def build(cls: type, data: Any, prefix: str, given: dict[str, Any] | None = None) -> Any:
    """``cls`` from the mapping ``data`` found at ``prefix`` in params.yaml.

    ``given`` supplies fields that are not read from ``data`` (they are not allowed there):
    a KD method's shared settings such as ``kd.temperature``.
    """
    given = dict(given or {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(prefix or "params.yaml", data, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    own = [f.name for f in dataclasses.fields(cls) if f.name not in given]
    settable = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")]
    for key in data:
        if key not in own:
            where = f"{prefix}.{key}" if prefix else str(key)
            allowed = ", ".join(sorted(settable)) if settable else "none (this section takes no settings)"
            raise ConfigError(f"params.yaml: unknown key {where!r}; allowed keys here are {allowed}.")
    values = {name: coerce(hints[name], data[name], f"{prefix}.{name}" if prefix else name)
              for name in own if name in data}
    obj = cls(**values, **given)
    if hasattr(obj, "check"):
        obj.check(prefix)
    return obj


def derived(**kwargs: Any) -> Any:
    """A field filled from elsewhere in params.yaml, not from its own section (e.g. a KD
    method's ``temperature`` comes from ``kd.temperature``); it has no default of its own."""
    return dataclasses.field(kw_only=True, metadata={"derived": True}, **kwargs)


def derived_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("derived"))


def own_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived"))


def as_dict(obj: Any, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """A settings object as plain data (what params.yaml would hold), without ``exclude``."""
    skip = set(exclude)
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return as_dict(value, derived_fields(type(value)))
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a settings object or a nested mapping into dotted keys (MLflow, presets)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = _plain(obj)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
