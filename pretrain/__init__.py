"""histcode.pretrain — stage 1: SimCLR pretraining of a tile encoder on unlabeled tiles.

Public API (imported lazily, so that ``histcode --help`` stays fast):

- :class:`~histcode.pretrain.data.TileDataModule`: shuffled uint8 tile batches read straight
  from the slides through a tile store (``tiles.zarr``), DDP-ready.
- :class:`~histcode.pretrain.augment.TileAugmentation` and
  :class:`~histcode.pretrain.augment.AugmentConfig`: SimCLR views made on the accelerator with
  per-sample parameters (crop, flips, 90° rotations, HED stain jitter, colour jitter,
  grayscale, blur).
- :class:`~histcode.pretrain.module.SimCLRModule`: zoo backbone + lightly's projection head and
  NT-Xent loss (negatives gathered across processes) as a LightningModule.
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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'histcode.pretrain' has no attribute {name!r}")
