"""The command kit: what every ``histcode`` command is made of.

A command is a module with ``main(argv, prog) -> int`` (:mod:`histcode.cli` dispatches to it).
Whatever parses its options, it ends the same way, through this kit:

- :class:`CommandResult`: what the work returns (output folder, main result, details, exit
  status); :func:`finish` writes ``summary.json`` atomically (:func:`write_summary`) and prints
  the result as one JSON line on stdout.
- Exit status (the CLI contract): :data:`EXIT_OK` 0 everything succeeded; :data:`EXIT_PARTIAL`
  1 some inputs failed but the rest completed (the failures are listed); :data:`EXIT_USAGE` 2
  unusable arguments or inputs; :data:`EXIT_INTERRUPTED` 130 Ctrl-C (rerun to resume).
- Usage errors: the error types of :data:`USAGE_ERRORS` (:mod:`histcode.errors`) print one
  line, ``<prog>: error: <message>`` (:func:`usage_error`), and exit 2. Anything else is a bug
  and propagates with its traceback (exit 1 from the console script) — a ``KeyError`` too.
- Parsers (jsonargparse): :func:`with_option_hints` makes a parse error one line with the
  closest option (``Did you mean 'trainer.max_steps'?``) and a pointer to ``--help``, instead
  of the usage text before it; :func:`gather_list_options` lets list options take several
  values the shell way.
- :func:`run_function` turns a typed function returning a :class:`CommandResult` into a whole
  command (``tile``, ``embed``, ``synth``, ``cohort``, ``heatmap``, ``demo``): its parameters
  and Google docstring become the options and ``--help``, with ``--config`` and
  ``--print_config``. :func:`adapter` makes that function from a library function (its
  parameters and their docs defined once, on the library function) and a function that turns
  the library's return value into the :class:`CommandResult`.

``finetune`` builds its own parser (typed option groups and every ``pytorch_lightning.Trainer``
argument) and ``pretrain`` keeps ``LightningCLI`` as its parser (Lightning's ``--trainer.*``,
``--model.*``, checkpoints and resume); both give it :func:`with_option_hints` and end through
:func:`usage_error` and :func:`finish`. ``registry`` and ``config`` only read: they print no
result line and write no summary, but their exit statuses and errors are these.

This module imports only the standard library at import time (``histcode --help`` stays fast).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import operator
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from histcode import __version__
from histcode.errors import NotFoundError, OutputBusyError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2
#: Ctrl-C: the command stopped where it was; rerunning it resumes.
EXIT_INTERRUPTED = 130

#: Errors that mean "the arguments or inputs as given are unusable": exit 2, message only.
#: Not ``KeyError``: a missing key is a bug (traceback); a missing named thing raises
#: :class:`~histcode.errors.NotFoundError`.
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
    NotFoundError,
    OutputBusyError,
)


@dataclass
class CommandResult:
    """What a command's work returns.

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


def usage_error(prog: str, error: BaseException | str) -> int:
    """Print ``<prog>: error: <message>`` on stderr (one line, no usage text).

    Returns:
        :data:`EXIT_USAGE`, for ``return usage_error(prog, err)``.
    """
    print(f"{prog}: error: {error}", file=sys.stderr)
    return EXIT_USAGE


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


def finish(outcome: CommandResult, command: str, config: dict[str, Any], seconds: float) -> int:
    """End a command: write its ``summary.json``, print its result as one JSON line.

    Args:
        outcome: what the work returned.
        command: the command's name (``tile``, ``pretrain``, …), recorded in the summary.
        config: the resolved options, recorded in the summary.
        seconds: how long the work took.

    Returns:
        The command's exit status (``outcome.exit_code``).
    """
    write_summary(outcome.out_dir, command, config, outcome, seconds)
    print(json.dumps(outcome.result, default=str), flush=True)
    return outcome.exit_code


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
    """Make a jsonargparse parser's errors short: one line, the closest option, ``--help``.

    A parse error prints ``<prog>: error: <message>[. Did you mean 'x'?]`` and ``See '<prog>
    --help' for the options.`` on stderr and exits with status 2 (``SystemExit``), instead of
    jsonargparse's usage text (60–100 lines for ``pretrain`` and ``finetune``) before the
    message. A parser that does not exit on errors (``exit_on_error=False``, jsonargparse's
    debug mode) keeps raising its ``ArgumentError``, with the hint in the message.

    Returns:
        The same parser.
    """
    parser.error = _ConciseErrors(parser)
    return parser


