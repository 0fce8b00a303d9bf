"""One registry class for every kind of plug-in: KD methods, data sources, architectures.

A plug-in is one module that registers its name together with its typed settings (a frozen
dataclass next to its code) and its constructor. ``config`` builds the params sections from
the registries (``kd.<method>``, ``data.<source>``, ``teacher.<arch>``, ``student.<arch>``)
and validates names against them, so adding a plug-in is one file plus its test.

Registries discover their package: every module in it is imported on first use, so a new
module registers itself without an import line anywhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kdpipe.errors import ConfigError
from kdpipe.validation import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class NoSettings(Settings):
    """The settings of a plug-in that has none (its params section is ``{}``)."""


@dataclass(frozen=True)
class Plugin(Generic[T]):
    name: str
    settings: type  # a frozen dataclass (Settings) of the plug-in's own keys
    factory: T  # the constructor (KD method, architecture) or the source's functions
    module: str  # the module that registered it
    info: dict[str, Any] = field(default_factory=dict)  # kind-specific facts (roles, default image size)

    @property
    def file(self) -> str:
        """The plug-in's source file relative to the project root (a DVC dependency)."""
        return "src/" + self.module.replace(".", "/") + ".py"


class Registry(Generic[T]):
    """Names → plug-ins of one kind; ``key`` is the params key that selects them (errors)."""

    def __init__(self, kind: str, key: str, package: str) -> None:
        self.kind, self.key, self.package = kind, key, package
        self._plugins: dict[str, Plugin[T]] = {}
        self._discovered = False

    def register(self, name: str, settings: type = NoSettings, factory: T | None = None,
                 **info: Any) -> Callable[[T], T]:
        """Register ``factory`` under ``name`` (directly, or as a decorator when it is None)."""

        def wrap(obj: T) -> T:
            if name in self._plugins and self._plugins[name].factory is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice "
                                 f"({self._plugins[name].module} and {obj.__module__})")
            module = info.pop("module", None) or getattr(obj, "__module__", None) or "?"
            self._plugins[name] = Plugin(name, settings, obj, module, dict(info))
            return obj

        if factory is not None:
            wrap(factory)
        return wrap

    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")

    def names(self, **where: Any) -> tuple[str, ...]:
        """Registered names, in registration order; ``where`` filters on ``info`` (e.g. role)."""
        self.discover()
        return tuple(n for n, p in self._plugins.items()
                     if all(v in p.info.get(k, ()) if isinstance(p.info.get(k), (tuple, list, set))
                            else p.info.get(k) == v for k, v in where.items()))

    def get(self, name: str, key: str | None = None, **where: Any) -> Plugin[T]:
        """The plug-in ``name``; an unknown name is a ConfigError naming ``key`` (default: the
        registry's key) and listing the registered names."""
        names = self.names(**where)
        if name not in names:
            raise ConfigError(f"params.yaml: {key or self.key}={name!r} is not allowed; expected one of "
                              + ", ".join(names) + ".")
        return self._plugins[name]

    def __iter__(self) -> Iterator[Plugin[T]]:
        return iter(self._plugins[n] for n in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()
