"""A process of the NT-Xent gathering test (kept apart so that spawned processes import little)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from lightly.loss import NTXentLoss


def half_batch_loss(
    rank: int, world: int, port: int, z0: torch.Tensor, z1: torch.Tensor, out: str
) -> None:
    """Join a gloo group, compute NT-Xent on this rank's share of the batch, write it to a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        share = len(z0) // world
        mine = slice(rank * share, (rank + 1) * share)
        loss = NTXentLoss(temperature=0.1, gather_distributed=True)(z0[mine], z1[mine])
        (Path(out) / f"{rank}.txt").write_text(repr(loss.item()))
    finally:
        dist.destroy_process_group()
