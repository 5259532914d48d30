"""The ``histcode`` command: one entry point, one subcommand per pipeline step.

Each subcommand lives in its own module with a ``main(argv, prog) -> int``; this module only
dispatches (imports are lazy, so ``histcode --help`` starts fast) and holds the runner that
turns a typed Python function into a subcommand with ``--config``, ``--help`` and
``--print_config`` (jsonargparse), a ``summary.json`` and a final JSON line.

Exit status (the CLI contract): 0 everything succeeded; 1 some inputs failed but the rest
completed (the failures are listed); 2 unusable arguments.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import io
import json
import logging
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from histcode import __version__

#: Commands of the core: name → (module holding ``main``, one-line description). The stages
#: (``pretrain``, ``finetune``) add theirs through the ``histcode.commands`` entry-point group
#: in ``pyproject.toml``, so that this package never imports them (the stages depend on the
#: core, never the reverse).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("histcode.synth.command", "write a synthetic cohort: slides, expression, truth"),
    "tile": ("histcode.tiling", "segment tissue and lay a tile grid at a target µm/px"),
    "embed": ("histcode.embedding", "run a frozen encoder over every tile → features.zarr"),
    "demo": (
        "histcode.demo",
        "the whole pipeline on a synthetic cohort (or --cohort DIR) vs the naive baseline",
    ),
    "registry": ("histcode.registry_cli", "list, show and verify checkpoints in the registry"),
    "config": ("histcode.configfiles", "list and print the shipped YAML configs (--config NAME)"),
}

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2
ENTRY_POINT_GROUP = "histcode.commands"


def commands() -> dict[str, tuple[str, str | None]]:
    """All commands: the core's and those the stages register as entry points.

    Returns:
        name → (module, description or None when only the module's docstring has it).
    """
    found: dict[str, tuple[str, str | None]] = dict(SUBCOMMANDS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, (ep.value.split(":")[0], None))
    return found


def _describe(module: str) -> str:
    """First line of a command module's docstring (command modules import lazily)."""
    try:
        doc = importlib.import_module(module).__doc__ or ""
    except ImportError as err:
        return f"(unavailable: {err})"
    return doc.strip().splitlines()[0].rstrip(".") if doc.strip() else ""


@dataclass
class CommandResult:
    """What a subcommand's function returns to the runner.

    Attributes:
        out_dir: folder receiving ``summary.json`` (the command's output folder).
        result: the main result, printed as the final JSON line and kept in the summary.
        details: anything else for ``summary.json`` (per-item status, failures, …).
        exit_code: 0, or 1 when some inputs failed but the rest completed.
        summary_name: file name of the summary (shards of one run each write their own).
    """

    out_dir: Path
    result: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    exit_code: int = EXIT_OK
    summary_name: str = "summary.json"


class OutputBusyError(RuntimeError):
    """An output is being written by another run (it holds the lock): exit 2, message only."""


#: Errors that mean "the arguments or inputs as given are unusable": exit 2, message only.
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
    KeyError,
    OutputBusyError,
)


_UNKNOWN_OPTION = re.compile(
    r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"
    r"|Option '(?P<option>[^']+)' is not accepted"
    r"|unrecognized arguments: --(?P<arg>[^\s=]+)"
)


def option_hint(message: str, keys: Sequence[str]) -> str:
    """``" Did you mean 'trainer.max_steps'?"`` for a parser error about an unknown option.

    Args:
        message: the parser's error message.
        keys: the options the parser accepts (dotted, without ``--``).

    Returns:
        The hint, or ``""`` when the message is about something else or nothing is close.
    """
    found = _UNKNOWN_OPTION.search(message)
    if not found:
        return ""
    key = f"{found['group']}.{found['key']}" if found["group"] else found["option"] or found["arg"]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f". Did you mean {close[0]!r}?" if close else ""


def with_option_hints(parser: Any) -> Any:
    """Make a jsonargparse parser's errors about unknown options suggest the closest option.

    Returns:
        The same parser.
    """
    error = parser.error

    def hinted(message: str, ex: Exception | None = None) -> typing.NoReturn:
        keys = [
            a.dest
            for a in parser._actions
            if a.dest not in ("help", "config") and not a.dest.endswith(".help")
        ]
        error(message + option_hint(message, keys), ex)
        raise AssertionError("unreachable: the parser's error exits or raises")

    parser.error = hinted
    return parser


def _list_parameters(function: Callable[..., Any]) -> set[str]:
    hints = typing.get_type_hints(function)
    names = set()
    for name in inspect.signature(function).parameters:
        hint = hints.get(name)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = typing.get_args(hint) if union else (hint,)
        if any(typing.get_origin(o) in (list, Sequence) or o is list for o in options):
            names.add(name)
    return names


