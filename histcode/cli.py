"""The ``histcode`` command: one entry point, one subcommand per pipeline step.

Each subcommand lives in its own module with a ``main(argv, prog) -> int``, built with the
command kit (:mod:`histcode.commandkit`: result, exit codes, ``summary.json``, usage errors);
this module only dispatches (imports are lazy, so ``histcode --help`` starts fast), and
:func:`run_captured` runs a command in this process for the demo and the benchmarks.

Exit status (the CLI contract): 0 everything succeeded; 1 some inputs failed but the rest
completed (the failures are listed); 2 unusable arguments.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import io
import json
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from histcode import __version__
from histcode.commandkit import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, usage_error

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
        return usage_error(
            "histcode", f"unknown command {name!r}.{hint} (histcode --help lists them)"
        )
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if name != "config":  # --config NAME: a shipped config when no such file exists
        from histcode.configfiles import UnknownConfigError, resolve_config_args

        try:
            rest = resolve_config_args(rest, name)
        except UnknownConfigError as err:
            return usage_error(f"histcode {name}", err)
    module = importlib.import_module(found[name][0])
    try:
        return int(module.main(rest, prog=f"histcode {name}"))
    except KeyboardInterrupt:
        print("histcode: interrupted; rerun the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED


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
