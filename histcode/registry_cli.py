"""``histcode registry``: list, show and verify checkpoints in the registry.

::

    histcode registry list   [--root DIR] [--json]
    histcode registry show   REF [--root DIR] [--json]
    histcode registry verify [REF] [--root DIR] [--json]     (no REF: every checkpoint)

REF is ``name``, ``name@latest`` or ``name@3``. The root defaults to ``$HISTCODE_REGISTRY``,
else ``./registry``. These commands only read the registry: they write no ``summary.json``.
By default they print a human-readable table; ``--json`` prints one JSON line instead. The
parser (three subcommands) is this module's; errors and exit statuses are the command kit's
(:mod:`histcode.commandkit`).

Exit status: 0 ok; 1 a checkpoint failed verification or is unreadable (the reason is
printed); 2 unusable arguments, e.g. an unknown or malformed ref (the message lists what
exists).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from histcode.commandkit import EXIT_OK, EXIT_USAGE, usage_error, with_option_hints
from histcode.commandkit import EXIT_PARTIAL as EXIT_FAILED
from histcode.registry import (
    REGISTRY_ENV,
    CorruptCheckpointError,
    Registry,
    UnknownRefError,
)

_ROOT_HELP = f"Registry folder (default: ${REGISTRY_ENV} if set, else ./registry)."
_JSON_HELP = "Print one JSON line instead of a table."
_REF_HELP = "Checkpoint: NAME, NAME@latest or NAME@VERSION (e.g. simclr-r50@3)."


def _parser(prog: str) -> Any:
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    def command(description: str, ref: str | None) -> ArgumentParser:
        sub = with_option_hints(ArgumentParser(description=description))
        sub.add_argument("--config", action=ActionConfigFile, help="YAML file with options.")
        if ref == "required":
            sub.add_argument("ref", type=str, help=_REF_HELP)
        elif ref == "optional":
            sub.add_argument("ref", type=str | None, nargs="?", default=None, help=_REF_HELP)
        sub.add_argument("--root", type=str | None, default=None, help=_ROOT_HELP)
        sub.add_argument("--json", action=ActionYesNo, default=False, help=_JSON_HELP)
        return sub

    parser = with_option_hints(
        ArgumentParser(
            prog=prog,
            description="List, show and verify checkpoints in the histcode registry.",
            epilog=f"The registry root defaults to ${REGISTRY_ENV} if set, else ./registry.",
        )
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with options.")
    commands = parser.add_subcommands(required=True, dest="command")
    commands.add_subcommand(
        "list",
        command("List every checkpoint, by name and version.", None),
        help="list checkpoints",
    )
    commands.add_subcommand(
        "show", command("Show the card of one checkpoint.", "required"), help="show a card"
    )
    commands.add_subcommand(
        "verify",
        command(
            "Check that a checkpoint's weights match the sha256 in its card (every checkpoint "
            "when REF is omitted). Exit status 1 when one fails.",
            "optional",
        ),
        help="check sha256 of the weights",
    )
    return parser


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def _list(registry: Registry, as_json: bool) -> int:
    cards = registry.list()
    if as_json:
        entries = [{"ref": c.ref, **c.to_dict()} for c in cards]
        print(json.dumps({"root": str(registry.root), "checkpoints": entries}))
        return EXIT_OK
    if not cards:
        print(f"no checkpoints in {registry.root}")
        return EXIT_OK
    rows = [
        [
            c.ref,
            c.kind,
            c.architecture,
            "" if c.input_spec is None else f"{c.input_spec.mpp:g}",
            "" if c.input_spec is None else str(c.input_spec.tile_size),
            c.created,
            c.sha256[:12],
        ]
        for c in cards
    ]
    print(_table(rows, ["REF", "KIND", "ARCHITECTURE", "MPP", "TILE", "CREATED", "SHA256"]))
    print(f"{len(cards)} checkpoint(s) in {registry.root}")
    return EXIT_OK


def _show(registry: Registry, ref: str, as_json: bool) -> int:
    resolved = registry.resolve(ref)
    card = registry.card(ref)
    if as_json:
        print(json.dumps({"ref": card.ref, "path": str(resolved.path), "card": card.to_dict()}))
        return EXIT_OK
    print(f"{card.ref}  ({resolved.path})")
    for key, value in card.to_dict().items():
        text = value if isinstance(value, str) else json.dumps(value)
        print(f"  {key:<16} {text}")
    return EXIT_OK


def _verify(registry: Registry, ref: str | None, as_json: bool) -> int:
    if ref is not None:
        reports = [registry.verify(ref)]
    else:
        refs = [f"{n}@{v}" for n in registry.names() for v in registry.versions(n)]
        reports = [registry.verify(r) for r in refs]
    ok = all(r.ok for r in reports)
    if as_json:
        if ref is not None:
            payload = reports[0].to_dict()
        else:
            results = [r.to_dict() for r in reports]
            payload = {"ok": ok, "root": str(registry.root), "results": results}
        print(json.dumps(payload))
    else:
        for report in reports:
            if report.ok:
                print(f"ok      {report.ref}  sha256 {report.actual_sha256}")
            else:
                print(f"FAILED  {report.ref}: {report.reason}")
        if ref is None:
            failed = sum(not r.ok for r in reports)
            print(f"{len(reports)} checkpoint(s) in {registry.root}, {failed} failed")
    return EXIT_OK if ok else EXIT_FAILED


def main(argv: Sequence[str] | None = None, prog: str = "histcode registry") -> int:
    """Run ``histcode registry`` with ``argv`` (without the command names).

    Returns:
        The exit status: 0 ok, 1 verification failed or a checkpoint is unreadable, 2 unusable
        arguments (unknown or malformed ref, bad options).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(prog)
    try:
        cfg = parser.parse_args(argv)
    except SystemExit as done:  # --help, --print_config, or a parse error (already printed)
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    command = cfg.command
    options = cfg[command]
    registry = Registry(options.root)
    try:
        if command == "list":
            return _list(registry, options.json)
        if command == "show":
            return _show(registry, options.ref, options.json)
        return _verify(registry, options.ref, options.json)
    except UnknownRefError as err:
        return usage_error(prog, err)
    except CorruptCheckpointError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, NotADirectoryError) as err:
        return usage_error(prog, err)
