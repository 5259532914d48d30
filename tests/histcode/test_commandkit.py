"""The command kit: usage errors are one line and exit 2; a bug is a traceback, not exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from histcode.cli import main as cli_main
from histcode.commandkit import (
    EXIT_PARTIAL,
    EXIT_USAGE,
    USAGE_ERRORS,
    CommandResult,
    run_function,
)
from histcode.errors import NotFoundError, OutputBusyError


def _buggy(out: Path) -> CommandResult:
    """A command whose work has a bug: a missing dict key.

    Args:
        out: output folder.
    """
    return CommandResult(out, {"value": {}["missing"]})


def _missing(out: Path) -> CommandResult:
    """A command asked for a slide the store does not hold.

    Args:
        out: output folder.
    """
    raise NotFoundError(f"{out} has no slide 'x' (it holds: a, b)")


def _partial(out: Path, items: list[str]) -> CommandResult:
    """A command where some inputs failed.

    Args:
        out: output folder.
        items: the inputs.
    """
    return CommandResult(out, {"items": items}, {"failed": items[1:]}, EXIT_PARTIAL)


def test_key_error_is_a_bug_not_a_usage_error(tmp_path: Path) -> None:
    assert KeyError not in USAGE_ERRORS and NotFoundError in USAGE_ERRORS
    assert OutputBusyError in USAGE_ERRORS
    with pytest.raises(KeyError, match="missing"):
        run_function(_buggy, ["--out", str(tmp_path)], "histcode buggy", "buggy")
    assert not (tmp_path / "summary.json").exists()


def test_not_found_is_a_usage_error_of_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_function(_missing, ["--out", str(tmp_path)], "histcode missing", "missing")
    captured = capsys.readouterr()
    assert code == EXIT_USAGE and captured.out == ""
    assert (
        captured.err == f"histcode missing: error: {tmp_path} has no slide 'x' (it holds: a, b)\n"
    )
    assert isinstance(NotFoundError("x"), KeyError)  # callers that catch KeyError still do
    assert str(NotFoundError("plain message")) == "plain message"  # not quoted as KeyError's


def test_result_summary_and_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--items", "a", "b"]
    assert run_function(_partial, argv, "histcode partial", "partial") == EXIT_PARTIAL
    line = json.loads(capsys.readouterr().out.strip())
    assert line == {"items": ["a", "b"]}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["command"] == "histcode partial" and summary["exit_code"] == EXIT_PARTIAL
    assert summary["failed"] == ["b"] and summary["config"]["items"] == ["a", "b"]


def test_a_bug_in_a_command_ends_with_a_traceback(tmp_path: Path) -> None:
    """Through the console entry point: a KeyError inside ``histcode tile`` is a crash (exit 1,
    traceback), not ``error: 'key'`` and exit 2."""
    code = (
        "import sys, histcode.tiling as t\n"
        "def broken(*a, **k):\n"
        "    return {}['no_such_key']\n"
        "t.tile_slides = broken\n"
        "from histcode.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["tile", "--slides", str(tmp_path), "--out", str(tmp_path / "t.zarr")]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" in done.stderr and "KeyError: 'no_such_key'" in done.stderr
    assert "error: 'no_such_key'" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["tile", "--slides", "a.svs", "--out", "t.zarr", "--tile_sizes", "5"], "tile_size"),
        (["finetune", "--features", "f.zarr"], "required: name"),
        (["pretrain", "--name", "x", "--trainer.max_stepz", "5"], "trainer.max_steps"),
        (["registry", "show"], "required: show.ref"),
    ],
)
def test_usage_errors_print_one_line_and_a_pointer_to_help(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No usage text (60–100 lines for pretrain and finetune) before the error."""
    try:
        code = cli_main(argv)
    except SystemExit as done:  # jsonargparse-based commands exit on a parse error
        code = done.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE
    assert len(err) == 2, err
    assert err[0].startswith(f"histcode {argv[0]}: error: ") and says in err[0]
    assert err[1] == f"See 'histcode {argv[0]} --help' for the options."
    assert not any(line.startswith("usage:") for line in err)


def test_unknown_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["tilez"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Did you mean 'tile'?" in err[0] and "histcode --help" in err[0]
