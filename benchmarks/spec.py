"""What a benchmark states about itself, and the pieces of ``RESULTS.md`` it renders.

Every benchmark module ``benchmarks/<name>.py`` ends with a ``SPEC = Benchmark(...)``: its
name, what it measures, its goals, the arguments the runner gives it (full, ``--quick``, CPU,
``--gpu``) and the functions that turn its JSON result into report pieces. The runner
(``benchmarks/run.py``) finds the modules that have a ``SPEC``, runs them, collects their JSON
and lays the report out; it knows no benchmark by name.

The report's layout, and which hook fills which part:

- ``## Speed``: one table; each benchmark adds rows (:attr:`Benchmark.speed_rows`).
- ``### Where the time goes``: a bullet a stage below :data:`PURE_LIMIT_SHARE` of its limit
  (:attr:`Benchmark.time_notes`).
- a ``## <heading>`` section of its own (:attr:`Benchmark.section`), ordered by
  :attr:`Section.order`.
- ``## Other accuracy figures``: one bullet (:attr:`Benchmark.summary`).

This module imports nothing heavy, so that a benchmark's report functions can be imported (and
tested) without running it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Below this share of its pure-model limit a stage gets a "where the time goes" note.
PURE_LIMIT_SHARE = 0.8

#: One speed row: (stage, measured, reference, ratio, goal, meets).
Row = tuple[str, str, str, str, str, str]


@dataclass(frozen=True)
class Section:
    """A benchmark's own ``## heading`` section of the report.

    Attributes:
        heading: the heading's text, without ``## ``.
        render: the runner's entry for the benchmark (``{"status": "ok", "result", …}``) →
            the section's lines (without the heading).
        order: sections are laid out by this number, lowest first.
    """

    heading: str
    render: Callable[[dict[str, Any]], list[str]]
    order: int = 100


@dataclass(frozen=True)
class RunnerOption:
    """An option of ``python -m benchmarks.run`` that one benchmark contributes.

    The runner adds ``flag`` (a path), stops with exit status 2 when the file does not exist,
    and passes ``flag <absolute path>`` on to the benchmark.
    """

    flag: str
    help: str


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's spec: how the runner calls it and how its result is reported.

    Attributes:
        name: module name under ``benchmarks``.
        what: what it measures, one line.
        args: arguments of a full run.
        quick: arguments of a quick run; None leaves the benchmark out of quick runs.
        cpu: extra arguments of a CPU run (where the benchmark would pick a GPU itself).
        gpu: extra arguments with ``--gpu``; None: the benchmark has no device (it runs as
            on CPU).
        timeout: seconds before the child is stopped (full run; quick runs get a third).
        order: where it runs and is listed among the benchmarks, lowest first.
        goals: the goals it is held to, one sentence each (``--list`` shows them; the
            figures in the report come from the result's own ``goal_*`` fields or the
            module's constants).
        gpu_extra: arguments computed when the command is built with ``--gpu`` (on the
            machine that runs it), after ``gpu``.
        options: runner options it contributes (e.g. a weights file).
        speed_rows: result → rows of the speed table.
        time_notes: (result, cores available) → "where the time goes" bullets.
        section: its own report section.
        summary: result → one bullet under "Other accuracy figures" (None: none).
    """

    name: str
    what: str
    args: list[str] = field(default_factory=list)
    quick: list[str] | None = None
    cpu: list[str] = field(default_factory=list)
    gpu: list[str] | None = None
    timeout: int = 3600
    order: int = 1000
    goals: tuple[str, ...] = ()
    gpu_extra: Callable[[], list[str]] | None = None
    options: tuple[RunnerOption, ...] = ()
    speed_rows: Callable[[dict[str, Any]], list[Row]] | None = None
    time_notes: Callable[[dict[str, Any], int | None], list[str]] | None = None
    section: Section | None = None
    summary: Callable[[dict[str, Any]], str | None] | None = None


# -- formatting shared by the report functions ----------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell ("–" when missing)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def pm(stat: dict[str, Any] | None) -> str:
    """``mean ± sd`` of a ``{"mean", "sd"}`` figure."""
    if not stat or stat.get("mean") is None:
        return "–"
    if stat.get("sd") is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def meets(value: float | None, goal: float | None, higher: bool = True) -> str:
    """The "meets" cell: yes, **no**, or "–" without a figure or a goal."""
    if value is None or goal is None:
        return "–"
    ok = value >= goal if higher else value <= goal
    return "yes" if ok else "**no**"


def tail(text: str, chars: int = 1500) -> str:
    """The end of ``text`` (an error message, a log), at most ``chars`` characters."""
    text = text.strip()
    return text if len(text) <= chars else "…" + text[-chars:]


def last_json(text: str, benchmark: str | None = None) -> dict[str, Any]:
    """The last line of ``text`` (a benchmark's stdout) that is a JSON object; with
    ``benchmark``, the last whose ``"benchmark"`` field names it.

    Raises:
        ValueError: there is none.
    """
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and benchmark in (None, value.get("benchmark")):
                return value
    raise ValueError("printed no JSON line")
