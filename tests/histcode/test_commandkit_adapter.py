"""commandkit.adapter: a command made from a library function keeps one parameter list."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from histcode.commandkit import CommandResult, adapter, run_function


@dataclass(frozen=True)
class Knobs:
    """Knobs.

    Attributes:
        size: the size.
        mode: the mode.
    """

    size: int = 4
    mode: str = "a"


def work(
    out: Path | str,
    knobs: Knobs = Knobs(),
    names: list[str] | None = None,
    *,
    loud: bool = False,
    callback: object = None,
) -> dict:
    """Do the work.

    Args:
        out: where.
        knobs: the knobs.
        names: some names.
        loud: say more.
        callback: not an option.
    """
    return {"out": out, "knobs": knobs, "names": names, "loud": loud}


def outcome(done: dict, out: Path, **arguments: object) -> CommandResult:
    result = {k: str(v) for k, v in done.items()} | {"size": arguments["size"]}
    return CommandResult(Path(out), result)


def test_options_docs_and_call(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    command = adapter(work, outcome, expand=["knobs"], skip=["callback"])
    with pytest.raises(SystemExit):
        run_function(command, ["--help"], "prog", "work")
    help_text = capsys.readouterr().out
    for option, text in [("--out", "where."), ("--size", "the size."), ("--loud", "say more.")]:
        assert option in help_text and text in help_text
    assert "--knobs" not in help_text and "--callback" not in help_text
    assert "Do the work." in help_text
    argv = ["--out", str(tmp_path), "--size", "7", "--names", "x", "y"]
    assert run_function(command, argv, "prog", "work") == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["knobs"] == "Knobs(size=7, mode='a')" and line["size"] == 7
    assert line["names"] == "['x', 'y']" and line["out"] == str(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["size"] == 7 and "callback" not in summary["config"]
