"""A process of the DDP augmentation-seeding test: two short fits (fresh, then resumed) under gloo.

Kept apart so that spawned processes import little. Each process poses as one of ``world``
processes started by torchrun (the environment variables Lightning's ``TorchElasticEnvironment``
reads), so Lightning's ``ddp`` strategy joins the group instead of launching processes itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from histcode.pretrain.data import TileDataModule
from histcode.pretrain.module import SimCLRModule
from tests.torchrun_env import pose_as_torchrun

#: the fixed input whose views are compared across processes: the same tiles on every process
FIXED_TILES_SEED = 1234


class RecordViews(pl.Callback):
    """At the start of training, write this process's seed, the views of fixed tiles, and the
    random parameters the first training batch drew (per sample), to ``<out>/<phase>-<rank>.pt``.
    """

    def __init__(self, out: Path, phase: str) -> None:
        self.out, self.phase = out, phase
        self.record: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: SimCLRModule) -> None:
        self.record["initial_seed"] = torch.initial_seed()
        tiles = torch.randint(
            0,
            256,
            (4, 3, 64, 64),
            dtype=torch.uint8,
            generator=torch.Generator().manual_seed(FIXED_TILES_SEED),
        )
        self.record["fixed_views"] = torch.cat(pl_module.augment.two_views(tiles))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: SimCLRModule, batch: Any, batch_idx: int
    ) -> None:
        if "batch_params" in self.record:
            return
        aug = pl_module.augment
        self.record["batch_params"] = {  # drawn for this batch in on_after_batch_transfer
            **{f"flip_{k}": v.clone() for k, v in aug.flip_rotate._params.items()},
            **{f"hed_{k}": v.clone() for k, v in aug.colour[0]._params.items()},
            **{f"colour_{k}": v.clone() for k, v in aug.colour[1]._params.items()},
        }
        torch.save(self.record, self.out / f"{self.phase}-{trainer.global_rank}.pt")


def fit_fresh_then_resumed(rank: int, world: int, port: int, tiles: str, out: str) -> None:
    """Fit 2 steps from scratch, save, then fit to step 4 from that checkpoint (a rerun)."""
    pose_as_torchrun(rank, world, port)
    folder = Path(out)
    ckpt = folder / "last.ckpt"
    steps = {}
    for phase, max_steps, ckpt_path in (("fresh", 2, None), ("resumed", 4, ckpt)):
        pl.seed_everything(0, verbose=False)  # as every process of a (re)run does
        model = SimCLRModule(
            encoder="tiny",
            encoder_kwargs={"embed_dim": 16, "width": 4},
            projection_dim=8,
            warmup_steps=1,
            mpp=2.0,
            tile_size=64,
        )
        data = TileDataModule(tiles, batch_size=4, num_workers=0)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=world,
            strategy="ddp",
            max_steps=max_steps,
            callbacks=[RecordViews(folder, phase)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=folder,
        )
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        steps[phase] = trainer.global_step
        if phase == "fresh":
            trainer.save_checkpoint(ckpt)
    (folder / f"steps-{rank}.json").write_text(json.dumps(steps))
