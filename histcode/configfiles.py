"""``histcode config``: list and print the YAML configs shipped with histcode.

::

    histcode config list              every shipped config: name and first comment line
    histcode config show NAME         print one (e.g. pretrain/simclr, deg) to copy and edit

The repository's ``histcode/configs/`` folder is the package ``histcode.configs``, so
``--config`` of every command also takes a shipped config by name when no file of that name
exists (a file path always wins): ``--config simclr``, ``--config pretrain/simclr`` or the
README's ``--config configs/pretrain/simclr.yaml`` all work from any folder, the repository's
root included (there ``configs/pretrain/simclr.yaml`` is not a file: it names the shipped
``histcode/configs/pretrain/simclr.yaml``). A bare name that two stages share (``cpu_smoke``)
is the running command's own (``configs/<command>/``).

These commands only read: they write no ``summary.json``. Exit status: 0 ok, 2 unknown name.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from histcode.commandkit import EXIT_OK, EXIT_USAGE, usage_error

#: The package of the shipped configs (``histcode/configs/``; YAML as package data).
CONFIG_PACKAGE = "histcode.configs"
_SUFFIXES = (".yaml", ".yml")


class UnknownConfigError(ValueError):
    """``--config NAME`` is neither a file nor a shipped config."""


def config_root() -> Path:
    """The folder of the shipped configs (``histcode/configs/``)."""
    return Path(str(resources.files(CONFIG_PACKAGE)))


def shipped_configs() -> dict[str, Path]:
    """Shipped configs by name.

    Returns:
        ``stage/stem`` (e.g. ``pretrain/simclr``) → path, sorted by name.
    """
    root = config_root()
    found = {
        path.relative_to(root).with_suffix("").as_posix(): path
        for path in root.rglob("*")
        if path.suffix in _SUFFIXES and path.is_file()
    }
    return dict(sorted(found.items()))


def resolve_config(value: str, command: str | None = None) -> Path:
    """The shipped config that ``value`` names.

    Args:
        value: ``pretrain/simclr``, ``simclr``, ``simclr.yaml``,
            ``configs/pretrain/simclr.yaml`` or ``histcode/configs/pretrain/simclr.yaml``
            (the repository path, from any folder).
        command: the running command (``pretrain``, ``finetune``): a bare name found under
            several stages is this command's.

    Returns:
        The config's path.

    Raises:
        UnknownConfigError: no shipped config has that name, or a bare name is ambiguous;
            lists the shipped names.
    """
    configs = shipped_configs()
    name = Path(value).as_posix()
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    name = name.removeprefix("./").removeprefix("histcode/").removeprefix("configs/")
    if name in configs:
        return configs[name]
    same_stem = [n for n in configs if n.rsplit("/", 1)[-1] == name]
    own = [n for n in same_stem if n.split("/", 1)[0] == command]
    chosen = own if len(own) == 1 else same_stem
    if len(chosen) == 1:
        return configs[chosen[0]]
    if chosen:
        raise UnknownConfigError(
            f"config {value!r} is not a file and names several shipped configs: "
            f"{', '.join(chosen)}; pass one of those names"
        )
    names = [*configs, *{n.rsplit("/", 1)[-1] for n in configs}]
    close = difflib.get_close_matches(name, names, n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise UnknownConfigError(
        f"config {value!r} is neither a file nor a shipped config.{hint} Shipped: "
        f"{', '.join(configs)} (histcode config list); or pass the path of a YAML file."
    )


def resolve_config_args(argv: Sequence[str], command: str | None = None) -> list[str]:
    """Replace ``--config NAME`` values that are not files by the shipped config's path.

    Args:
        argv: a command's arguments (``--config X`` and ``--config=X`` forms).
        command: the running command, for bare names (:func:`resolve_config`).

    Returns:
        The arguments, with every such value replaced; file paths are left alone.

    Raises:
        UnknownConfigError: a ``--config`` value is neither a file nor a shipped config.
    """

    def resolved(value: str) -> str:
        if Path(value).exists() or value.lstrip().startswith(("{", "[")) or "\n" in value:
            return value  # a file, or YAML given inline
        return str(resolve_config(value, command))

    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--config" and i + 1 < len(argv):
            out += [token, resolved(argv[i + 1])]
            i += 2
            continue
        if token.startswith("--config="):
            token = "--config=" + resolved(token.split("=", 1)[1])
        out.append(token)
        i += 1
    return out


def _describe(path: Path) -> str:
    """The first comment line of a config (its one-line description)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


def main(argv: Sequence[str] | None = None, prog: str = "histcode config") -> int:
    """Run ``histcode config list | show NAME``.

    Returns:
        Exit status: 0 ok, 2 unknown subcommand or config.
    """
    argv = list(argv or [])
    usage = f"usage: {prog} list | show NAME   (NAME e.g. pretrain/simclr, finetune/deg, deg)"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{(__doc__ or '').strip()}\n\n{usage}")
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] == "list" and len(argv) == 1:
        configs = shipped_configs()
        width = max(map(len, configs), default=0)
        for name, path in configs.items():
            print(f"{name:<{width}}  {_describe(path)}")
        return EXIT_OK
    if argv[0] == "show" and len(argv) == 2:
        try:
            path = resolve_config(argv[1])
        except UnknownConfigError as err:
            return usage_error(prog, err)
        sys.stdout.write(path.read_text(encoding="utf-8"))
        return EXIT_OK
    print(f"{prog}: error: unknown arguments {' '.join(argv)!r}\n{usage}", file=sys.stderr)
    return EXIT_USAGE
