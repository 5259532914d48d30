"""Run the benchmarks, print one JSON object and write ``benchmarks/RESULTS.md``.

Each benchmark runs as ``python -m benchmarks.<name> …`` in a child process; its last JSON
line is its result. A benchmark that fails is recorded as failed with its error and the
others still run (exit status 1). Speed figures are ratios measured in the same run (the
stage against the pure model, or against a naive loop), never absolute timings.

    python -m benchmarks.run [--quick] [--gpu] [--only NAME …] [--out benchmarks/RESULTS.md]

``--quick`` gives each benchmark small sizes (the whole run takes minutes on 2 CPU cores)
and leaves out the slowest ones; ``--gpu`` runs the stages that use a device on CUDA with
bf16 (exit status 2 when there is no CUDA device). ``--reuse FILE …`` takes the results of
benchmarks that are not run this time from earlier runs' JSON (``--json``) or from a
benchmark's own JSON line, so that a single long benchmark can be rerun and the report
rewritten; ``--report-only`` runs nothing and renders the reused results. ``--list`` shows
each benchmark's spec (what it measures, its goals, its command lines) and runs nothing.

The runner knows no benchmark by name: it imports every module of this package that defines
a ``SPEC`` (:class:`benchmarks.spec.Benchmark`), runs them in their ``order``, and lays out
the report from the pieces each one renders (speed rows, time notes, its own section, a
summary line). A new benchmark is a module with a ``SPEC``; nothing here changes.

Text of ``RESULTS.md`` between a ``<!-- hand-written -->`` line (or ``<!-- hand-written: a
note -->``) and a ``<!-- /hand-written -->`` line is carried over when the report is written
again (:func:`carry_hand_written`): to the same section, at its start or its end as before.
Such blocks cannot sit inside a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import pkgutil
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.spec import PURE_LIMIT_SHARE, Benchmark, Row, Section, fmt, last_json, tail

ROOT = Path(__file__).resolve().parents[1]
#: The package whose modules are the benchmarks.
PACKAGE = "benchmarks"
#: Its modules that are not benchmarks (the runner is not imported a second time).
NOT_BENCHMARKS = frozenset({"run", "spec"})


# -- discovery -----------------------------------------------------------------------------


def discover(package: str = PACKAGE) -> tuple[Benchmark, ...]:
    """Every module of ``package`` that defines a ``SPEC``, in the specs' ``order``.

    A module that cannot be imported is kept as a bare benchmark under its name (it renders
    nothing), so that a run records its failure and runs the others.

    Raises:
        ValueError: a module's ``SPEC`` names another module (the runner calls
            ``python -m <package>.<name>``).
    """
    found: dict[str, Benchmark] = {}
    modules = pkgutil.iter_modules(importlib.import_module(package).__path__)
    for info in sorted(modules, key=lambda m: m.name):
        if info.name.startswith("_") or info.name in NOT_BENCHMARKS or info.name in found:
            continue
        try:
            module = importlib.import_module(f"{package}.{info.name}")
        except Exception as err:  # run it all the same: its child fails and is recorded so
            print(f"benchmarks.run: cannot import {info.name}: {err!r}", file=sys.stderr)
            found[info.name] = Benchmark(info.name, f"could not be imported: {err!r}", quick=[])
            continue
        spec = getattr(module, "SPEC", None)
        if not isinstance(spec, Benchmark):
            continue
        if spec.name != info.name:
            raise ValueError(
                f"{package}.{info.name}: SPEC.name is {spec.name!r}; it must be the module's "
                f"name, {info.name!r}, which the runner calls"
            )
        found[spec.name] = spec
    return tuple(sorted(found.values(), key=lambda b: (b.order, b.name)))


BENCHMARKS: tuple[Benchmark, ...] = discover()
NAMES = tuple(b.name for b in BENCHMARKS)

#: Report functions that lived here before each benchmark rendered its own report.
_MOVED = {
    "accuracy_table": "accuracy",
    "accuracy_section": "accuracy",
    "why_not": "accuracy",
    "ceiling_table": "ceiling",
    "ceiling_section": "ceiling",
    "CEILING_WEAK": "ceiling",
}


def __getattr__(name: str) -> Any:
    """``run.ceiling_section`` and the like: still importable from here."""
    if name in _MOVED:
        return getattr(importlib.import_module(f"{PACKAGE}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- running -------------------------------------------------------------------------------


def command(bench: Benchmark, quick: bool, gpu: bool, extra: dict[str, list[str]]) -> list[str]:
    """The child's command line."""
    args = list(bench.quick if quick and bench.quick is not None else bench.args)
    if gpu and bench.gpu is not None:
        args += bench.gpu
        if bench.gpu_extra is not None:
            args += bench.gpu_extra()
    elif not gpu:
        args += bench.cpu
    args += extra.get(bench.name, [])
    return [sys.executable, "-m", f"{PACKAGE}.{bench.name}", *args]


