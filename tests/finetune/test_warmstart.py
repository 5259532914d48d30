"""Warm start of the top-share tumour scorer (``--model.tumour_warm_start``): exemplar tiles
as starting directions, the start of lowest training loss kept, only training slides read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from histcode.finetune.heads import TopShareTumourPath
from histcode.finetune.module import MILModule
from histcode.finetune.options import TRAINER_DEFAULTS, CVOptions, DataOptions, ModelOptions
from histcode.finetune.pipeline import run_finetune
from histcode.finetune.warmstart import exemplar_directions, warm_start
from tests.finetune.finetune_cohort import SignalCohort


def _focal(seed: int, slides: int = 36, tiles: int = 200, dim: int = 8) -> dict:
    """Bags where 5 % of each tumour slide's tiles are shifted along ``u`` (3 sd), under a
    stronger nuisance: every tile varies along ``v`` with sd 3, whatever its class. Returns
    bags, tile labels, slide labels and ``u``."""
    rng = np.random.default_rng(seed)
    u, v = np.eye(dim)[0], np.eye(dim)[1]
    y = np.tile([1, 1, 0], slides // 3)
    bags, labels = [], []
    for label in y:
        x = rng.normal(size=(tiles, dim)) + np.outer(rng.normal(0, 3, tiles), v)
        t = np.zeros(tiles, dtype=int)
        if label:
            hit = rng.choice(tiles, round(0.05 * tiles), replace=False)
            x[hit] += 3.0 * u
            t[hit] = 1
        bags.append(x.astype(np.float32))
        labels.append(t)
    return {"bags": bags, "tiles": labels, "y": y, "u": u}


def test_exemplar_directions_point_along_the_planted_tumour_shift() -> None:
    c = _focal(0)
    directions, scored = exemplar_directions(c["bags"], c["y"], keep=5, share=0.05)
    assert directions.shape == (5, 8) and scored == 24 * 100
    np.testing.assert_allclose(np.linalg.norm(directions, axis=1), 1.0, rtol=1e-6)
    # whitened by the normal tiles, the nuisance direction (sd 3) hardly counts: the best
    # starts lean on the tumour shift
    assert directions[0] @ c["u"] > 0.7, directions[0]
    with pytest.raises(ValueError, match="both"):
        warm_start(TopShareTumourPath(8), c["bags"][:2], c["y"][:2])


def test_warm_start_keeps_the_start_of_lowest_loss_and_finds_the_tiles() -> None:
    """Fitted on 24 slides' labels, the warm-started scorer ranks the planted tiles of 12
    held-out slides near-perfectly (0.97–0.99 over seeds 0–3 when written); the scaler holds
    the training tiles' statistics."""
    c = _focal(1)
    train, test = slice(0, 24), slice(24, 36)
    path = TopShareTumourPath(8, share=0.05)
    chosen = warm_start(path, c["bags"][train], c["y"][train], starts=4, epochs=30)
    assert len(chosen.losses) == 4 and chosen.loss == min(chosen.losses)
    x = np.concatenate(c["bags"][train]).astype(np.float64)
    mean, scale = path.scale.statistics()
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scale.numpy(), x.std(0), rtol=1e-4)
    path.eval()
    with torch.no_grad():
        scores = [
            path.tiles(torch.from_numpy(b)[None], torch.ones(1, len(b), dtype=torch.bool))[0]
            for b in c["bags"][test]
        ]
    truth = np.concatenate(c["tiles"][test])
    assert roc_auc_score(truth, torch.cat(scores).numpy()) > 0.95
    slide = [float(s.topk(10).values.mean()) for s in scores]
    assert roc_auc_score(c["y"][test], slide) == 1.0


def test_starts_fitted_side_by_side_are_each_the_fit_it_would_be_alone() -> None:
    """The starts are the rows of one weight matrix, fitted on the sum of their losses: a
    start's fit (and loss) is the same whether 1 or 4 starts are fitted."""
    c = _focal(2)
    alone = warm_start(TopShareTumourPath(8), c["bags"], c["y"], starts=1, epochs=10)
    together = warm_start(TopShareTumourPath(8), c["bags"], c["y"], starts=4, epochs=10)
    assert len(together.losses) == 4
    assert together.losses[0] == pytest.approx(alone.losses[0], abs=2e-4)
    assert len(set(together.losses)) > 1  # the other starts went their own ways


def test_options_refuse_a_warm_start_without_top_share() -> None:
    with pytest.raises(ValueError, match="tumour_warm_start"):
        ModelOptions(tumour_warm_start=5)
    with pytest.raises(ValueError, match="tumour_warm_start"):
        ModelOptions(tumour_pooling="top_share", tumour_warm_start=-1)


def test_each_fold_warm_starts_on_its_training_slides_only(
    small_signal_cohort: SignalCohort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each fold's model is warm-started on its training slides, and its retrained model on
    training + validation slides; a test slide never reaches a warm start."""
    import json

    seen: list[set[int]] = []
    real = MILModule.warm_start

    def spy(self, bags, tumour, seed=0):
        seen.append({id(b) for b in bags})
        return real(self, bags, tumour, seed)

    monkeypatch.setattr(MILModule, "warm_start", spy)
    c = small_signal_cohort
    from histcode.finetune.bags import FeatureBags

    made: list[FeatureBags] = []
    original = FeatureBags.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(FeatureBags, "__init__", keep)
    run = run_finetune(
        c.features, "warm", labels=c.labels, expression=c.expression, out=tmp_path / "run",
        registry=tmp_path / "registry", data=DataOptions(tasks=["tumour"], max_tiles=None),
        model=ModelOptions(hidden=16, tumour_pooling="top_share", tumour_warm_start=2),
        cv=CVOptions(folds=3, register="none", patience=2, retrain=True),
        trainer={**TRAINER_DEFAULTS, "accelerator": "cpu", "max_epochs": 2},
    )  # fmt: skip
    folds = json.loads((run.out / "folds.json").read_text())
    assert len(seen) == 2 * len(folds)  # the fold's model, then its retrained model
    bags = made[-1]
    ids = {name: id(bags[name]) for name in c.slides}
    for k, fold in enumerate(folds):
        train, val, test = (
            {ids[s] for s in c.slides if c.patients[s] in fold["patients"][part]}
            for part in ("train", "val", "test")
        )
        assert seen[2 * k] == train and seen[2 * k + 1] == train | val
        assert not (seen[2 * k] | seen[2 * k + 1]) & test