def gather_list_options(argv: Sequence[str], names: set[str]) -> list[str]:
    """Let list options take several values the shell way: ``--slides a.svs b.svs``.

    jsonargparse expects a list as one JSON/YAML value (``--slides '[a.svs, b.svs]'``); this
    turns ``--NAME v1 v2 …`` (up to the next ``-…`` token) into that form.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        key = token[2:] if token.startswith("--") else None
        if key in names and "=" not in token:
            values = []
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            if len(values) == 1 and values[0].lstrip().startswith("["):
                out += [token, values[0]]
            else:
                out += [token, json.dumps(values)]
            continue
        out.append(token)
        i += 1
    return out


def write_summary(
    out_dir: Path, command: str, config: dict[str, Any], outcome: CommandResult, seconds: float
) -> Path:
    """Write ``summary.json`` (what ran, with which settings, what came out) atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "command": f"histcode {command}",
        "histcode_version": __version__,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "exit_code": outcome.exit_code,
        "config": config,
        "result": outcome.result,
        **outcome.details,
    }
    path = out_dir / outcome.summary_name
    tmp = path.with_name(f".summary.json.{id(summary)}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def run_function(
    function: Callable[..., CommandResult], argv: Sequence[str], prog: str, command: str
) -> int:
    """Run ``function`` as a subcommand: parse, call, write ``summary.json``, print a JSON line.

    The function's typed parameters and Google docstring become the options and ``--help``;
    ``--config file.yaml`` and ``--print_config`` come with it.

    Returns:
        The exit status (see module docstring).
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    doc = inspect.getdoc(function) or ""
    parser = ArgumentParser(prog=prog, description=doc.split("\n\n")[0], exit_on_error=True)
    with_option_hints(parser)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with options.")
    parser.add_function_arguments(function, fail_untyped=True, as_group=False)
    cfg = parser.parse_args(gather_list_options(argv, _list_parameters(function)))
    config = json.loads(json.dumps(cfg.as_dict(), default=str))
    config.pop("config", None)
    kwargs = {k: v for k, v in parser.instantiate(cfg).as_dict().items() if k != "config"}
    start = time.perf_counter()
    try:
        outcome = function(**kwargs)
    except USAGE_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    write_summary(outcome.out_dir, command, config, outcome, time.perf_counter() - start)
    print(json.dumps(outcome.result, default=str), flush=True)
    return outcome.exit_code


def _usage() -> str:
    found = commands()
    width = max(map(len, found))
    lines = [
        f"histcode {__version__}: self-supervised computational pathology",
        "",
        "usage: histcode <command> [options]   (histcode <command> --help for its options)",
        "",
        "commands:",
        *(
            f"  {name:<{width}}  {text or _describe(module)}"
            for name, (module, text) in found.items()
        ),
        "",
        "Every command takes --config file.yaml and --print_config, writes summary.json in its",
        "output folder and ends by printing one JSON line. Exit status: 0 ok, 1 some inputs",
        "failed (listed), 2 unusable arguments.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``histcode`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] == "--version":
        print(__version__)
        return EXIT_OK
    name, rest = argv[0], argv[1:]
    found = commands()
    if name not in found:
        close = difflib.get_close_matches(name, found, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"histcode: unknown command {name!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if name != "config":  # --config NAME: a shipped config when no such file exists
        from histcode.configfiles import UnknownConfigError, resolve_config_args

        try:
            rest = resolve_config_args(rest, name)
        except UnknownConfigError as err:
            print(f"histcode {name}: error: {err}", file=sys.stderr)
            return EXIT_USAGE
    module = importlib.import_module(found[name][0])
    try:
        return int(module.main(rest, prog=f"histcode {name}"))
    except KeyboardInterrupt:
        print("histcode: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


def run_captured(argv: Sequence[str], quiet: bool = False) -> tuple[int, dict[str, Any] | None]:
    """Run ``histcode *argv`` in this process; return its exit status and final JSON line.

    Every command ends by printing one JSON line on stdout (its result); this is how the demo
    and the benchmarks chain commands without parsing anything else.

    Args:
        argv: the command and its options, e.g. ``["tile", "--slides", "s/", "--out", "t"]``.
        quiet: also swallow the command's stderr (logs, progress bars).

    Returns:
        (exit status, the parsed final stdout line, or None when there is none).
    """
    stdout = io.StringIO()
    silence = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    with contextlib.redirect_stdout(stdout), silence:
        code = main(list(argv))
    lines = stdout.getvalue().strip().splitlines()
    try:
        return code, json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return code, None


if __name__ == "__main__":
    sys.exit(main())
