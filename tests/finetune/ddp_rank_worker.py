"""A process of the DDP gene-rank test: two short fits of an MILModule under gloo.

Kept apart so that spawned processes import little. Each process poses as one of ``world``
processes started by torchrun (the environment variables Lightning's ``TorchElasticEnvironment``
reads), so Lightning's ``ddp`` strategy joins the group instead of launching processes itself.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader

from histcode.finetune.bags import Bag, collate_bags
from histcode.finetune.module import MILModule
from tests.torchrun_env import pose_as_torchrun

GENES = ["A", "B", "C"]


def bags(n: int, seed: int, labelled: int | None = None) -> list[Bag]:
    """``n`` tumour slides of 5–12 tiles of 8 features; the genes follow the mean feature;
    with ``labelled``, only that slide's tumour label is known (the others NaN)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.normal(size=(int(rng.integers(5, 13)), 8)).astype(np.float32)
        fc = np.array([x[:, 0].mean(), -x[:, 1].mean(), rng.normal()], dtype=np.float32)
        out.append(
            Bag(
                slide_id=f"s{seed}-{i:02d}",
                features=torch.from_numpy(x),
                tumour=torch.tensor(1.0 if labelled in (None, i) else float("nan")),
                log2fc=torch.from_numpy(fc),
                classes=torch.ones(3, dtype=torch.int64),
            )
        )
    return out


def fit(rank: int, world: int, port: int, n_val: int, out: str) -> None:
    """Fit 3 epochs on 8 slides, validating on ``n_val`` of which only slide 2 has a tumour
    label (the distributed sampler gives it to process 0 only: 0, 2, 4, 6 | 1, 3, 5, 0); write
    what this process validated and logged."""
    pose_as_torchrun(rank, world, port)
    pl.seed_everything(0, verbose=False)
    module = MILModule(in_dim=8, tumour=True, genes=GENES)
    metrics: list[float] = []
    tumour: list[float] = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: MILModule) -> None:
            # after the epoch's validation (and the module's own hook, which logs the rank)
            metrics.append(float(trainer.callback_metrics["val/genes_rank"]))
            tumour.append(float(trainer.callback_metrics["val/tumour"]))

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=DDPStrategy(timeout=timedelta(seconds=120)),  # a collective one process
        # skips fails the test in 2 minutes instead of hanging for torch's default 30
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Record()],
    )
    loader = lambda data: DataLoader(data, batch_size=2, collate_fn=collate_bags)  # noqa: E731
    trainer.fit(module, loader(bags(8, 0)), loader(bags(n_val, 1, labelled=2)))
    record = {
        "logged": metrics,
        "tumour": tumour,
        "predictions": [(p.tolist(), t.tolist()) for p, t in module.val_gene_predictions],
    }
    (Path(out) / f"{rank}.json").write_text(json.dumps(record))
