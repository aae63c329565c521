"""One registry pattern for everything chosen by name: datasets, extractors, solvers, kernels, fusions, formats.

Each entry keeps its metadata with it (a one-line help, and whatever the kind needs), so
``list_*()``, the CLI's ``choices`` and its help text are read from the registry, never typed
twice::

    SOLVERS = Registry("solver")

    @SOLVERS.register("eigsh", help="ARPACK Lanczos on D^-1/2 W D^-1/2 (CPU)")
    def _eigsh(A, cfg): ...

    SOLVERS["eigsh"]            # the function; an unknown name raises, listing the valid ones
    SOLVERS.names()             # in registration order
    parser.add_argument("--solver", choices=SOLVERS.names(), help=SOLVERS.help("eigen-solver"))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    help: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Name -> entry, in registration order; ``kind`` names the entries in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, value: T, *, help: str = "", **meta: Any) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, value, help, dict(meta))
        return value

    def register(self, name: str, *, help: str = "", **meta: Any) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorate(value: T) -> T:
            return self.add(name, value, help=help, **meta)

        return decorate

    def check(self, name: str) -> str:
        """``name`` if registered, else a ValueError that lists the valid names."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from {self.names()}")
        return name

    def entry(self, name: str) -> Entry[T]:
        return self._entries[self.check(name)]

    def __getitem__(self, name: str) -> T:
        return self.entry(name).value

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def help(self, what: str | None = None) -> str:
        """One line for a CLI flag's help: ``what: name (help), name (help), ...``."""
        items = ", ".join(f"{e.name} ({e.help})" if e.help else e.name for e in self._entries.values())
        return f"{what or self.kind}: {items}"
