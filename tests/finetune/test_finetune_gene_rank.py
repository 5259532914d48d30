"""``--cv.genes_metric rank``: the genes' epoch is chosen on their rank correlation, pooled
over the inner folds, not on their summed squared error."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch.multiprocessing as mp

from histcode.finetune.cv import BestState, pooled_gene_rank
from histcode.finetune.metrics import gene_rank_loss, gene_spearman
from histcode.finetune.options import TRAINER_DEFAULTS, CVOptions, DataOptions, ModelOptions
from histcode.finetune.pipeline import run_finetune
from tests.finetune.finetune_cohort import SignalCohort
from tests.finetune.trackers import feed


def test_gene_rank_loss_does_not_see_how_wide_a_noise_head_swings() -> None:
    """0 for genes ranked perfectly, 2 reversed; a noise gene's predictions scaled 100-fold
    leave it unchanged (its squared error grows 10^4-fold); slides without a target are
    left out; a gene with fewer than 3 targets or constant predictions is skipped."""
    rng = np.random.default_rng(0)
    true = rng.normal(size=(12, 3))
    assert gene_rank_loss(true * 3 + 1, true) == pytest.approx(0.0)
    assert gene_rank_loss(-true, true) == pytest.approx(2.0)
    noise = rng.normal(size=12)
    pred = np.c_[true[:, :2], noise]
    wide = np.c_[true[:, :2], 100 * noise]
    assert gene_rank_loss(wide, true) == pytest.approx(gene_rank_loss(pred, true))
    assert ((wide - true) ** 2).mean() > 1000 * ((pred - true) ** 2).mean()
    normal = true.copy()
    normal[:4] = np.nan  # normal slides: no fold change to rank
    garbage = pred.copy()
    garbage[:4] = 1e6
    assert gene_rank_loss(garbage, normal) == pytest.approx(gene_rank_loss(pred[4:], true[4:]))
    flat = pred.copy()
    flat[:, 2] = 0.5
    assert gene_rank_loss(flat, true) == pytest.approx(0.0)  # only the two ranked genes
    assert gene_rank_loss(pred[:2], true[:2]) is None


def _tracker(
    monitor: dict[str, float], logged: list[dict[str, float]], missing_ok: bool = False
) -> BestState:
    """A :class:`BestState` fed ``logged`` as Lightning would, one dict per epoch."""
    return feed(BestState(monitor, missing_ok=missing_ok), logged)


def test_pooled_rank_finds_the_epoch_the_summed_gene_loss_misses() -> None:
    """Five inner folds of 3 validation tumour slides; 2 genes the model learns over 40
    epochs, 6 whose heads fit noise ever wider. The summed squared error is lowest early
    (the noise heads' error grows faster than the signal genes' falls); the rank pooled
    over the 15 slides keeps improving with the signal genes, and its curve is what the
    averaged tracker chooses on (the other terms, here the tumour loss, still count). An
    inner fold too small to rank on its own (no ``val/genes_rank`` logged) is no error
    there: the pooled rank stands in for it."""
    rng = np.random.default_rng(1)
    folds, slides, epochs = 5, 3, 40
    true = rng.normal(size=(folds, slides, 8))
    drift = rng.normal(size=(folds, slides, 8))  # each slide's noise-head prediction
    jitter = rng.normal(size=(epochs, folds, slides, 2))
    modules, trackers = [], []
    for f in range(folds):
        preds, logged = [], []
        for e in range(epochs):
            learnt = e / epochs
            signal = learnt * true[f, :, :2] + (1 - learnt) * jitter[e, f]
            noise = 0.1 + 0.05 * e * drift[f, :, 2:]
            pred = np.concatenate([signal, noise], axis=1)
            preds.append((pred, true[f]))
            logged.append(
                {
                    "val/tumour": 0.3,
                    "val/log2fc": float(((pred - true[f]) ** 2).mean()),
                    "val/genes_rank": gene_rank_loss(pred, true[f]) or 1.0,
                }
            )
        modules.append(SimpleNamespace(val_gene_predictions=preds))
        trackers.append(logged)
    by_loss = BestState.averaged(
        [_tracker({"val/tumour": 1, "val/log2fc": 1}, t) for t in trackers]
    )
    assert by_loss.best_epoch < 10
    pooled = pooled_gene_rank(modules)  # type: ignore[arg-type]
    assert pooled is not None and len(pooled["val/genes_rank"]) == epochs
    monitor = {"val/tumour": 1.0, "val/genes_rank": 1.0}
    trackers[0] = [{"val/tumour": 0.3}] * epochs  # a fold too small to rank alone
    with pytest.raises(ValueError, match="val/genes_rank needs 3"):
        _tracker({"val/genes_rank": 1.0}, trackers[0])
    assert np.isnan(_tracker({"val/genes_rank": 1.0}, trackers[0], True).history).all()
    by_rank = BestState.averaged([_tracker(monitor, t, True) for t in trackers], pooled)
    assert by_rank.best_epoch > 30
    assert by_rank.history == pytest.approx(0.3 + np.asarray(pooled["val/genes_rank"]))
    assert by_rank.tasks["val/genes_rank"] == pooled["val/genes_rank"]
    # rank_signal: only the genes the pooled predictions show a signal for are averaged
    signal = pooled_gene_rank(modules, signal_only=True)  # type: ignore[arg-type]
    assert signal is not None
    last = [np.concatenate([m.val_gene_predictions[-1][k] for m in modules]) for k in (0, 1)]
    rho = gene_spearman(*last)
    assert signal["val/genes_rank"][-1] == pytest.approx(1 - rho[:2].mean())
    assert signal["val/genes_rank"][-1] < pooled["val/genes_rank"][-1] - 0.3


def test_rank_signal_needs_inner_folds_and_falls_back_to_all_genes() -> None:
    """``rank_signal`` is refused without inner folds (with the fix); where no gene shows a
    signal it ranks them all, as ``rank`` does."""
    with pytest.raises(ValueError, match=r"--cv\.inner 5"):
        CVOptions(genes_metric="rank_signal")
    rng = np.random.default_rng(2)
    true = rng.normal(size=(12, 4))
    preds = [(rng.normal(size=(12, 4)), true) for _ in range(5)]
    modules = [SimpleNamespace(val_gene_predictions=preds)]
    every = pooled_gene_rank(modules)  # type: ignore[arg-type]
    assert pooled_gene_rank(modules, signal_only=True) == every  # type: ignore[arg-type]


@pytest.mark.parametrize("select", ["total", "per_task"])
def test_rank_selection_runs_and_says_what_chose(
    small_signal_cohort: SignalCohort, tmp_path: Path, select: str
) -> None:
    """End to end with inner folds: folds.json records the monitor (the genes' losses
    replaced by ``val/genes_rank``, per part with ``per_task``) and the pooled rank curve
    over every epoch; every slide is tested once; a bad value is refused."""
    top_share = {
        "tumour_pooling": "top_share", "tumour_context": True,
        "tumour_fraction_genes": True, "tumour_warm_start": 0,
    }  # fmt: skip
    run = run_finetune(
        small_signal_cohort.features,
        f"rank-{select}",
        labels=small_signal_cohort.labels,
        expression=small_signal_cohort.expression,
        out=tmp_path / "run",
        registry=tmp_path / "registry",
        data=DataOptions(tasks=["tumour", "genes"], max_tiles=None),
        model=ModelOptions(hidden=16, **(top_share if select == "per_task" else {})),
        cv=CVOptions(
            folds=3, register="none", retrain=True, inner=3, select=select, genes_metric="rank"
        ),
        trainer={**TRAINER_DEFAULTS, "accelerator": "cpu", "max_epochs": 4},
    )
    folds = json.loads((run.out / "folds.json").read_text())
    for fold in folds:
        monitor = fold["selection_monitor"]
        genes = monitor["genes"] if select == "per_task" else monitor
        assert "val/genes_rank" in genes and "val/log2fc" not in genes
        assert "val/classes" not in genes
        if select == "total":
            assert "val/tumour" in monitor
        else:
            assert set(monitor["tumour"]) <= {"val/tumour", "val/negatives"}
        curve = fold["val_curves"]["val/genes_rank"]
        assert len(curve) == 4 and all(0 <= v <= 2 for v in curve)
        assert 0 <= fold["best_epoch"] < 4
    predictions = pd.read_csv(run.out / "predictions.csv")
    assert sorted(predictions["slide_id"]) == sorted(small_signal_cohort.slides)
    with pytest.raises(ValueError, match=r"cv\.genes_metric"):
        CVOptions(genes_metric="pearson")  # type: ignore[arg-type]


def test_rank_on_a_small_validation_split_says_so(
    small_signal_cohort: SignalCohort, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One validation split holds a few tumour slides: ranking the genes on them is coarse
    (a warning naming ``--cv.inner 5``) or, below 3, impossible (refused with the fix)."""

    def run(val_fraction: float) -> None:
        run_finetune(
            small_signal_cohort.features,
            "rank-split",
            labels=small_signal_cohort.labels,
            expression=small_signal_cohort.expression,
            out=tmp_path / f"run{val_fraction}",
            registry=tmp_path / "registry",
            data=DataOptions(tasks=["tumour", "genes"], max_tiles=None),
            model=ModelOptions(hidden=16),
            cv=CVOptions(
                folds=2, register="none", genes_metric="rank", patience=2, val_fraction=val_fraction
            ),
            trainer={**TRAINER_DEFAULTS, "accelerator": "cpu", "max_epochs": 3},
        )

    with caplog.at_level("WARNING", logger="histcode.finetune"):
        run(0.5)
    warned = [r.getMessage() for r in caplog.records if "genes_metric rank" in r.getMessage()]
    assert len(warned) == 2 and all("coarse" in m and "--cv.inner 5" in m for m in warned)
    with pytest.raises(ValueError, match=r"needs 3 or more validation slides.*--cv\.inner 5"):
        run(0.1)