def run_one(
    bench: Benchmark,
    quick: bool,
    gpu: bool,
    extra: dict[str, list[str]],
    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> dict[str, Any]:
    """Run one benchmark in a child process; never raises for the benchmark's own failure.

    Returns:
        ``{"status": "ok", "result", "command", "seconds", "quick"}`` or ``{"status":
        "failed", "error", …}``.
    """
    cmd = command(bench, quick, gpu, extra)
    entry: dict[str, Any] = {
        "command": " ".join(["python", *cmd[1:]]),
        "quick": quick and bench.quick is not None,
        "device": "cuda" if gpu and bench.gpu is not None else "cpu",
    }
    timeout = bench.timeout // 3 if quick else bench.timeout
    start = time.perf_counter()
    try:
        done = runner(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            **entry,
            "status": "failed",
            "error": f"timed out after {timeout} s",
            "seconds": round(time.perf_counter() - start, 1),
        }
    entry["seconds"] = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return {
            **entry,
            "status": "failed",
            "error": f"exit status {done.returncode}: {tail(done.stderr or done.stdout)}",
        }
    try:
        result = last_json(done.stdout)
    except ValueError as err:
        return {**entry, "status": "failed", "error": f"{err}: {tail(done.stderr)}"}
    return {**entry, "status": "ok", "result": result}


# -- machine -------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def git_commit(root: Path = ROOT) -> str | None:
    """The checked-out commit, read from ``.git`` (no git process)."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """CPU, cores, RAM, torch and GPU of this machine."""
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": ", ".join(gpus) if gpus else "none",
        "load_average": _load(),
    }


def _load() -> list[float] | None:
    """1, 5 and 15 minute load averages (other jobs on a shared machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# -- report --------------------------------------------------------------------------------


def _spec(name: str, benchmarks: Sequence[Benchmark] | None) -> Benchmark | None:
    return next((b for b in benchmarks or BENCHMARKS if b.name == name), None)


def speed_rows(
    name: str, r: dict[str, Any], benchmarks: Sequence[Benchmark] | None = None
) -> list[Row]:
    """The speed table's rows of one benchmark's result (unknown benchmarks give none)."""
    spec = _spec(name, benchmarks)
    return spec.speed_rows(r) if spec is not None and spec.speed_rows is not None else []


def time_notes(
    name: str, r: dict[str, Any], cores: int | None, benchmarks: Sequence[Benchmark] | None = None
) -> list[str]:
    """Where the time goes, for each stage below :data:`PURE_LIMIT_SHARE` of its limit.

    Built by each benchmark only from figures it reports (its own decompositions), so that it
    stays true when the numbers change.
    """
    spec = _spec(name, benchmarks)
    return spec.time_notes(r, cores) if spec is not None and spec.time_notes is not None else []


def other_accuracy(
    name: str, r: dict[str, Any], benchmarks: Sequence[Benchmark] | None = None
) -> str | None:
    """One line for the smaller accuracy benchmarks (their spec's ``summary``)."""
    spec = _spec(name, benchmarks)
    return spec.summary(r) if spec is not None and spec.summary is not None else None


def _load_note(m: dict[str, Any]) -> str:
    loads = [*(m.get("load_average_at_start") or []), *(m.get("load_average") or [])]
    cores = m.get("cores") or 0
    if cores and loads and max(loads) > cores * 0.75:
        return (
            " — other jobs shared the cores: ratios of multi-process to one-process figures "
            "(loader workers, tile reading) are biased low"
        )
    return ""


def _mode(results: dict[str, dict[str, Any]]) -> str:
    sizes = {bool(e.get("quick")) for e in results.values() if e.get("status") == "ok"}
    if sizes == {True}:
        return "quick (small sizes)"
    if sizes == {False}:
        return "full"
    return "quick and full sizes mixed (see the Runs table)" if sizes else "nothing ran"


def render_markdown(report: dict[str, Any], benchmarks: Sequence[Benchmark] | None = None) -> str:
    """``RESULTS.md`` from the runner's report (see :func:`main`).

    The runner lays the report out; the benchmarks (``benchmarks``, default: those
    discovered) render its pieces. Results of benchmarks without a spec are listed under Runs
    only.
    """
    benchmarks = benchmarks or BENCHMARKS
    m = report.get("machine", {})
    results: dict[str, dict[str, Any]] = report.get("results", {})
    ok = {name: e for name, e in results.items() if e.get("status") == "ok"}
    lines = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks.run` — do not edit by hand; rerun it. Speed figures "
        "are ratios measured in the same run on the same machine.",
        "",
        f"- date: {report.get('date')}",
        f"- command: `{report.get('command')}`",
        f"- git commit: {report.get('git_commit') or 'unknown'}",
        f"- machine: {m.get('cpu')}, {m.get('cores')} cores available "
        f"({m.get('cpu_count')} in all), {m.get('ram_gib')} GiB RAM, {m.get('platform')}",
        f"- python {m.get('python')}, torch {m.get('torch')}, GPU: {m.get('gpu')}",
        f"- load average (1, 5, 15 min) at start {m.get('load_average_at_start')}, at end "
        f"{m.get('load_average')}{_load_note(m)}",
        f"- mode: {_mode(results)}"
        f"{', GPU (bf16) where a stage uses a device' if report.get('gpu') else ', CPU'}",
    ]
    for src in report.get("reused_from", []):
        when = f" of {src['date']}" if src.get("date") else ""
        load = src.get("load_average")
        lines.append(
            f"- reused results from `{src['path']}`{when} (`{src.get('command')}`"
            + (f"; load average at start {load[0]}, at end {load[1]}" if load else "")
            + ")"
        )
    lines.append("")
    speed: list[Row] = []
    notes: list[str] = []
    for name, entry in ok.items():
        speed += speed_rows(name, entry["result"], benchmarks)
        notes += time_notes(name, entry["result"], m.get("cores"), benchmarks)
    if speed:
        lines += [
            "## Speed",
            "",
            "| stage | measured | limit / reference | ratio | goal | meets |",
            "|---|---|---|---|---|---|",
            *[f"| {' | '.join(row)} |" for row in speed],
            "",
        ]
    if notes:
        lines += [
            f"### Where the time goes (stages below {PURE_LIMIT_SHARE} of their limit)",
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
    sections = sorted(
        (b for b in benchmarks if b.section is not None and b.name in ok),
        key=lambda b: b.section.order,  # type: ignore[union-attr]
    )
    for bench in sections:
        section: Section = bench.section  # type: ignore[assignment]
        lines += [f"## {section.heading}", "", *section.render(ok[bench.name]), ""]
    others = [
        line
        for name, entry in ok.items()
        if (line := other_accuracy(name, entry["result"], benchmarks))
    ]
    if others:
        lines += ["## Other accuracy figures", "", *others, ""]
    lines += ["## Runs", "", "| benchmark | status | size | device | seconds | command |"]
    lines += ["|---|---|---|---|---|---|"]
    for name, entry in results.items():
        status = entry.get("status")
        size = "quick" if entry.get("quick") else "full"
        if status == "skipped":
            size = "–"
        elif entry.get("reused_from"):
            size += " (reused)"
        lines.append(
            f"| {name} | {status if status == 'ok' else f'**{status}**'} | {size} "
            f"| {entry.get('device', '–')} | {fmt(entry.get('seconds'))} "
            f"| `{entry.get('command', '')}` |"
        )
    failed = [(n, e) for n, e in results.items() if e.get("status") in ("failed", "skipped")]
    if failed:
        lines += ["", "### Failed or skipped", ""]
        for name, entry in failed:
            why = entry.get("error") or entry.get("reason") or ""
            lines.append(f"- **{name}** ({entry['status']}): {' '.join(str(why).split())}")
    return "\n".join(lines).rstrip() + "\n"


# -- hand-written text ---------------------------------------------------------------------

HAND_OPEN = "<!-- hand-written"
HAND_CLOSE = "<!-- /hand-written -->"


def _level(line: str) -> int:
    """The level of a markdown heading (``## x``: 2), 0 for any other line."""
    hashes = len(line) - len(line.lstrip("#"))
    return hashes if hashes and line[hashes : hashes + 1] == " " else 0


def hand_written(text: str) -> list[tuple[list[str], bool, list[str]]]:
    """The hand-written blocks of a ``RESULTS.md``: ``(headings, at_start, lines)`` each.

    ``headings`` are the generated headings the block sits under, outermost first;
    ``at_start`` says whether nothing generated lies between the innermost one and the block;
    ``lines`` run from the opening marker to the closing one (a block left open runs to the
    end of the text).
    """
    blocks: list[tuple[list[str], bool, list[str]]] = []
    trail: list[str] = []
    at_start = True
    block: list[str] | None = None
    for line in text.splitlines():
        if block is not None:
            block.append(line)
            if line.strip() == HAND_CLOSE:
                blocks.append((list(trail), at_start, block))
                block = None
        elif line.startswith(HAND_OPEN):
            block = [line]
            if line.rstrip().endswith(HAND_CLOSE):  # opened and closed on one line
                blocks.append((list(trail), at_start, block))
                block = None
        elif level := _level(line):
            trail = [*(h for h in trail if _level(h) < level), line]
            at_start = True
        elif line.strip():
            at_start = False
    if block is not None:
        blocks.append((list(trail), at_start, [*block, HAND_CLOSE]))
    return blocks


def carry_hand_written(markdown: str, previous: str) -> str:
    """``markdown`` with the hand-written blocks of ``previous`` put back.

    A block goes to the section of the innermost heading it sat under, at the section's
    start if it was there before anything generated, else at its end. When that heading is
    no longer generated, to the end of the section (``##`` or deeper) above it that still
    is; failing all, to the end of the report. ``markdown`` is a fresh rendering (no
    blocks).
    """
    lines = markdown.rstrip("\n").split("\n")
    headings = [i for i, line in enumerate(lines) if _level(line)]
    place: dict[int, list[list[str]]] = {}  # line index → the blocks that go before it
    for trail, at_start, block in hand_written(previous):
        found = [h for h in trail if h in lines and (h == trail[-1] or _level(h) > 1)]
        if not found:
            place.setdefault(len(lines), []).append(block)
            continue
        h = lines.index(found[-1])
        if found[-1] == trail[-1]:  # its own section, up to the next heading
            end = next((i for i in headings if i > h), len(lines))
        else:  # the end of a section above it, with its subsections
            at_start = False
            level = _level(lines[h])
            end = next((i for i in headings if i > h and _level(lines[i]) <= level), len(lines))
        at = h + 1 if at_start else end
        if at_start:  # before the section's first generated line
            while at < end and not lines[at].strip():
                at += 1
        else:  # after its last one
            while at > h + 1 and not lines[at - 1].strip():
                at -= 1
        place.setdefault(at, []).append(block)
    out: list[str] = []
    for i in range(len(lines) + 1):
        for block in place.get(i, []):
            out += [""] if out and out[-1].strip() else []
            out += block
        if i < len(lines):
            if i in place and lines[i].strip():
                out.append("")
            out.append(lines[i])
    return "\n".join(out).rstrip() + "\n"


def reuse_source(path: Path) -> dict[str, Any]:
    """Where reused results come from: a report's date, command and load, or a result line."""
    text = path.read_text()
    try:
        old = json.loads(text)
    except json.JSONDecodeError:
        old = last_json(text)
    m = old.get("machine")
    m = m if isinstance(m, dict) else {}  # a benchmark's line names only the architecture
    return {
        "path": str(path),
        "date": old.get("date"),
        "command": old.get("command") or f"python -m benchmarks.{old.get('benchmark')}",
        "load_average": [m.get("load_average_at_start"), m.get("load_average")] if m else None,
    }


def load_reuse(path: Path) -> dict[str, dict[str, Any]]:
    """Results to reuse: a runner report (``--json``), or one benchmark's JSON line."""
    text = path.read_text()
    try:
        old = json.loads(text)
    except json.JSONDecodeError:
        old = last_json(text)
    if "results" in old:
        return {k: {**v, "reused_from": str(path)} for k, v in old["results"].items()}
    if "benchmark" in old:
        entry = {
            "status": "ok",
            "result": old,
            "quick": bool(old.get("quick", False)),
            "device": old.get("device", "cpu"),
            "command": f"python -m benchmarks.{old['benchmark']} (from {path})",
            "seconds": old.get("seconds"),
            "reused_from": str(path),
        }
        return {old["benchmark"]: entry}
    raise ValueError(f"--reuse {path}: neither a benchmarks.run report nor a benchmark result")


# -- main ----------------------------------------------------------------------------------


def _options(benchmarks: Sequence[Benchmark]) -> dict[str, tuple[str, list[str]]]:
    """The runner options the benchmarks contribute: flag → (help, the benchmarks that take it)."""
    options: dict[str, tuple[str, list[str]]] = {}
    for bench in benchmarks:
        for option in bench.options:
            options.setdefault(option.flag, (option.help, []))[1].append(bench.name)
    return options


def describe(benchmarks: Sequence[Benchmark]) -> str:
    """Each benchmark's spec for ``--list``: what it measures, its goals, its command lines."""

    def show(b: Benchmark, quick: bool, gpu: bool) -> str:
        return " ".join(["python", *command(b, quick, gpu, {})[1:]])

    out = []
    for b in benchmarks:
        out += [f"{b.name}: {b.what}"]
        out += [f"  goal: {goal}" for goal in b.goals]
        out += [f"  full:  {show(b, False, False)}"]
        out += [f"  quick: {show(b, True, False) if b.quick is not None else 'left out'}"]
        out += [f"  --gpu: {show(b, False, True) if b.gpu is not None else 'no device'}"]
        out += [f"  option: {o.flag}: {o.help}" for o in b.options]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    benchmarks = discover()
    names = tuple(b.name for b in benchmarks)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, minutes on 2 cores")
    parser.add_argument("--gpu", action="store_true", help="device stages on CUDA with bf16")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=", ".join(names))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "out" / "results.json",
        help="where the JSON report is also written (for --reuse)",
    )  # fmt: skip
    parser.add_argument(
        "--reuse",
        type=Path,
        nargs="+",
        default=[],
        help="earlier --json reports or benchmark JSON lines: results of benchmarks not run",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing; render the --reuse results"
    )
    options = _options(benchmarks)
    for flag, (text, _) in options.items():
        parser.add_argument(flag, type=Path, help=text)
    parser.add_argument(
        "--list", action="store_true", help="show each benchmark's spec and run nothing"
    )
    args = parser.parse_args(argv)
    if args.list:
        print(describe(benchmarks))
        return 0
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print(
                "benchmarks.run: --gpu asked for, but torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run without "
                "--gpu for the CPU figures, or on a machine with a GPU.",
                file=sys.stderr,
            )
            return 2
    extra: dict[str, list[str]] = {}
    for flag, (_, takers) in options.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if not value.is_file():
            print(f"benchmarks.run: {flag} {value}: no such file")
            return 2
        for name in takers:
            extra.setdefault(name, []).extend([flag, str(value.resolve())])

    reused: dict[str, dict[str, Any]] = {}
    for path in args.reuse:  # later files win
        reused.update(load_reuse(path))
    sources = [reuse_source(path) for path in args.reuse]
    load_before = _load()

    selected = [b for b in benchmarks if args.only is None or b.name in args.only]
    if args.report_only:
        selected = []
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for bench in benchmarks:
        if bench not in selected:
            if bench.name in reused:
                results[bench.name] = reused[bench.name]
            continue
        if args.quick and bench.quick is None:
            results[bench.name] = {"status": "skipped", "reason": "left out of --quick runs"}
            if bench.name in reused and reused[bench.name].get("status") == "ok":
                results[bench.name] = reused[bench.name]
            continue
        print(f"benchmarks.run: {bench.name} …", file=sys.stderr, flush=True)
        results[bench.name] = run_one(bench, args.quick, args.gpu, extra)
        entry = results[bench.name]
        print(
            f"benchmarks.run: {bench.name} {entry['status']} in {entry.get('seconds')} s"
            + (f": {entry['error'][-300:]}" if entry["status"] == "failed" else ""),
            file=sys.stderr,
            flush=True,
        )
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m benchmarks.run", *(argv or sys.argv[1:])]),
        "git_commit": git_commit(),
        "machine": {**machine(), "load_average_at_start": load_before},
        "quick": args.quick,
        "gpu": args.gpu,
        "seconds": round(time.perf_counter() - start, 1),
        "reused_from": sources,
        "results": results,
    }
    markdown = render_markdown(report, benchmarks)
    if args.out.is_file():  # keep what was written by hand
        markdown = carry_hand_written(markdown, args.out.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report), flush=True)
    return 1 if any(e.get("status") == "failed" for e in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
