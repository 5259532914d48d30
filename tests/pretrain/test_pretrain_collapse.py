"""Collapse checks: chance value of NT-Xent, effective rank, verdicts, and runs that collapse."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from lightly.loss import NTXentLoss

from histcode.pretrain.collapse import chance_loss, effective_rank, feature_stats, verdict


@pytest.mark.parametrize("batch_size", [2, 3, 16, 32, 100])
def test_chance_is_the_loss_of_a_constant_embedding(batch_size: int) -> None:
    """Every projection equal: lightly's NT-Xent is ln(2B - 1), whatever the temperature."""
    z = torch.ones(batch_size, 8) * torch.randn(8)  # the same vector for every view
    for temperature in (0.1, 0.5):
        loss = NTXentLoss(temperature=temperature)(z, z.clone()).item()
        assert loss == pytest.approx(chance_loss(batch_size), rel=1e-5)
    assert chance_loss(batch_size) == pytest.approx(math.log(2 * batch_size - 1))


def test_chance_of_a_gathered_batch_counts_every_process(
    monkeypatch, tmp_path: Path, free_port: int
) -> None:
    """Two gloo processes of 8 tiles each, negatives gathered: a constant embedding scores the
    chance value of the global batch of 16, ln(31), not of the local one, ln(15)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from ntxent_worker import half_batch_loss

    z = torch.ones(16, 8)
    mp.spawn(half_batch_loss, args=(2, free_port, z, z.clone(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        loss = float((tmp_path / f"{rank}.txt").read_text())
        assert loss == pytest.approx(chance_loss(16), rel=1e-5)
        assert loss != pytest.approx(chance_loss(8), rel=1e-2)


@pytest.mark.parametrize(("bank", "batch_size"), [(64, 16), (300, 16), (300, 7), (4096, 128)])
def test_chance_with_a_memory_bank_is_ln_bank_plus_1(bank: int, batch_size: int) -> None:
    """MoCo (lightly's NTXentLoss with memory_bank_size): each query against its key and the
    bank only, ln(M + 1) whatever the batch, once the bank holds the constant embedding; while
    it still holds its random initial vectors, a constant embedding scores below chance."""
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(bank, 8))
    z = torch.ones(batch_size, 8)
    first = criterion(z.clone().requires_grad_(), z).item()  # the bank: random unit vectors
    assert first < chance_loss(batch_size, bank) - 0.5
    for _ in range(math.ceil(bank / batch_size)):  # queries with a gradient enqueue their keys
        criterion(z.clone().requires_grad_(), z)
    loss = criterion(z.clone().requires_grad_(), z).item()
    assert loss == pytest.approx(chance_loss(batch_size, bank), rel=1e-5)
    assert chance_loss(batch_size, bank) == pytest.approx(math.log(bank + 1))


def test_chance_refuses_impossible_batches() -> None:
    with pytest.raises(ValueError, match=r"--data\.batch_size"):
        chance_loss(1)
    with pytest.raises(ValueError, match="memory_bank_size"):
        chance_loss(16, -1)


def test_effective_rank_of_known_matrices() -> None:
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(500, 1, generator=g), torch.randn(1, 64, generator=g)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-4)  # rank one (float32)
    assert effective_rank(torch.ones(300, 16) * 7.0) == pytest.approx(1.0, abs=1e-6)
    iso = torch.randn(20000, 32, generator=g)
    assert 0.97 * 32 < effective_rank(iso) <= 32  # isotropic: about D
    q, _ = torch.linalg.qr(torch.randn(200, 5, generator=g))
    assert effective_rank(q * 3.0) == pytest.approx(5.0, rel=1e-6)  # 5 equal singular values
    assert effective_rank(torch.zeros(10, 4)) == 0.0


def test_feature_stats_tell_a_constant_embedding_from_a_spread_one() -> None:
    g = torch.Generator().manual_seed(0)
    constant = feature_stats(torch.ones(256, 64) * torch.rand(64, generator=g))
    assert constant["effective_rank"] == pytest.approx(1.0) and constant["dead_dims"] == 64
    assert constant["sd_normalised"] == pytest.approx(0.0, abs=1e-6)
    spread = feature_stats(torch.randn(256, 64, generator=g))
    assert spread["rank_ratio"] > 0.7 and spread["dead_dims"] == 0
    assert 0.9 < spread["sd_normalised"] < 1.1  # sd of unit rows ≈ 1/sqrt(D) per dimension
    bad = feature_stats(torch.full((4, 3), float("nan")))
    assert bad["finite"] == 0 and bad["effective_rank"] == 0.0


@pytest.mark.parametrize(
    ("ratio", "rank_ratio", "expected"),
    [
        (1.001, 0.01, "collapsed"),  # the constant embedding's loss, one direction
        (float("nan"), 0.5, "collapsed"),  # diverged
        (0.999, 0.3, "suspect"),  # at chance, features still spread (e.g. constant inputs)
        (0.8, 0.01, "suspect"),  # the task is solved in few directions
        (0.8, 0.3, "ok"),
        (2.2, 0.1, "ok"),  # far above chance: not solved yet, not collapsed (short runs)
        (None, 0.3, "ok"),
    ],
)
def test_verdict(ratio: float | None, rank_ratio: float, expected: str) -> None:
    judged, reasons = verdict(ratio, rank_ratio, loss_margin=0.03, min_rank_ratio=0.02)
    assert judged == expected
    assert bool(reasons) == (expected != "ok")


def _run(argv: list[str]) -> tuple[int, dict | None]:
    import contextlib
    import io
    import json

    from histcode.cli import main as cli_main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_main(argv)
    lines = [line for line in stdout.getvalue().splitlines() if line.strip()]
    return code, (json.loads(lines[-1]) if lines else None)


def test_a_run_on_constant_tiles_is_flagged_collapsed_on_the_card_and_warns(
    smoke_args: list[str], tmp_path: Path, monkeypatch, caplog
) -> None:
    """Every view the same (training) and every tile the same (probe): the embedding is
    constant, the loss sits at ln(2B - 1) from the first step and the features have rank
    one. The run warns during training and at the end, and the card, summary.json and the
    JSON line say "collapsed"."""
    import json

    from histcode.pretrain.augment import TileAugmentation
    from histcode.registry import Registry
    from histcode.tilereader import TileDataset

    def constant_tile(self, i: int) -> torch.Tensor:
        return torch.full((3, 64, 64), 180, dtype=torch.uint8)

    def constant_views(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = torch.zeros(len(tiles), 3, 64, 64, device=tiles.device)
        return flat, flat.clone()

    monkeypatch.setattr(TileDataset, "__getitem__", constant_tile)  # the probe set too
    monkeypatch.setattr(TileAugmentation, "two_views", constant_views)
    out = tmp_path / "run"
    argv = ["pretrain", *smoke_args, "--name", "flat", "--out", str(out)]
    argv += ["--trainer.max_steps", "30", "--collapse.every_n_steps", "10"]
    with caplog.at_level("WARNING", logger="histcode.pretrain"):
        code, result = _run(argv)
    assert code == 0 and result is not None
    assert result["collapse"]["verdict"] == "collapsed"
    card = Registry(tmp_path / "registry").card(result["ref"])
    collapse = card.extra["collapse"]
    assert collapse["verdict"] == "collapsed"
    assert collapse["chance_loss"] == pytest.approx(math.log(31), rel=1e-6)
    assert collapse["loss_over_chance"] == pytest.approx(1.0, abs=1e-3)
    assert collapse["backbone"]["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert collapse["projection"]["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert {w["sign"] for w in collapse["warnings"]} == {"loss", "rank"}
    assert card.extra["loss"]["chance"] == pytest.approx(math.log(31), rel=1e-6)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("training loss at chance" in m for m in warned)
    assert any("pretraining looks collapsed" in m for m in warned)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"]["collapse"]["verdict"] == "collapsed"
