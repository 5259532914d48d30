"""SimCLRModule: lightly's NT-Xent gathers negatives across processes; optimisers; input spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from lightly.loss import NTXentLoss

from histcode.encoders import create_encoder, encoder_card
from histcode.pretrain.data import TileDataModule
from histcode.pretrain.module import SimCLRModule
from histcode.registry import Registry

pytestmark = [  # Lightning's own chatter when a Trainer is used directly
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
    pytest.mark.filterwarnings("ignore:You have overridden `on_after_batch_transfer`"),
    pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero"),
]


def test_ntxent_gathers_negatives_across_two_gloo_processes(
    monkeypatch, tmp_path: Path, free_port: int
) -> None:
    """Two processes with half a batch each give the loss of one process with the whole batch
    (without gathering, each would only see its own half as negatives)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # for the spawned processes
    from ntxent_worker import half_batch_loss

    torch.manual_seed(0)
    z0, z1 = torch.randn(16, 8), torch.randn(16, 8)
    full = NTXentLoss(temperature=0.1)(z0, z1).item()
    local = [NTXentLoss(temperature=0.1)(z0[s], z1[s]).item() for s in (slice(0, 8), slice(8, 16))]
    mp.spawn(half_batch_loss, args=(2, free_port, z0, z1, str(tmp_path)), nprocs=2, join=True)
    gathered = sum(float((tmp_path / f"{r}.txt").read_text()) for r in range(2)) / 2
    assert gathered == pytest.approx(full, rel=1e-5)
    assert sum(local) / 2 != pytest.approx(full, rel=1e-3)  # the check can tell them apart


def test_module_wires_lightly_blocks_and_follows_the_tiles() -> None:
    model = SimCLRModule(
        encoder="tiny", encoder_kwargs={"embed_dim": 24}, mpp=2.0, tile_size=64, projection_dim=16
    )
    assert model.encoder.input_spec.mpp == 2.0 and model.encoder.input_spec.tile_size == 64
    assert model.augment.size == 64
    assert model.criterion.gather_distributed
    assert model(torch.randn(4, 3, 64, 64)).shape == (4, 16)


@pytest.mark.parametrize("optimizer", ["adamw", "lars", "sgd"])
def test_each_optimizer_trains_a_step(pretrain_tiles: Path, optimizer: str, tmp_path: Path) -> None:
    model = SimCLRModule(
        encoder="tiny", mpp=2.0, tile_size=64, optimizer=optimizer, lr=0.01, warmup_steps=1
    )
    data = TileDataModule(str(pretrain_tiles), batch_size=8, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    before = [p.detach().clone() for p in model.encoder.parameters()]
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2 and torch.isfinite(torch.tensor(model.final_loss()))
    changed = [
        not torch.equal(a, b) for a, b in zip(before, model.encoder.parameters(), strict=True)
    ]
    assert all(changed)
    groups = trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]  # biases and norms exempt


def test_tiles_that_do_not_fit_the_encoder_are_refused(pretrain_tiles: Path) -> None:
    model = SimCLRModule(encoder="tiny", mpp=0.5, tile_size=224)
    data = TileDataModule(str(pretrain_tiles), batch_size=8, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="Re-tile"):
        trainer.fit(model, datamodule=data)