class _ConciseErrors:
    """A parser's ``error`` made short (:func:`with_option_hints`).

    A module-level class rather than a closure so that the parser still pickles: Lightning's
    ``ddp_spawn`` sends the trainer, and with it the CLI's config callback and its parser, to
    each spawned process.
    """

    def __init__(self, parser: Any) -> None:
        self.parser = parser

    def __call__(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        parser = self.parser
        keys = [
            a.dest
            for a in parser._actions
            if a.dest not in ("help", "config") and not a.dest.endswith(".help")
        ]
        message = message + option_hint(message, keys)
        if not parser.exit_on_error or _debug_mode():
            type(parser).error(parser, message, ex)  # the class's own error: it raises
            raise AssertionError("unreachable: the parser's error raises")
        prog = (getattr(ex, "subcommand_parser", None) or parser).prog.replace(" [options]", "")
        print(f"{prog}: error: {message}\nSee '{prog} --help' for the options.", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _debug_mode() -> bool:
    """jsonargparse's debug mode (``JSONARGPARSE_DEBUG``): its parse errors raise."""
    try:
        from jsonargparse._common import debug_mode_active
    except ImportError:  # a jsonargparse without it: the environment variable is the switch
        import os

        return bool(os.environ.get("JSONARGPARSE_DEBUG"))
    return bool(debug_mode_active())


def list_parameters(function: Callable[..., Any]) -> set[str]:
    """The parameters of ``function`` that take a list (for :func:`gather_list_options`)."""
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


def run_function(
    function: Callable[..., CommandResult], argv: Sequence[str], prog: str, command: str
) -> int:
    """Run ``function`` as a command: parse, call, write ``summary.json``, print a JSON line.

    The function's typed parameters and Google docstring become the options and ``--help``;
    ``--config file.yaml`` and ``--print_config`` come with it.

    Returns:
        The exit status (see the module docstring).
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    doc = inspect.getdoc(function) or ""
    parser = ArgumentParser(prog=prog, description=doc.split("\n\n")[0], exit_on_error=True)
    with_option_hints(parser)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with options.")
    parser.add_function_arguments(function, fail_untyped=True, as_group=False)
    cfg = parser.parse_args(gather_list_options(argv, list_parameters(function)))
    config = json.loads(json.dumps(cfg.as_dict(), default=str))
    config.pop("config", None)
    kwargs = {k: v for k, v in parser.instantiate(cfg).as_dict().items() if k != "config"}
    start = time.perf_counter()
    try:
        outcome = function(**kwargs)
    except USAGE_ERRORS as err:
        return usage_error(prog, err)
    return finish(outcome, command, config, time.perf_counter() - start)


def adapter(
    library: Callable[..., Any],
    outcome: Callable[..., CommandResult],
    *,
    expand: Sequence[str] = (),
    command_types: dict[str, Any] | None = None,
    skip: Sequence[str] = (),
) -> Callable[..., CommandResult]:
    """A command function for :func:`run_function` made from a library function.

    The command takes the library function's parameters, defaults and docstring (its first
    paragraph is the command's description, its ``Args`` the options' help), calls it, and
    returns ``outcome(returned, **arguments)``. On a command line every value is text, so a
    parameter typed ``Path | str`` (a library accepting either) is parsed as a ``Path``.

    Args:
        library: the library function; every parameter typed, documented in ``Args``.
        outcome: ``(returned, **arguments) -> CommandResult``: the result line, the details
            for ``summary.json`` and the exit status.
        expand: parameters of the library typed with a dataclass whose fields become options
            of their own, in their place (``--mpp`` rather than ``--params.mpp``), documented
            by the dataclass's ``Attributes``; the command builds the dataclass from them.
        command_types: the command-line type of a parameter where it is narrower than the library's
            (``{"slides": list[str]}``).
        skip: parameters that are not options (callbacks); the library's defaults apply.

    Returns:
        The command function.
    """
    hints = typing.get_type_hints(library)
    docs = _doc_entries(library, "Args")
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[Any, list[str]]] = {}
    for p in inspect.signature(library).parameters.values():
        if p.name in skip:
            continue
        if p.name not in expand:
            params.append(p.replace(annotation=_command_line_type(hints[p.name])))
            continue
        cls = hints[p.name]
        field_hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        groups[p.name] = (cls, [f.name for f in fields])
        docs |= _doc_entries(cls, "Attributes")
        params += [
            inspect.Parameter(f.name, p.kind, default=f.default, annotation=field_hints[f.name])
            for f in fields
        ]
    params = [p.replace(annotation=(command_types or {}).get(p.name, p.annotation)) for p in params]

    @functools.wraps(library)
    def command(**arguments: Any) -> CommandResult:
        called = {k: v for k, v in arguments.items() if not any(k in g[1] for g in groups.values())}
        for name, (cls, names) in groups.items():
            called[name] = cls(**{k: arguments[k] for k in names})
        # looked up at each call: replacing it in its module (a test's monkeypatch) reaches here
        current = getattr(sys.modules[library.__module__], library.__name__, library)
        return outcome(current(**called), **arguments)

    command.__signature__ = inspect.Signature(params, return_annotation=CommandResult)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": CommandResult}
    if groups:
        description = (inspect.getdoc(library) or "").split("\n\n")[0]
        entries = "".join(f"\n    {p.name}: {docs[p.name]}" for p in params if p.name in docs)
        command.__doc__ = f"{description}\n\nArgs:{entries}\n"
    return command


def _doc_entries(obj: Any, section: str) -> dict[str, str]:
    """The entries of a Google docstring section (``Args``, ``Attributes``): name -> text."""
    entries: dict[str, str] = {}
    inside, name = False, None
    for line in (inspect.getdoc(obj) or "").splitlines():
        if line and not line.startswith(" "):
            inside, name = line.strip() == f"{section}:", None
        elif inside and (entry := re.match(r" {4}(\w+)(?: \(.*?\))?: (.*)", line)):
            name = entry[1]
            entries[name] = entry[2]
        elif inside and name and line.strip():
            entries[name] += " " + line.strip()
    return entries


def _command_line_type(hint: Any) -> Any:
    """``Path | str`` (or ``str | Path``, with or without ``None``) -> ``Path`` (``| None``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if Path in options and str in options:
            return functools.reduce(operator.or_, [o for o in options if o is not str])
    return hint
