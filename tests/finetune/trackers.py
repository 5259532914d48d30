"""Feeding a :class:`~histcode.finetune.cv.BestState` the validation metrics Lightning would
log, epoch by epoch, for the epoch-selection tests."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch

from histcode.finetune.cv import BestState


def feed(best: BestState, logged: Iterable[dict[str, float]]) -> BestState:
    """Run ``best``'s validation hook once per epoch on ``logged`` (one dict of
    ``val/<metric>: value`` per epoch) and return it."""
    layer = torch.nn.Linear(1, 1)
    for epoch, metrics in enumerate(logged):
        trainer = SimpleNamespace(
            sanity_checking=False, current_epoch=epoch,
            callback_metrics={k: torch.tensor(float(v)) for k, v in metrics.items()},
        )  # fmt: skip
        best.on_validation_end(trainer, layer)  # type: ignore[arg-type]
    return best
