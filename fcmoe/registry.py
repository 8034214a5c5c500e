"""Registries with one way in: ``register_algorithm`` and ``register_layout`` raise on a name clash."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Registry:
    """A name → class map that refuses to overwrite an entry."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._entries[name]!r}); "
                                 "pick another name")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)


ALGORITHMS = Registry("algorithm")
LAYOUTS = Registry("expert layout")


def register_algorithm(name: str) -> Callable[[T], T]:
    """Class decorator: make an algorithm available as ``methods = ["name"]`` in configs.

    The registration is where an algorithm's name is given: it is set on the class as ``name``.
    """
    register = ALGORITHMS.register(name)

    def decorator(cls: T) -> T:
        cls.name = name  # type: ignore[attr-defined]
        return register(cls)

    return decorator


def register_layout(name: str) -> Callable[[T], T]:
    """Class decorator: make an :class:`~fcmoe.models.layout.ExpertLayout` available by storage form."""
    return LAYOUTS.register(name)
