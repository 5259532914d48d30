"""Pretrain a tile encoder with SimCLR on tiles streamed from the slides, and register it.

``histcode pretrain --config configs/pretrain/simclr.yaml --data.tiles tiles.zarr --name NAME``

A Lightning run (``LightningCLI``): every ``--model.*``, ``--data.*`` and ``--trainer.*`` option
(devices, num_nodes, strategy=ddp, precision, max_steps, …) and ``--checkpoint.*``
(``ModelCheckpoint``) can be given in YAML or on the command line; ``--print_config`` shows the
resolved configuration. The run folder ``--out`` (default ``runs/pretrain/<name>``) receives
``config.yaml``, ``checkpoints/last.ckpt``, the Lightning logs and ``summary.json``; rerunning
the same command resumes from ``last.ckpt``. At the end, process 0 registers the encoder as
the next version of ``--name`` and prints one JSON line ``{"ref": "name@N", …}``.

This module imports nothing heavy at import time (``histcode --help`` reads this docstring);
the work lives in :mod:`histcode.pretrain.runner`.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None, prog: str = "histcode pretrain") -> int:
    """Run ``histcode pretrain``.

    Args:
        argv: the command's arguments (without ``histcode pretrain``).
        prog: program name for usage and error messages.

    Returns:
        Exit status: 0 success, 2 unusable arguments or inputs, 130 interrupted.
    """
    from histcode.pretrain.runner import run

    return run(list(argv or []), prog, description=(__doc__ or "").strip().split("\n\n")[0])
