"""Shipped configs: installed with the package, found by name from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from histcode.cli import run_captured
from histcode.configfiles import (
    UnknownConfigError,
    resolve_config,
    resolve_config_args,
    shipped_configs,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_CONFIGS = REPO_ROOT / "histcode" / "configs"


def test_every_repo_config_is_shipped_under_its_name() -> None:
    shipped = shipped_configs()
    repo = sorted(
        p.relative_to(REPO_CONFIGS).with_suffix("").as_posix() for p in REPO_CONFIGS.rglob("*.yaml")
    )
    assert sorted(shipped) == repo
    assert {"pretrain/simclr", "pretrain/moco", "finetune/deg", "finetune/tumour"} <= set(shipped)
    for name, path in shipped.items():
        assert path.read_bytes() == (REPO_CONFIGS / f"{name}.yaml").read_bytes()


def test_names_resolve_and_files_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    simclr = shipped_configs()["pretrain/simclr"]
    for value in (
        "simclr",
        "simclr.yaml",
        "pretrain/simclr",
        "configs/pretrain/simclr.yaml",
        "histcode/configs/pretrain/simclr.yaml",
    ):
        assert resolve_config(value) == simclr
    # a stem two stages share is the running command's own
    assert resolve_config("cpu_smoke", "finetune") == shipped_configs()["finetune/cpu_smoke"]
    with pytest.raises(UnknownConfigError, match="finetune/cpu_smoke, pretrain/cpu_smoke"):
        resolve_config("cpu_smoke")
    with pytest.raises(UnknownConfigError, match=r"Did you mean .*simclr"):
        resolve_config("simclrr")
    # a file of that name wins over the shipped config
    monkeypatch.chdir(tmp_path)
    (tmp_path / "simclr").write_text("model: {}\n")
    argv = ["--config", "simclr", "--config=deg", "--name", "x"]
    out = resolve_config_args(argv, "finetune")
    assert out[:2] == ["--config", "simclr"]
    assert out[2] == f"--config={shipped_configs()['finetune/deg']}"


def test_readme_config_paths_work_from_the_repository_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``configs/<stage>/<name>.yaml`` (as the README writes it) is not a file in a clone's root
    since the configs live in ``histcode/configs/``: it names the shipped file; a file on disk
    wins."""
    monkeypatch.chdir(REPO_ROOT)
    assert not Path("configs/pretrain/simclr.yaml").exists()
    argv = ["--config", "configs/pretrain/simclr.yaml", "--config=configs/pretrain/cpu_smoke.yaml"]
    out = resolve_config_args(argv, "pretrain")
    assert Path(out[1]).read_bytes() == (REPO_CONFIGS / "pretrain" / "simclr.yaml").read_bytes()
    assert out[2] == f"--config={shipped_configs()['pretrain/cpu_smoke']}"
    kept = ["--config", "histcode/configs/finetune/deg.yaml"]
    assert resolve_config_args(kept, "finetune") == kept  # the file itself
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "pretrain").mkdir(parents=True)
    (tmp_path / "configs" / "pretrain" / "simclr.yaml").write_text("model: {}\n")
    mine = ["--config", "configs/pretrain/simclr.yaml"]
    assert resolve_config_args(mine, "pretrain") == mine  # an existing file always wins


def test_config_command_lists_and_shows(capsys: pytest.CaptureFixture[str]) -> None:
    from histcode.cli import main

    assert main(["config", "list"]) == 0
    listing = capsys.readouterr().out
    assert "pretrain/simclr" in listing and "finetune/deg" in listing
    assert main(["config", "show", "finetune/deg"]) == 0
    assert capsys.readouterr().out == shipped_configs()["finetune/deg"].read_text()
    assert main(["config", "show", "nope"]) == 2
    assert "neither a file nor a shipped config" in capsys.readouterr().err


def test_unknown_config_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run_captured(["finetune", "--config", "no-such-config", "--print_config"])
    assert code == 2
    assert "histcode config list" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["pretrain", "--config", "simclr", "--print_config"], "max_steps"),
        (["finetune", "--config", "deg", "--print_config"], "gene_pooling"),
        (
            [
                "finetune",
                "--config",
                "configs/finetune/deg.yaml",
                "--config",
                "cpu_smoke",
                "--print_config",
            ],
            "hidden: 64",
        ),
    ],
)
def test_print_config_from_another_folder(tmp_path: Path, argv: list[str], expected: str) -> None:
    """The README's commands work outside the repository (a fresh process, cwd elsewhere)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-m", "histcode.cli", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert expected in run.stdout
