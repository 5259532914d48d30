"""Error types shared across histcode: what a command reports as a usage error, and why.

The library raises these; the command kit (:mod:`histcode.commandkit`) turns them into one
line on stderr and exit status 2 (``USAGE_ERRORS``). Anything else a command raises is a bug
and ends with its traceback.

- :class:`NotFoundError`: a named thing (a slide in a store, a checkpoint, an encoder or
  aggregator name, a slide's labels) is not there; the message lists what exists. It is a
  ``KeyError`` for callers that catch one, but a bare ``KeyError`` (a missing dict key, a
  bug) is *not* a usage error.
- :class:`OutputBusyError`: another run is writing the same output (it holds the lock).

:func:`preview` shortens a list of ids for a message.
"""

from __future__ import annotations

from collections.abc import Iterable


class NotFoundError(KeyError):
    """A named thing is not there; the message says what exists (usage error, exit 2)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class OutputBusyError(RuntimeError):
    """An output is being written by another run (it holds the lock): exit 2, message only."""


def preview(items: Iterable[object], n: int = 8) -> str:
    """``a, b, c … (12 in all)``: a short list of ids for error messages."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:n])
    return f"{shown} … ({len(items)} in all)" if len(items) > n else shown
