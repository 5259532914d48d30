"""One small registry of named builders, shared by slide readers, encoders and aggregators.

After timm's ``_registry.py``: a decorator registers a builder under a name, ``create`` builds
it, and an unknown name raises an error listing what exists and the closest matches.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from histcode.errors import NotFoundError

T = TypeVar("T")


class UnknownNameError(NotFoundError):
    """Raised when a name is not registered; the message lists close matches."""


class Builders(Generic[T]):
    """Named builders of one kind of object (e.g. encoders).

    Args:
        kind: what the builders make, used in error messages (e.g. ``"encoder"``).

    Example:
        >>> readers = Builders[object]("slide reader")
        >>> @readers.register("openslide")
        ... def _build(path): ...
        >>> readers.names()
        ['openslide']
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``builder`` under ``name`` (names are unique)."""

        def decorate(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = builder
            return builder

        return decorate

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._builders)

    def get(self, name: str) -> Callable[..., T]:
        """The builder registered under ``name``.

        Raises:
            UnknownNameError: ``name`` is not registered; lists names and close matches.
        """
        try:
            return self._builders[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._builders, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}."
            ) from None

    def create(self, name: str, **kwargs: object) -> T:
        """Build the object registered under ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._builders
