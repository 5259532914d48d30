"""``histcode pretrain`` end to end: registers the encoder, loss falls, resumes, DDP on CPU."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightly.utils.scheduler import cosine_warmup_schedule

from histcode.cli import main as cli_main
from histcode.pretrain.module import SimCLRModule
from histcode.registry import Registry
from histcode.tilestore import TileStore


def _losses(out: Path) -> np.ndarray:
    """Per-step train_loss of the run's CSV logs (all versions, in step order)."""
    rows = []
    for path in sorted(out.glob("lightning_logs/version_*/metrics.csv")):
        with path.open() as f:
            rows += [
                (int(r["step"]), float(r["train_loss"]))
                for r in csv.DictReader(f)
                if r.get("train_loss")
            ]
    return np.array([loss for _, loss in sorted(rows)])


def _last_json(text: str) -> dict:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def smoke_run(pretrain_tiles: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 50-step CPU run through ``histcode.cli.main`` (shared by the tests below)."""
    root = tmp_path_factory.mktemp("smoke_run")
    configs = Path(__file__).parents[2] / "histcode" / "configs" / "pretrain"
    argv = [
        "pretrain",
        "--config", str(configs / "simclr.yaml"),
        "--config", str(configs / "cpu_smoke.yaml"),
        "--data.tiles", str(pretrain_tiles),
        "--name", "smoke",
        "--registry", str(root / "registry"),
        "--out", str(root / "run"),
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_main(argv)
    return {"code": code, "stdout": stdout.getvalue(), "root": root, "tiles": pretrain_tiles}


def test_run_registers_the_encoder_with_its_card(smoke_run: dict) -> None:
    assert smoke_run["code"] == 0
    result = _last_json(smoke_run["stdout"])
    assert result["ref"] == "smoke@1" and result["steps"] == 50
    registry = Registry(smoke_run["root"] / "registry")
    encoder, card = registry.load("smoke@1")
    assert card.metrics["steps"] == 50 and card.metrics["final_loss"] == result["final_loss"]
    assert card.metrics["tiles_seen"] == 50 * 16
    assert TileStore(smoke_run["tiles"]).fingerprint() in card.parents
    assert card.input_spec.mpp == 2.0 and card.input_spec.tile_size == 64  # from the store
    aug = card.extra["augmentation"]
    assert aug["hed_sigma"] == 0.05 and aug["crop_size"] == 64 and aug["blur_kernel_size"] == 7
    assert card.extra["trainer"]["max_steps"] == 50 and card.extra["tiles"] == str(
        smoke_run["tiles"].resolve()
    )
    assert card.extra["stain_norm"] == "none"  # the tiles' stain normalisation (embed checks it)
    assert encoder(torch.randn(2, 3, 64, 64)).shape == (2, 64)


def test_a_healthy_run_is_not_flagged_and_its_diagnostics_are_on_the_card(smoke_run: dict) -> None:
    """The 50-step smoke run learns (its loss falls): verdict "ok", with the chance value of
    batches of 16 (ln 31), the loss against it, and the probe set's effective ranks and spread
    at the start and the end; the per-step ratio is in the CSV log."""
    result = _last_json(smoke_run["stdout"])
    assert result["method"] == "simclr" and result["collapse"]["verdict"] == "ok"
    card = Registry(smoke_run["root"] / "registry").card("smoke@1")
    collapse = card.extra["collapse"]
    assert collapse["verdict"] == "ok" and collapse["reasons"] == []
    assert collapse["chance_loss"] == pytest.approx(np.log(31), rel=1e-6)
    assert collapse["loss_over_chance"] == pytest.approx(
        collapse["final_loss"] / collapse["chance_loss"], rel=1e-4
    )
    for part, dim in (("backbone", 64), ("projection", 32)):
        stats = collapse[part]
        assert (
            stats["dim"] == dim and stats["rank_ratio"] >= collapse["thresholds"]["min_rank_ratio"]
        )
        assert stats["dead_dims"] == 0 and stats["sd_normalised"] > 0.1
    assert collapse["at_start"]["step"] == 0 and collapse["probe_tiles"] > 100
    steps = [h["step"] for h in collapse["history"]]
    assert steps[0] == 0 and 25 in steps and steps[-1] == 50
    assert collapse["warnings"] == []
    rows = [
        r
        for p in (smoke_run["root"] / "run").glob("lightning_logs/version_*/metrics.csv")
        for r in csv.DictReader(p.open())
        if r.get("train/loss_over_chance")
    ]
    assert len(rows) == 50
    assert all(
        float(r["train/loss_over_chance"]) == pytest.approx(float(r["train_loss"]) / np.log(31))
        for r in rows
    )


def test_run_folder_holds_config_checkpoint_and_summary(smoke_run: dict) -> None:
    run = smoke_run["root"] / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["command"] == "histcode pretrain" and summary["exit_code"] == 0
    assert summary["result"]["ref"] == "smoke@1"
    assert summary["config"]["model"]["encoder"] == "tiny"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "encoder: tiny" in (run / "config.yaml").read_text()


def test_loss_falls_over_50_steps(smoke_run: dict) -> None:
    losses = _losses(smoke_run["root"] / "run")
    assert len(losses) == 50 and np.isfinite(losses).all()
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < first - 0.2, f"loss did not fall: first 10 steps {first:.3f}, last 10 {last:.3f}"


def test_rerun_of_a_finished_run_registers_nothing_new(smoke_run: dict, capsys) -> None:
    configs = Path(__file__).parents[2] / "histcode" / "configs" / "pretrain"
    argv = [
        "pretrain",
        "--config", str(configs / "simclr.yaml"),
        "--config", str(configs / "cpu_smoke.yaml"),
        "--data.tiles", str(smoke_run["tiles"]),
        "--name", "smoke",
        "--registry", str(smoke_run["root"] / "registry"),
        "--out", str(smoke_run["root"] / "run"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    assert _last_json(capsys.readouterr().out)["ref"] == "smoke@1"
    assert Registry(smoke_run["root"] / "registry").versions("smoke") == [1]


def test_interrupted_run_resumes_from_its_last_checkpoint(
    smoke_args: list[str], tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "run"
    argv = ["pretrain", *smoke_args, "--name", "resumed", "--out", str(out)]
    argv += ["--trainer.max_steps", "20", "--checkpoint.every_n_train_steps", "5"]
    original = SimCLRModule.on_train_batch_end

    def interrupt_at_13(self, outputs, batch, batch_idx):  # Ctrl-C after step 13
        if self.global_step == 13:
            raise KeyboardInterrupt
        return original(self, outputs, batch, batch_idx)

    monkeypatch.setattr(SimCLRModule, "on_train_batch_end", interrupt_at_13)
    assert cli_main(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 13  # saved on the interrupt, not only every 5 steps
    assert not (tmp_path / "registry" / "resumed").exists()  # nothing registered

    monkeypatch.setattr(SimCLRModule, "on_train_batch_end", original)
    assert cli_main(argv) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["ref"] == "resumed@1" and result["steps"] == 20
    registry = Registry(tmp_path / "registry")
    assert registry.versions("resumed") == [1]
    steps = sorted(  # the training loss's rows (the collapse checks log after the last step)
        int(r["step"])
        for p in out.glob("lightning_logs/version_*/metrics.csv")
        for r in csv.DictReader(p.open())
        if r.get("train_loss")
    )
    assert steps[-1] == 19 and len(list(out.glob("lightning_logs/version_*"))) == 2
    # the second run continued the first: the optimiser's step count is the global one
    assert registry.card("resumed@1").metrics["tiles_seen"] == 20 * 16


def test_resume_false_starts_over_and_registers_a_new_version(
    smoke_args: list[str], tmp_path: Path, capsys
) -> None:
    argv = ["pretrain", *smoke_args, "--name", "again", "--out", str(tmp_path / "run")]
    argv += ["--trainer.max_steps", "3"]
    assert cli_main(argv) == 0
    first = _last_json(capsys.readouterr().out)
    assert cli_main([*argv, "--resume", "false", "--model.lr", "0.01"]) == 0
    second = _last_json(capsys.readouterr().out)
    assert (first["ref"], second["ref"]) == ("again@1", "again@2") and second["steps"] == 3
    registry = Registry(tmp_path / "registry")
    assert registry.card("again@2").extra["optimizer"]["lr"] == 0.01


def test_help_and_print_config(capsys, pretrain_tiles: Path) -> None:
    assert cli_main(["pretrain", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--trainer.devices", "--trainer.strategy", "--model.augmentation.hed_sigma",
                   "--data.tiles", "--name", "--checkpoint.every_n_train_steps"):  # fmt: skip
        assert option in text
    configs = Path(__file__).parents[2] / "histcode" / "configs" / "pretrain"
    argv = ["pretrain", "--config", str(configs / "simclr.yaml"), "--print_config"]
    code = cli_main([*argv, "--data.tiles", str(pretrain_tiles), "--name", "x"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "encoder: resnet50_trunc" in printed and "hed_sigma: 0.05" in printed
    assert "precision: bf16-mixed" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "x", "--data.tiles", "/nonexistent/tiles.zarr"], "histcode tile"),
        (["--name", "bad/name"], "invalid checkpoint name"),
        (["--model.init_from", "nothere@1"], "no checkpoint named 'nothere'"),
    ],
)
def test_unusable_arguments_exit_2_with_a_message(
    smoke_args: list[str], tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    argv = ["pretrain", *smoke_args, "--out", str(tmp_path / "run"), "--name", "ok", *args]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err


def _two_processes(
    smoke_args: list[str], tmp_path: Path, strategy: str, name: str
) -> tuple[subprocess.CompletedProcess, dict]:
    """``histcode pretrain`` with ``--trainer.devices 2 --trainer.strategy STRATEGY`` on CPU
    (gloo), 4 steps of 8 tiles a process, in a subprocess; its run and its result line."""
    argv = [sys.executable, "-m", "histcode.cli", "pretrain", *smoke_args, "--name", name]
    argv += ["--out", str(tmp_path / "run"), "--trainer.devices", "2"]
    argv += ["--trainer.strategy", strategy, "--trainer.max_steps", "4", "--data.batch_size", "8"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = _last_json(done.stdout)
    assert result["ref"] == f"{name}@1" and result["steps"] == 4
    return done, result


def test_ddp_with_two_cpu_processes_registers_one_encoder(
    smoke_args: list[str], tmp_path: Path
) -> None:
    """``--trainer.strategy ddp --trainer.devices 2`` on CPU (gloo), as a user types it.

    Lightning's ddp relaunches the command for rank 1 (``python -m histcode.cli …``), so it
    runs in a subprocess; each process reads its own shard, and NT-Xent gathers the other
    process's projections as negatives.
    """
    done, _ = _two_processes(smoke_args, tmp_path, "ddp", "ddp")
    assert done.stdout.count('"ref"') == 1  # only process 0 registers and prints
    card = Registry(tmp_path / "registry").card("ddp@1")
    trainer = card.extra["trainer"]
    assert trainer["world_size"] == 2 and trainer["strategy"] == "DDPStrategy"
    assert trainer["global_batch_size"] == 16 and card.metrics["tiles_seen"] == 4 * 16
    assert "distributed_backend=gloo" in done.stderr + done.stdout


def test_ddp_spawn_keeps_the_collapse_verdict_on_the_card(
    smoke_args: list[str], tmp_path: Path
) -> None:
    """Under ``ddp_spawn`` the training runs in spawned processes and the parent gets back
    only the weights; the collapse checks' report still reaches the card and the result."""
    _, result = _two_processes(smoke_args, tmp_path, "ddp_spawn", "spawn")
    card = Registry(tmp_path / "registry").card("spawn@1")
    collapse = card.extra["collapse"]
    assert collapse["verdict"] in ("ok", "suspect", "collapsed")
    assert collapse["history"] and collapse["final_loss"] is not None
    assert result["collapse"]["verdict"] == collapse["verdict"]


def _lr_spy(monkeypatch) -> dict[int, float]:
    """Record the learning rate of each optimiser step, by global step."""
    seen: dict[int, float] = {}
    original = SimCLRModule.on_before_optimizer_step

    def spy(self, optimizer):
        seen[self.global_step] = optimizer.param_groups[0]["lr"]
        return original(self, optimizer)

    monkeypatch.setattr(SimCLRModule, "on_before_optimizer_step", spy)
    return seen


def test_resume_with_more_steps_follows_the_longer_schedule(
    smoke_args: list[str], tmp_path: Path, monkeypatch, capsys
) -> None:
    """4 steps, then the same command with max_steps 8: steps 4-7 follow the warm-up/cosine
    schedule for 8 steps (not the 4-step schedule's final rate), and the card records both
    schedules and the learning rates actually used."""
    out = tmp_path / "run"
    argv = ["pretrain", *smoke_args, "--name", "longer", "--out", str(out)]
    argv += ["--model.warmup_steps", "2", "--model.lr", "0.002", "--model.min_lr_ratio", "0.01"]
    seen = _lr_spy(monkeypatch)
    assert cli_main([*argv, "--trainer.max_steps", "4"]) == 0
    assert _last_json(capsys.readouterr().out)["ref"] == "longer@1"
    assert cli_main([*argv, "--trainer.max_steps", "8"]) == 0
    assert _last_json(capsys.readouterr().out)["ref"] == "longer@2"
    peak, final = 0.002, 0.002 * 0.01
    first = [peak * cosine_warmup_schedule(s, 4, 1.0, 0.01, 2, 0.0) for s in range(4)]
    longer = [peak * cosine_warmup_schedule(s, 8, 1.0, 0.01, 2, 0.0) for s in range(4, 8)]
    assert [seen[s] for s in range(4)] == pytest.approx(first)
    assert [seen[s] for s in range(4, 8)] == pytest.approx(longer)
    assert seen[4] > 10 * final  # not the final rate of the 4-step schedule
    card = Registry(tmp_path / "registry").card("longer@2")
    opt = card.extra["optimizer"]
    assert opt["schedule"] == [
        {"from_step": 0, "max_steps": 4, "warmup_steps": 2, "peak_lr": peak, "final_lr": final},
        {"from_step": 4, "max_steps": 8, "warmup_steps": 2, "peak_lr": peak, "final_lr": final},
    ]
    used = [seen[s] for s in range(8)]
    assert opt["lr_used"] == {
        "steps": 8,
        "peak": pytest.approx(max(used)),
        "mean": pytest.approx(sum(used) / 8),
        "last": pytest.approx(used[-1]),
    }


def _finished_run(smoke_args: list[str], tmp_path: Path, capsys) -> list[str]:
    argv = ["pretrain", *smoke_args, "--name", "done", "--out", str(tmp_path / "run")]
    argv += ["--trainer.max_steps", "2"]
    assert cli_main(argv) == 0
    assert _last_json(capsys.readouterr().out)["ref"] == "done@1"
    return argv


class _Payload:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("damage", ["garbage", "pickled_object"])
def test_an_unreadable_checkpoint_is_refused_not_registered_again(
    smoke_args: list[str], tmp_path: Path, monkeypatch, capsys, damage: str
) -> None:
    """A last.ckpt that cannot be read with weights_only=True (damaged, or holding a pickled
    object) stops the rerun with exit 2 and a message saying what to do; nothing is unpickled
    and no duplicate version is registered. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 plays the part
    of a torch whose torch.load unpickles by default."""
    argv = _finished_run(smoke_args, tmp_path, capsys)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    marker = tmp_path / "unpickled"
    if damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint" * 100)
    else:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        state["histcode"]["note"] = _Payload(marker)
        torch.save(state, ckpt)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot resume from {ckpt}" in err and "--resume false" in err
    assert not marker.exists()
    assert Registry(tmp_path / "registry").versions("done") == [1]


def test_resume_loads_the_checkpoint_with_weights_only(
    smoke_args: list[str], tmp_path: Path, monkeypatch, capsys
) -> None:
    """Every torch.load of the resume (ours and Lightning's) passes weights_only=True, so no
    torch version or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD setting makes it unpickle."""
    argv = _finished_run(smoke_args, tmp_path, capsys)
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert cli_main([*argv[:-1], "3"]) == 0  # max_steps 3: resumes at step 2
    assert _last_json(capsys.readouterr().out)["steps"] == 3
    assert len(calls) >= 2 and all(w is True for w in calls), calls


def test_lars_with_weight_decay_0_exits_2_naming_the_fix(
    smoke_args: list[str], tmp_path: Path, capsys
) -> None:
    argv = ["pretrain", *smoke_args, "--name", "lars0", "--out", str(tmp_path / "run")]
    argv += ["--model.optimizer", "lars", "--model.weight_decay", "0"]
    assert cli_main(argv) == 2
    assert "--model.weight_decay > 0" in capsys.readouterr().err


def test_sync_batchnorm_is_on_by_default_and_on_the_card(
    smoke_run: dict, pretrain_tiles: Path, capsys
) -> None:
    """simclr.yaml syncs BatchNorm across processes (SimCLR's global BN); the CPU override turns
    it off; the card says which one ran."""
    configs = Path(__file__).parents[2] / "histcode" / "configs" / "pretrain"
    argv = ["pretrain", "--config", str(configs / "simclr.yaml"), "--print_config"]
    assert cli_main([*argv, "--data.tiles", str(pretrain_tiles), "--name", "x"]) == 0
    assert "sync_batchnorm: true" in capsys.readouterr().out
    card = Registry(smoke_run["root"] / "registry").card("smoke@1")
    assert card.extra["trainer"]["sync_batchnorm"] is False


def test_sync_batchnorm_across_cpu_processes_exits_2_naming_the_fix(
    smoke_args: list[str], tmp_path: Path, capsys
) -> None:
    """torch's SyncBatchNorm runs on CUDA only: refused before any process is launched."""
    argv = ["pretrain", *smoke_args, "--name", "sbn", "--out", str(tmp_path / "run")]
    argv += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    assert cli_main([*argv, "--trainer.sync_batchnorm", "true"]) == 2
    assert "set --trainer.sync_batchnorm false" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