def test_init_from_a_registry_ref(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    parent = create_encoder("tiny", mpp=2.0, tile_size=64)
    ref = registry.save("parent", parent, encoder_card(parent))
    model = SimCLRModule(
        encoder="tiny", mpp=2.0, tile_size=64, init_from=ref, registry=str(registry.root)
    )
    model.setup("fit")
    for a, b in zip(parent.state_dict().values(), model.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert model.parent_ref.startswith("parent@1#sha256=")
    other = SimCLRModule(encoder="resnet18", init_from=ref, registry=str(registry.root))
    with pytest.raises(ValueError, match=r"--model\.encoder tiny"):
        other.setup("fit")


def test_init_from_an_encoder_of_another_stain_warns(
    pretrain_tiles: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Continued pretraining from an encoder whose card says it saw Macenko-normalised tiles,
    on a store of tiles as scanned: it goes ahead (adapting is a use of it) and says so; the
    same stain, or a card that records none, says nothing."""
    registry = Registry(tmp_path / "registry")
    parent = create_encoder("tiny", mpp=2.0, tile_size=64)
    data = TileDataModule(str(pretrain_tiles), batch_size=8, num_workers=0)
    assert data.stain_norm == "none"
    for stain, warned in (("macenko", True), ("none", False), (None, False)):
        extra = {} if stain is None else {"stain_norm": stain}
        ref = registry.save(f"p-{stain}", parent, encoder_card(parent, extra=extra))
        model = SimCLRModule(
            encoder="tiny", mpp=2.0, tile_size=64, init_from=ref, registry=str(registry.root)
        )
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False,
        )  # fmt: skip
        caplog.clear()
        with caplog.at_level("WARNING", logger="histcode.pretrain"):
            trainer.fit(model, datamodule=data)
        said = [r.getMessage() for r in caplog.records if "init_from" in r.getMessage()]
        assert bool(said) == warned, (stain, said)
        if warned:
            assert (
                "'macenko'" in said[0] and "'none'" in said[0] and "--stain_norm macenko" in said[0]
            )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_uses_channels_last_and_bf16(pretrain_tiles: Path, tmp_path: Path) -> None:
    model = SimCLRModule(encoder="resnet18", mpp=2.0, tile_size=64)
    data = TileDataModule(str(pretrain_tiles), batch_size=16, num_workers=2)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(torch.tensor(model.final_loss()))


def test_ddp_processes_draw_different_views_fresh_and_resumed(
    monkeypatch, pretrain_tiles: Path, tmp_path: Path, free_port: int
) -> None:
    """Two gloo processes (Lightning ``ddp`` on CPU): each is seeded with seed + rank, so the
    same tiles get different crops, flips, stains and blurs on each process; a resumed run's
    processes are seeded with seed + rank + 1_000_003 × step (fresh draws, still apart)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # for the spawned processes
    from ddp_views_worker import fit_fresh_then_resumed

    args = (2, free_port, str(pretrain_tiles), str(tmp_path))
    mp.spawn(fit_fresh_then_resumed, args=args, nprocs=2, join=True)
    for rank in range(2):
        steps = json.loads((tmp_path / f"steps-{rank}.json").read_text())
        assert steps == {"fresh": 2, "resumed": 4}
    for phase, step in (("fresh", 0), ("resumed", 2)):
        r0, r1 = (torch.load(tmp_path / f"{phase}-{r}.pt", weights_only=True) for r in range(2))
        assert [r0["initial_seed"], r1["initial_seed"]] == [1_000_003 * step, 1 + 1_000_003 * step]
        # the same input tiles: different views on the two processes
        assert r0["fixed_views"].shape == r1["fixed_views"].shape
        assert not torch.allclose(r0["fixed_views"], r1["fixed_views"])
        # the parameters drawn for the training batch: sample j differs across processes
        p0, p1 = r0["batch_params"], r1["batch_params"]
        assert not torch.equal(p0["hed_alpha"], p1["hed_alpha"])
        assert not torch.equal(p0["colour_brightness"], p1["colour_brightness"])
        assert not all(torch.equal(p0[k], p1[k]) for k in ("flip_hflip", "flip_vflip", "flip_k"))
    fresh0 = torch.load(tmp_path / "fresh-0.pt", weights_only=True)
    resumed0 = torch.load(tmp_path / "resumed-0.pt", weights_only=True)
    assert not torch.allclose(fresh0["fixed_views"], resumed0["fixed_views"])  # no replay


def test_lars_with_weight_decay_0_is_refused() -> None:
    """lightly's LARS skips the trust ratio of groups with weight_decay 0: with 0 everywhere it
    would be plain SGD at LARS's large learning rate."""
    with pytest.raises(ValueError, match=r"--model\.weight_decay > 0"):
        SimCLRModule(encoder="tiny", optimizer="lars", weight_decay=0.0, lr=0.3)
    SimCLRModule(encoder="tiny", optimizer="sgd", weight_decay=0.0)  # others are fine with 0
    SimCLRModule(encoder="tiny", optimizer="adamw", weight_decay=0.0)
