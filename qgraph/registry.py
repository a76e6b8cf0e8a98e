"""Name -> plugin lookup built from Python entry points.

Built-in passes and backends are declared as entry points in qgraph's own ``pyproject.toml``, so they are found
exactly the way a third-party plugin is. A registry is an ordinary object built on demand (no module-level state);
tests can build one by hand and ``add`` to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from qgraph.errors import QGraphError, UnknownNameError

PASS_GROUP = "qgraph.passes"
BACKEND_GROUP = "qgraph.backends"


@dataclass
class Entry:
    """One registered plugin: loaded lazily so a broken plugin only fails when it is used."""

    name: str
    source: str  # "module:attr" or "<added>"
    distribution: str
    loader: Callable[[], Any]
    _loaded: Any = None

    def load(self) -> Any:
        if self._loaded is None:
            try:
                self._loaded = self.loader()
            except Exception as exc:  # an import error in someone's plugin must name the plugin
                raise QGraphError(
                    f"plugin {self.name!r} ({self.source}, from {self.distribution}) failed to load: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        return self._loaded


@dataclass
class Registry:
    """Plugins of one kind ("pass" or "backend"), by name."""

    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)

    def add(self, name: str, obj: Any, distribution: str = "<added>") -> None:
        self.entries[name] = Entry(name, "<added>", distribution, lambda: obj)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> Any:
        if name not in self.entries:
            raise UnknownNameError(self.kind, name, self.names())
        return self.entries[name].load()

    def module_of(self, name: str) -> str:
        """The module a plugin is defined in, read from its entry point without importing it (when it has one)."""
        if name not in self.entries:
            raise UnknownNameError(self.kind, name, self.names())
        entry = self.entries[name]
        if entry.source != "<added>":
            return entry.source.partition(":")[0]
        return entry.load().__module__

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries[n] for n in self.names())


def from_entry_points(group: str, kind: str) -> Registry:
    """Collect every installed distribution's entry points in ``group``."""
    registry = Registry(kind)
    for ep in entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "?"
        registry.entries[ep.name] = Entry(ep.name, ep.value, dist, ep.load)
    return registry


def pass_registry() -> Registry:
    return from_entry_points(PASS_GROUP, "pass")


def backend_registry() -> Registry:
    return from_entry_points(BACKEND_GROUP, "backend")
