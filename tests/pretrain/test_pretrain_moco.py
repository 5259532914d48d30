"""MoCo (``--model.method moco``): EMA key encoder, memory bank, command end to end, resume."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightly.models.modules import MoCoProjectionHead

from histcode.cli import main as cli_main
from histcode.pretrain.module import ContrastiveModule
from histcode.registry import Registry

CONFIGS = Path(__file__).parents[2] / "histcode" / "configs" / "pretrain"


def _moco(**kw) -> ContrastiveModule:
    args = {"encoder": "tiny", "encoder_kwargs": {"embed_dim": 16, "width": 4}, "mpp": 2.0}
    return ContrastiveModule(method="moco", tile_size=64, projection_dim=8, **{**args, **kw})


def test_moco_wires_lightly_blocks_and_a_frozen_key_copy() -> None:
    model = _moco(memory_bank_size=32)
    assert isinstance(model.head, MoCoProjectionHead)
    assert model.criterion.memory_bank.size == (32, 8) and model.criterion.gather_distributed
    assert all(not p.requires_grad for p in model.key_encoder.parameters())
    assert all(not p.requires_grad for p in model.key_head.parameters())
    for a, b in zip(model.encoder.parameters(), model.key_encoder.parameters(), strict=True):
        assert torch.equal(a, b) and a is not b
    assert model.chance_loss(16) == pytest.approx(math.log(33))
    assert model.forward_keys(torch.randn(4, 3, 64, 64)).shape == (4, 8)


def test_key_encoder_is_an_ema_of_the_query_encoder() -> None:
    """key ← m·key + (1 − m)·query, m on a cosine from key_momentum to key_momentum_end."""
    model = _moco(key_momentum=0.9, key_momentum_end=1.0)
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.head.parameters()]:
            p.add_(1.0)  # the query network moved on
    query = [p.detach().clone() for p in [*model.encoder.parameters(), *model.head.parameters()]]
    keys = [*model.key_encoder.parameters(), *model.key_head.parameters()]
    before = [p.detach().clone() for p in keys]
    assert model.update_key_encoder(step=0, max_steps=11) == pytest.approx(0.9)
    after = [*model.key_encoder.parameters(), *model.key_head.parameters()]
    for k0, q, k1 in zip(before, query, after, strict=True):
        assert torch.allclose(k1, 0.9 * k0 + 0.1 * q, atol=1e-6)
    m5 = model.update_key_encoder(step=5, max_steps=11)  # half way: (0.9 + 1.0) / 2
    assert m5 == pytest.approx(0.95)
    frozen = [p.detach().clone() for p in model.key_encoder.parameters()]
    assert model.update_key_encoder(step=10, max_steps=11) == pytest.approx(1.0)  # last step
    for a, b in zip(frozen, model.key_encoder.parameters(), strict=True):
        assert torch.equal(a, b)  # momentum 1: the key encoder stops moving


def test_moco_refuses_an_empty_memory_bank_and_bad_momenta() -> None:
    with pytest.raises(ValueError, match="memory_bank_size"):
        _moco(memory_bank_size=0)
    with pytest.raises(ValueError, match="key_momentum"):
        _moco(key_momentum=0.999, key_momentum_end=0.99)


def test_moco_yaml_differs_from_simclr_yaml_only_in_the_method_settings() -> None:
    simclr = yaml.safe_load((CONFIGS / "simclr.yaml").read_text())
    moco = yaml.safe_load((CONFIGS / "moco.yaml").read_text())
    method_keys = {"method", "projection_dim", "temperature", "memory_bank_size",
                   "key_momentum", "key_momentum_end", "optimizer", "lr", "scale_lr",
                   "weight_decay"}  # fmt: skip
    assert {k: v for k, v in moco.items() if k != "model"} == {
        k: v for k, v in simclr.items() if k != "model"
    }
    same = {k: v for k, v in moco["model"].items() if k not in method_keys}
    assert same == {k: v for k, v in simclr["model"].items() if k not in method_keys}
    assert moco["model"]["method"] == "moco" and simclr["model"]["method"] == "simclr"


def _run(argv: list[str]) -> tuple[int, dict | None]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_main(argv)
    lines = [line for line in stdout.getvalue().splitlines() if line.strip()]
    return code, (json.loads(lines[-1]) if lines else None)


def test_moco_run_registers_an_encoder_that_embed_loads_and_resumes_its_key_encoder(
    pretrain_tiles: Path, tmp_path: Path, monkeypatch
) -> None:
    """``--config moco.yaml --config cpu_smoke.yaml``: 6 steps register the query backbone with
    a card naming the method; ``histcode embed`` loads it. The checkpoint holds the key encoder
    (state dict) and the memory bank; rerun with more steps, the run starts from both."""
    registry = tmp_path / "registry"
    out = tmp_path / "run"
    argv = [
        "pretrain",
        "--config", str(CONFIGS / "moco.yaml"),
        "--config", str(CONFIGS / "cpu_smoke.yaml"),
        "--data.tiles", str(pretrain_tiles),
        "--name", "moco", "--registry", str(registry), "--out", str(out),
        "--trainer.enable_progress_bar", "false",
        "--model.memory_bank_size", "40",
        "--trainer.max_steps", "6",
    ]  # fmt: skip
    code, result = _run(argv)
    assert code == 0 and result["ref"] == "moco@1" and result["method"] == "moco"
    card = Registry(registry).card("moco@1")
    assert card.extra["method"] == "moco"
    settings = card.extra["method_settings"]
    assert settings["memory_bank_size"] == 40 and settings["key_momentum"] == 0.99
    assert settings["key_momentum_last"] > 0.99
    assert card.extra["loss"]["memory_bank_size"] == 40
    assert card.extra["loss"]["chance"] == pytest.approx(math.log(41))
    assert card.extra["collapse"]["chance_loss"] == pytest.approx(math.log(41))
    # the registered weights are the query backbone, not the key copy
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    encoder, _ = Registry(registry).load("moco@1")
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"encoder.{k}"])
    keys = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("key_encoder.")}
    assert keys and any(
        not torch.equal(v, ckpt["state_dict"][k.replace("key_encoder.", "encoder.", 1)])
        for k, v in keys.items()
    )
    bank = ckpt["histcode"]["memory_bank"]
    ptr = 0
    for _ in range(6):  # lightly's queue: a batch that reaches the end fills it, then wraps to 0
        ptr = 0 if ptr + 16 >= 40 else ptr + 16
    assert bank["bank"].shape == (40, 32) and int(bank["ptr"]) == ptr

    code = cli_main(["embed", "--encoder", "moco@1", "--registry", str(registry),
                     "--tiles", str(pretrain_tiles), "--out", str(tmp_path / "features.zarr"),
                     "--workers", "0"])  # fmt: skip
    assert code == 0

    seen: dict[str, object] = {}
    original = ContrastiveModule.on_train_start

    def spy(self):
        seen["key_encoder"] = {k: v.clone() for k, v in self.key_encoder.state_dict().items()}
        seen["bank"] = self.criterion.memory_bank.bank.clone()
        seen["ptr"] = int(self.criterion.memory_bank.bank_ptr)
        return original(self)

    monkeypatch.setattr(ContrastiveModule, "on_train_start", spy)
    code, result = _run([*argv[:-1], "8"])
    assert code == 0 and result["ref"] == "moco@2" and result["steps"] == 8
    for k, v in seen["key_encoder"].items():
        assert torch.equal(v, ckpt["state_dict"][f"key_encoder.{k}"])
    assert torch.equal(seen["bank"], bank["bank"]) and seen["ptr"] == int(bank["ptr"])


def test_moco_ddp_with_two_cpu_processes(pretrain_tiles: Path, tmp_path: Path) -> None:
    """Two gloo processes: keys shuffled across processes (BatchNorm not synchronised on CPU),
    both banks updated with the gathered keys, one encoder registered."""
    argv = [sys.executable, "-m", "histcode.cli", "pretrain",
            "--config", str(CONFIGS / "moco.yaml"), "--config", str(CONFIGS / "cpu_smoke.yaml"),
            "--data.tiles", str(pretrain_tiles), "--registry", str(tmp_path / "registry"),
            "--trainer.enable_progress_bar", "false", "--name", "mocoddp",
            "--out", str(tmp_path / "run"), "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.max_steps", "3", "--data.batch_size", "8",
            "--model.memory_bank_size", "64"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ref"] == "mocoddp@1" and result["steps"] == 3
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(ckpt["histcode"]["memory_bank"]["ptr"]) == 3 * 16  # global batches enqueued
    card = Registry(tmp_path / "registry").card("mocoddp@1")
    assert card.extra["trainer"]["world_size"] == 2 and card.extra["method"] == "moco"
    assert card.extra["collapse"]["chance_loss"] == pytest.approx(math.log(65))
