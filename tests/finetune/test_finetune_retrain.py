"""``--cv.retrain``: each fold's model is retrained on its training and validation patients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histcode.featurestore import FeatureStore
from histcode.finetune.heads import slide_model_builders
from histcode.finetune.options import TRAINER_DEFAULTS, CVOptions, DataOptions, ModelOptions
from histcode.finetune.pipeline import run_finetune
from histcode.registry import Registry
from tests.finetune.finetune_cohort import SignalCohort
from tests.finetune.trackers import feed


def _run(cohort: SignalCohort, root: Path, retrain: bool) -> tuple[Path, Registry]:
    run = run_finetune(
        cohort.features,
        "retrain" if retrain else "plain",
        labels=cohort.labels,
        expression=cohort.expression,
        out=root / "run",
        registry=root / "registry",
        data=DataOptions(tasks=["tumour"], max_tiles=None),
        model=ModelOptions(hidden=16),
        cv=CVOptions(folds=3, register="folds", retrain=retrain, patience=3),
        trainer={**TRAINER_DEFAULTS, "accelerator": "cpu", "max_epochs": 6},
    )
    return run.out, Registry(root / "registry")


@pytest.mark.parametrize("retrain", [False, True], ids=["plain", "retrain"])
def test_fold_models_learn_from_the_slides_the_card_lists(
    small_signal_cohort: SignalCohort, tmp_path: Path, retrain: bool
) -> None:
    """The tile scaler counts every training tile once an epoch: a retrained fold model saw
    its training and validation slides for best_epoch + 1 epochs; a plain one only its
    training slides up to its best epoch. Its card and folds.json say which."""
    out, registry = _run(small_signal_cohort, tmp_path, retrain)
    store = FeatureStore(small_signal_cohort.features)
    folds = json.loads((out / "folds.json").read_text())
    predictions = pd.read_csv(out / "predictions.csv")
    name = "retrain" if retrain else "plain"
    for k, fold in enumerate(folds):
        model, card = registry.load(f"{name}@{k + 1}", builders=slide_model_builders())
        extra = card.extra
        assert fold["retrained_with_validation"] is retrain
        assert extra["retrained_with_validation"] is retrain
        val = set(extra["validation_slide_ids"])
        trained = set(extra["trained_slide_ids"])
        assert val and (val <= trained) is retrain and not (val & trained and not retrain)
        tiles = sum(len(store.read(s)) for s in trained)
        seen = float(model.aggregator.scale.count)
        assert seen == (fold["best_epoch"] + 1) * tiles
        test = set(predictions.slide_id[predictions.fold == fold["fold"]])
        assert test and not test & trained


def test_smoothed_validation_chooses_past_a_single_noisy_dip() -> None:
    """``cv.smooth``: the best epoch is chosen on the mean of the last N validation values,
    so a one-epoch dip of noise early on loses to a lasting fall later; the history stays raw
    and the kept weights are those of the chosen epoch."""
    from types import SimpleNamespace

    import torch

    from histcode.finetune.cv import BestState

    curve = [2.0, 1.2, 1.9, 1.8, 1.5, 1.4, 1.4, 1.3, 1.45, 1.5]  # a dip at 1, a fall at 5-7
    chosen = {}
    for smooth in (1, 3):
        best, layer = BestState("val/loss", smooth), torch.nn.Linear(1, 1)
        for epoch, value in enumerate(curve):
            torch.nn.init.constant_(layer.weight, float(epoch))
            trainer = SimpleNamespace(
                sanity_checking=False, current_epoch=epoch,
                callback_metrics={"val/loss": torch.tensor(value)},
            )  # fmt: skip
            best.on_validation_end(trainer, layer)
        assert best.history == pytest.approx(curve)
        assert float(best.state["weight"]) == best.best_epoch
        chosen[smooth] = (best.best_epoch, best.best)
    assert chosen[1] == (1, pytest.approx(1.2))
    assert chosen[3] == (7, pytest.approx((1.4 + 1.4 + 1.3) / 3))
    with pytest.raises(ValueError, match=r"cv\.smooth"):
        CVOptions(smooth=0)


def test_validation_says_when_one_task_chose_an_early_epoch_for_all() -> None:
    """The total validation loss chose epoch 0 because the tumour task's loss only rose, while
    the genes' kept falling: the fold's record names both; an ordinary curve gets no warning."""

    from histcode.finetune.cv import BestState

    def run(tumour: list[float], log2fc: list[float]) -> BestState:
        pairs = zip(tumour, log2fc, strict=True)
        logged = ({"val/loss": t + g, "val/tumour": t, "val/log2fc": g} for t, g in pairs)
        return feed(BestState("val/loss"), logged)

    epochs = np.arange(40)
    rising = list(3.0 + 0.05 * epochs)  # a validation slide wrong from the warm start on
    falling = list(0.44 * np.exp(-epochs / 10) + 0.05)
    best = run(rising, falling)
    assert best.best_epoch == 0 and best.tasks["val/log2fc"] == pytest.approx(falling)
    warning = best.warning()
    assert warning is not None
    assert "chose 1 of 40 epochs" in warning and "val/log2fc 0.49 → 0.0" in warning
    assert "val/tumour 3 → 4.95 rose" in warning and "--cv.monitor" in warning
    assert "--cv.select per_task" in warning
    # both falling: the epoch is late, nothing to say
    assert run(list(1.0 * np.exp(-epochs / 20)), falling).warning() is None
    # early epoch, but no other task fell by half after it: nothing to say either
    assert run(rising, list(0.3 + 0.001 * epochs)).warning() is None


def test_per_task_selection_parts_and_merge() -> None:
    """``cv.select per_task`` splits a top-share model into its tumour scorer and the rest
    (the genes' heads and the scorer they read); a model with one part is left alone; the
    merged weights take each part from its own epoch."""
    from types import SimpleNamespace

    import torch

    from histcode.finetune.cv import _merge_parts, selection_parts
    from histcode.finetune.heads import build_slide_model
    from histcode.finetune.options import LossOptions

    def module(**kwargs):
        model = build_slide_model("abmil", 8, 16, n_genes=2, **kwargs)
        return SimpleNamespace(model=model, loss_options=LossOptions())

    parts = selection_parts(
        module(tumour_pooling="top_share", tumour_context=True, tumour_fraction_genes=True)
    )
    assert parts is not None and set(parts) == {"tumour", "genes"}
    assert parts["tumour"].prefix == "model.tumour_path."
    assert parts["tumour"].monitor == {"val/tumour": 1.0, "val/negatives": 1.0}
    assert parts["genes"].monitor == {"val/log2fc": 1.0, "val/classes": 0.5, "val/categorical": 1.0}
    assert selection_parts(module()) is None  # attention pooling: the tumour logit is the head's
    # the genes read the tumour scorer itself (no tile context): not separable
    assert selection_parts(module(tumour_pooling="top_share", tumour_fraction_genes=True)) is None
    states = {
        "tumour": {"model.tumour_path.w": torch.tensor(1.0), "model.head.w": torch.tensor(1.0)},
        "genes": {"model.tumour_path.w": torch.tensor(2.0), "model.head.w": torch.tensor(2.0)},
    }
    merged = _merge_parts(parts, states)
    assert float(merged["model.tumour_path.w"]) == 1.0 and float(merged["model.head.w"]) == 2.0


def test_per_task_selection_runs_and_records_each_parts_epoch(
    small_signal_cohort: SignalCohort, tmp_path: Path
) -> None:
    """With retraining, each fold records the epoch of its tumour scorer and of the rest;
    the fold's best epoch is the genes' and every test slide is predicted."""
    run = run_finetune(
        small_signal_cohort.features,
        "per-task",
        labels=small_signal_cohort.labels,
        expression=small_signal_cohort.expression,
        out=tmp_path / "run",
        registry=tmp_path / "registry",
        data=DataOptions(tasks=["tumour", "genes"], max_tiles=None),
        model=ModelOptions(
            hidden=16,
            tumour_pooling="top_share",
            tumour_context=True,
            tumour_fraction_genes=True,
            tumour_warm_start=0,
        ),
        cv=CVOptions(folds=3, register="none", retrain=True, patience=3, select="per_task"),
        trainer={**TRAINER_DEFAULTS, "accelerator": "cpu", "max_epochs": 6},
    )
    folds = json.loads((run.out / "folds.json").read_text())
    for fold in folds:
        epochs = fold["part_epochs"]
        assert set(epochs) == {"tumour", "genes"} and fold["best_epoch"] == epochs["genes"]
        assert all(0 <= e < 6 for e in epochs.values())
        assert fold["selection_warning"] is None
    predictions = pd.read_csv(run.out / "predictions.csv")
    assert set(predictions["slide_id"]) == set(small_signal_cohort.slides)
    assert predictions["tumour_prob"].between(0, 1).all()
    with pytest.raises(ValueError, match=r"cv\.select"):
        CVOptions(select="each")


def test_inner_folds_average_the_curves_so_one_slide_does_not_choose() -> None:
    """``cv.inner``: one inner fold's rising tumour loss (a validation slide wrong from the
    start) no longer picks epoch 0 for all: averaged with the folds whose losses fall, the
    curve is lowest late; runs of different lengths are averaged over the epochs all
    reached; smoothing applies to the averaged curve."""

    from histcode.finetune.cv import BestState

    def run(tumour: np.ndarray, log2fc: np.ndarray, smooth: int = 1) -> BestState:
        pairs = zip(tumour, log2fc, strict=True)
        logged = ({"val/loss": t + g, "val/tumour": t, "val/log2fc": g} for t, g in pairs)
        return feed(BestState("val/loss", smooth), logged)

    epochs = np.arange(40)
    falling = 0.44 * np.exp(-epochs / 10) + 0.05
    bad = run(3.0 + 0.05 * epochs, falling)  # alone it chooses epoch 0
    good = [run(0.5 * np.exp(-epochs / 15) + 0.2, falling) for _ in range(4)]
    assert bad.best_epoch == 0
    mean = BestState.averaged([bad, *good])
    assert mean.best_epoch > 20 and mean.state is None
    assert mean.history == pytest.approx(np.mean([b.history for b in (bad, *good)], axis=0))
    assert mean.tasks["val/log2fc"] == pytest.approx(falling)
    assert mean.warning() is None
    short = run(3.0 + 0.05 * epochs[:25], falling[:25])
    assert len(BestState.averaged([short, *good]).history) == 25
    dip = np.r_[1.0, 0.1, np.full(38, 0.8)] - 0.01 * epochs  # a one-epoch dip, a slow fall
    assert BestState.averaged([run(dip, 0 * epochs)]).best_epoch == 1
    assert BestState.averaged([run(dip, 0 * epochs, smooth=3)]).best_epoch == 39


def test_inner_folds_validate_every_training_patient_once(
    small_signal_cohort: SignalCohort, tmp_path: Path
) -> None:
    """Each fold's inner validation parts partition its training patients (never a test
    patient); the averaged curve covers every epoch (no early stopping); every slide is
    tested once; ``cv.inner`` without ``cv.retrain`` is refused with the fix."""
    run = run_finetune(
        small_signal_cohort.features,
        "inner",
        labels=small_signal_cohort.labels,
        expression=small_signal_cohort.expression,
        out=tmp_path / "run",
        registry=tmp_path / "registry",
        data=DataOptions(tasks=["tumour", "genes"], max_tiles=None),
        model=ModelOptions(hidden=16),
        cv=CVOptions(folds=3, register="none", retrain=True, patience=1, inner=3),
        trainer={**TRAINER_DEFAULTS, "accelerator": "cpu", "max_epochs": 4},
    )
    folds = json.loads((run.out / "folds.json").read_text())
    for fold in folds:
        inner = fold["inner_val_patients"]
        validated = [p for part in inner for p in part]
        training = fold["patients"]["train"] + fold["patients"]["val"]
        assert len(inner) == 3 and sorted(validated) == sorted(training)
        assert not set(validated) & set(fold["patients"]["test"])
        assert len(fold["val_history"]) == 4 and fold["retrained_with_validation"]
        assert 0 <= fold["best_epoch"] < 4
    predictions = pd.read_csv(run.out / "predictions.csv")
    assert sorted(predictions["slide_id"]) == sorted(small_signal_cohort.slides)
    with pytest.raises(ValueError, match=r"--cv\.retrain true"):
        CVOptions(inner=5)
    with pytest.raises(ValueError, match=r"cv\.inner"):
        CVOptions(inner=1, retrain=True)
