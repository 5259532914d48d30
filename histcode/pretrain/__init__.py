"""histcode.pretrain — stage 1: contrastive pretraining (SimCLR, MoCo) of a tile encoder.

Public API (imported lazily, so that ``histcode --help`` stays fast):

- :class:`~histcode.pretrain.data.TileDataModule`: shuffled uint8 tile batches read straight
  from the slides through a tile store (``tiles.zarr``), DDP-ready.
- :class:`~histcode.pretrain.augment.TileAugmentation` and
  :class:`~histcode.pretrain.augment.AugmentConfig`: SimCLR views made on the accelerator with
  per-sample parameters (crop, flips, 90° rotations, HED stain jitter, colour jitter,
  grayscale, blur).
- :class:`~histcode.pretrain.module.ContrastiveModule` (also ``SimCLRModule``): zoo backbone +
  lightly's projection head and NT-Xent loss (negatives gathered across processes) as a
  LightningModule; ``method="moco"`` adds lightly's momentum key encoder and memory bank.
- :class:`~histcode.pretrain.collapse.CollapseMonitor`,
  :func:`~histcode.pretrain.collapse.chance_loss`,
  :func:`~histcode.pretrain.collapse.effective_rank`: collapse checks (loss against chance,
  feature spread, effective rank) with the verdict the registry card records.
- ``histcode pretrain`` (:mod:`histcode.pretrain.command`): the LightningCLI run that trains,
  resumes and registers the encoder.

This stage imports only :mod:`histcode` (never ``histcode.finetune``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AugmentConfig": "histcode.pretrain.augment",
    "TileAugmentation": "histcode.pretrain.augment",
    "TileDataModule": "histcode.pretrain.data",
    "SimCLRModule": "histcode.pretrain.module",
    "ContrastiveModule": "histcode.pretrain.module",
    "CollapseMonitor": "histcode.pretrain.collapse",
    "chance_loss": "histcode.pretrain.collapse",
    "effective_rank": "histcode.pretrain.collapse",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'histcode.pretrain' has no attribute {name!r}")
