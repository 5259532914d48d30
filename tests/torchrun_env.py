"""Posing as one process of a torchrun launch, for the tests' spawned DDP processes."""

from __future__ import annotations

import os


def pose_as_torchrun(rank: int, world: int, port: int) -> None:
    """Set the environment variables torchrun gives process ``rank`` of ``world`` on one host
    (those Lightning's ``TorchElasticEnvironment`` reads), so that Lightning's ``ddp`` strategy
    joins the gloo group on ``127.0.0.1:port`` instead of launching processes itself."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        LOCAL_WORLD_SIZE=str(world),
    )
