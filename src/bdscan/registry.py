"""A small, generic name -> object registry that refuses duplicates.

Methods (detect signals, purifiers, judges) register themselves by name; an unknown name
is answered with the closest matches and the list of what exists. A name can be declared
lazily with the module that registers it (``declare``): the module is imported on the first
``get``, so listing names costs no import of torch (as lm-evaluation-harness does for tasks).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterator, TypeVar

from bdscan.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._modules: dict[str, str] = {}  # declared name -> module that registers it

    def declare(self, name: str, module: str) -> None:
        """``name`` is registered by importing ``module`` (on first use)."""
        if name in self._modules or name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is declared twice")
        self._modules[name] = module

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        if name not in self._entries and name in self._modules:
            importlib.import_module(self._modules[name])
            if name not in self._entries:
                raise ValueError(f"{self._modules[name]} did not register {self.kind} {name!r}")
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UsageError(
                f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._modules))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