def test_ddp_processes_rank_the_same_slides(monkeypatch, tmp_path: Path, free_port: int) -> None:
    """Two gloo processes (Lightning ``ddp`` on CPU) validating 7 slides, 4 each (one
    repeated by the distributed sampler's padding): each process ranks all 7 slides once, so
    both log the same ``val/genes_rank`` and keep the same predictions for the inner folds'
    pooled rank, and would choose the same epoch. Only one validation slide, on process 0's
    share, has a tumour label: both processes still log ``val/tumour``, the same value."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # for the spawned processes
    from ddp_rank_worker import fit

    mp.spawn(fit, args=(2, free_port, 7, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert len(r0["logged"]) == 3 and r0["logged"] == r1["logged"]
    assert len(r0["tumour"]) == 3 and r0["tumour"] == r1["tumour"]
    assert r0["predictions"] == r1["predictions"]
    for (pred, true), logged in zip(r0["predictions"], r0["logged"], strict=True):
        pred, true = np.array(pred), np.array(true)
        assert pred.shape == (7, 3) and len({tuple(t) for t in true}) == 7  # each slide once
        assert logged == pytest.approx(gene_rank_loss(pred, true), rel=1e-6)


def test_gather_slides_keeps_each_slide_once_in_order() -> None:
    """One process: the batches' rows in order, a slide repeated (the distributed sampler's
    padding) kept at its first place; nothing validated gives (0, 0); the loss terms' sums
    of several shares add up, a term one share lacks kept."""
    from histcode.finetune.module import gather_slides, pooled_sums

    rows = np.arange(12, dtype=float).reshape(4, 3)
    batches = [(["a", "b"], rows[:2], -rows[:2]), (["c", "a"], rows[2:], -rows[2:])]
    pred, true = gather_slides(batches)
    assert pred.tolist() == rows[:3].tolist() and true.tolist() == (-rows[:3]).tolist()
    assert gather_slides([])[0].shape == (0, 0)
    shares = [{"log2fc": (1.0, 2), "tumour": (0.5, 1)}, {"log2fc": (3.0, 2)}]
    assert pooled_sums(shares) == {"log2fc": (4.0, 4), "tumour": (0.5, 1)}
