"""Aggregation: what slide-level tumour AUC each way of pooling the *same* tile features reaches.

A finished ``histcode demo`` folder holds tile features, truth masks and the pipeline's own
patient-grouped folds. This benchmark keeps the features and the folds fixed and swaps only
the way tile features become a slide score, so that a weak slide result can be blamed on the
aggregation or on the features. Every method is fitted on the training folds of the run's
``finetune/<arm>/predictions.csv`` (its ``fold`` column) and scores the held-out fold; the test
fold never chooses anything (no tile label, slide label, epoch or threshold of it is seen).

Methods (:data:`METHODS`; a slide's score is the mean of its top share of tile scores,
:func:`top_share_mean`):

- ``truth``: the ceiling. A linear tile probe (features standardised over the training tiles,
  logistic regression C=0.1, balanced classes) trained on the truth-mask tile labels of the
  training slides (:func:`benchmarks.ceiling.label_tiles`: labels MIL never gets); top 2 %.
- ``knn_normal``: anomaly score against normal tissue. Each tile's distance to its 10th
  nearest tile among the training folds' normal slides (features standardised by those
  tiles, at most 20,000 of them drawn); top 2 %.
- ``pu_logistic``: positive-unlabelled logistic regression. Negatives: up to 300 random
  tiles of each training normal slide; positives: at first up to 300 random tiles of each
  training tumour slide, then 3 times each tumour slide's top 5 % by the current scorer;
  C=0.1, balanced; features standardised by the negatives; top 2 %.
- ``top_share_val`` / ``top_share_all``: a linear tile scorer trained end to end on slide
  labels. Slide logit = mean of the top 5 % tile logits; loss = BCE of the slide logits on
  the slide labels + BCE of every tile of a normal slide against 0; AdamW lr 1e-2 (weight
  decay 1e-2), batches of 4 slides, 100 epochs; slide score = mean of the top 5 % tile
  logits. ``_val`` holds 20 % of the training slides out and keeps the epoch of lowest loss
  on them (as the pipeline chooses its epoch by default); ``_all`` trains on every training
  slide for the fixed 100 epochs (what ``histcode finetune --cv.retrain`` approximates).
- ``top_share_warm``: the same scorer started as ``histcode finetune --model.tumour_warm_start
  10`` starts it: the best (lowest training loss) of 10 directions made from tiles of the
  training tumour slides, whitened by the normal tiles (:mod:`histcode.finetune.warmstart`),
  each fitted alone for 100 epochs; top 5 %.
- ``fraction_truth``: learning from label proportions, an oracle like ``truth``. The same
  linear scorer, its loss the squared gap (in 5-point units) between each training slide's
  mean tile probability and its true tumour fraction from the truth masks, plus every tile
  of a normal slide against 0; no slide-label term; 100 epochs; top 5 %.

Figures per demo and method: the pooled out-of-fold slide AUC, and the within-site AUC (mean
of the per-site AUCs over sites with tumour and normal slides). For reference the pipeline's
own figures are read from the same ``predictions.csv`` (``tumour_prob``): the mean of its
per-fold AUCs (what ``metrics.json`` reports), its pooled AUC and its within-site AUC. Over
several demos each figure is summarised as mean ± sd.

The core functions take plain arrays (a list of per-slide ``(n_i, D)`` feature arrays, tile
labels, slide labels, fold ids), so they run without a demo (:func:`out_of_fold`,
:func:`score_slides`). Without a ``DEMO`` argument the benchmark makes its own demos under
``--work`` (``histcode demo --difficulty hard --patients 30 --seed S`` for each of
``--demo-seeds``; ~40 min each on 2 CPU cores; a finished one is reused).

    python -m benchmarks.aggregation DEMO [DEMO ...] [--arm simclr|naive] \\
        [--methods truth knn_normal pu_logistic top_share_val top_share_all] [--seed 0]

Prints one JSON line; its ``SPEC`` renders it for ``benchmarks.run`` (:func:`section`).

Measured on 2 shared CPU cores (hard cohort, 30 patients, demo seeds 0–2, SimCLR features,
seed 0; ``benchmarks/out/aggregation/hard30_simclr.json``), pooled slide AUC, mean ± sd (per
demo): truth 0.74 ± 0.10 (0.79 / 0.80 / 0.63), knn_normal 0.57 ± 0.09 (0.57 / 0.49 / 0.66),
pu_logistic 0.61 ± 0.09 (0.72 / 0.58 / 0.54), top_share_val 0.53 ± 0.11 (0.62 / 0.56 /
0.40), top_share_all 0.62 ± 0.10 (0.73 / 0.59 / 0.54); the demos' own pipeline (gated
attention MIL) 0.44 ± 0.04. 73 s for the three demos with one torch thread (the top-share
scorer is many times slower on more threads: its steps are tiny).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.spec import Benchmark, Section, tail
from histcode.finetune.context import context_features

#: Feature store of each finetune arm of a demo (``features/<name>.zarr``).
ARM_FEATURES = {"simclr": "simclr", "naive": "random"}
#: Share of a slide's top tile scores averaged into its score (truth, knn, PU).
TOP = 0.02
#: Top share of the top-share scorer (its training pool and its slide score).
SHARE = 0.05
#: Unit of the tumour-fraction error of ``fraction_truth`` (5 percentage points).
FRACTION_UNIT = 0.05
#: The demos the benchmark makes when given none.
DEMO_PATIENTS = 30
DEMO_DIFFICULTY = "hard"


# -- feature views --------------------------------------------------------------------------


#: Views of the tile features the methods can be run on (``--features``).
FEATURE_VIEWS: dict[str, str] = {
    "raw": "the tile features as stored",
    "context": "each tile's features, its 3 × 3 neighbourhood mean, and both minus the "
    "slide's median tile (context_features; 4 × D)",
}


def feature_view(data: DemoData, view: str) -> DemoData:
    """``data`` with its bags replaced by the ``view`` of them (:data:`FEATURE_VIEWS`)."""
    if view == "raw":
        return data
    if view != "context":
        raise ValueError(f"feature view {view!r}: choose from {sorted(FEATURE_VIEWS)}")
    if len(data.coords) != len(data.bags):
        raise ValueError("the context view needs every slide's tile corners (DemoData.coords)")
    pairs = zip(data.bags, data.coords, strict=True)
    return replace(data, bags=[context_features(b, c) for b, c in pairs])


# -- scores ---------------------------------------------------------------------------------


def top_share_mean(scores: np.ndarray, share: float) -> float:
    """Mean of the top ``share`` of a slide's tile scores (at least one tile).

    Args:
        scores: ``(n,)`` tile scores of one slide, ``n >= 1``.
        share: share of the tiles averaged, e.g. 0.02.
    """
    own = np.sort(np.asarray(scores, dtype=np.float64))
    return float(own[-max(1, round(len(own) * share)) :].mean())


def _standardiser(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``x ↦ (x − mean) / (sd + 1e-6)`` with the mean and sd of ``x`` ``(N, D)``."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    return lambda z: (z - mu) / sd


def _both(labels: np.ndarray, what: str) -> None:
    """Raise unless ``labels`` hold both 0 and 1."""
    if not {0, 1} <= set(np.asarray(labels).astype(int).tolist()):
        raise ValueError(f"{what} needs training slides or tiles of both classes")


def truth_probe(
    train: Sequence[np.ndarray],
    y_train: np.ndarray,
    test: Sequence[np.ndarray],
    tiles_train: Sequence[np.ndarray],
    c: float = 0.1,
    top: float = TOP,
    seed: int = 0,
) -> np.ndarray:
    """The ceiling: a linear tile probe on truth-mask tile labels of the training slides.

    Args:
        train: training slides' features, each ``(n_i, D)``.
        y_train: ``(S_train,)`` slide labels (unused: the probe sees tile labels only).
        test: test slides' features, each ``(m_j, D)``.
        tiles_train: training slides' tile labels, each ``(n_i,)`` in {1 tumour, 0 normal,
            -1 left out}.
        c: inverse L2 strength of the logistic regression (on standardised features).
        top: share of a test slide's top tile scores averaged into its score.
        seed: unused (the fit is deterministic); kept for a common signature.

    Returns:
        ``(S_test,)`` slide scores.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate(train)
    y = np.concatenate(tiles_train).astype(int)
    keep = y >= 0
    _both(y[keep], "the truth probe")
    z = _standardiser(x)
    clf = LogisticRegression(C=c, max_iter=1000, class_weight="balanced")
    clf.fit(z(x[keep]), y[keep])
    return np.array([top_share_mean(clf.decision_function(z(f)), top) for f in test])


def knn_normal(
    train: Sequence[np.ndarray],
    y_train: np.ndarray,
    test: Sequence[np.ndarray],
    tiles_train: Sequence[np.ndarray] | None = None,
    k: int = 10,
    top: float = TOP,
    max_normals: int = 20000,
    seed: int = 0,
) -> np.ndarray:
    """Anomaly score: each tile's distance to its ``k``-th nearest training normal tile.

    Args:
        train: training slides' features, each ``(n_i, D)``.
        y_train: ``(S_train,)`` slide labels; the tiles of the 0 slides are the reference.
        test: test slides' features, each ``(m_j, D)``.
        tiles_train: unused (no tile labels).
        k: the neighbour whose distance is the tile's score.
        top: share of a test slide's top tile scores averaged into its score.
        max_normals: at most this many reference tiles, drawn at random.
        seed: seed of that draw.

    Returns:
        ``(S_test,)`` slide scores.
    """
    from sklearn.neighbors import NearestNeighbors

    normals = [f for f, y in zip(train, y_train, strict=True) if y == 0]
    if not normals:
        raise ValueError("knn_normal needs normal slides among the training slides")
    ref = np.concatenate(normals)
    rng = np.random.default_rng(seed)
    if len(ref) > max_normals:
        ref = ref[rng.choice(len(ref), max_normals, replace=False)]
    z = _standardiser(ref)
    nn = NearestNeighbors(n_neighbors=min(k, len(ref))).fit(z(ref))
    return np.array([top_share_mean(nn.kneighbors(z(f))[0][:, -1], top) for f in test])


def pu_logistic(
    train: Sequence[np.ndarray],
    y_train: np.ndarray,
    test: Sequence[np.ndarray],
    tiles_train: Sequence[np.ndarray] | None = None,
    q: float = 0.05,
    iters: int = 3,
    c: float = 0.1,
    top: float = TOP,
    per_slide: int = 300,
    seed: int = 0,
) -> np.ndarray:
    """Positive-unlabelled logistic regression that re-picks each tumour slide's top tiles.

    Args:
        train: training slides' features, each ``(n_i, D)``.
        y_train: ``(S_train,)`` slide labels.
        test: test slides' features, each ``(m_j, D)``.
        tiles_train: unused (no tile labels).
        q: share of each tumour slide's tiles taken as positives after the first fit.
        iters: refits on re-picked positives after the first fit.
        c: inverse L2 strength (on features standardised by the negatives).
        top: share of a test slide's top tile scores averaged into its score.
        per_slide: random tiles per slide for the negatives and the first positives.
        seed: seed of those draws.

    Returns:
        ``(S_test,)`` slide scores.
    """
    from sklearn.linear_model import LogisticRegression

    _both(y_train, "pu_logistic")
    rng = np.random.default_rng(seed)

    def draw(f: np.ndarray) -> np.ndarray:
        return f[rng.choice(len(f), min(len(f), per_slide), replace=False)]

    neg = np.concatenate([draw(f) for f, y in zip(train, y_train, strict=True) if y == 0])
    tumour = [f for f, y in zip(train, y_train, strict=True) if y == 1]
    z = _standardiser(neg)

    def fit(pos: np.ndarray) -> Any:
        x = z(np.concatenate([neg, pos]))
        y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
        return LogisticRegression(C=c, max_iter=500, class_weight="balanced").fit(x, y)

    clf = fit(np.concatenate([draw(f) for f in tumour]))
    for _ in range(iters):
        picked = []
        for f in tumour:
            s = clf.decision_function(z(f))
            picked.append(f[np.argsort(s)[-max(1, round(len(f) * q)) :]])
        clf = fit(np.concatenate(picked))
    return np.array([top_share_mean(clf.decision_function(z(f)), top) for f in test])


def top_share(
    train: Sequence[np.ndarray],
    y_train: np.ndarray,
    test: Sequence[np.ndarray],
    tiles_train: Sequence[np.ndarray] | None = None,
    share: float = SHARE,
    lr: float = 1e-2,
    weight_decay: float = 1e-2,
    epochs: int = 100,
    batch: int = 4,
    val: float = 0.2,
    seed: int = 0,
    slide_weight: float = 1.0,
    fraction_weight: float = 0.0,
) -> np.ndarray:
    """A linear tile scorer trained on slide labels through the mean of its top tile logits.

    Slide logit = mean of the top ``share`` of the slide's tile logits; loss per batch = BCE
    of the slide logits on the slide labels + the mean over the batch's normal slides of the
    BCE of all their tile logits against 0. Features are standardised over the fitting
    slides' tiles. With ``val > 0`` that share of the training slides is held out and the
    epoch of lowest loss on them is kept; with ``val = 0`` all train for ``epochs``.

    With ``fraction_weight > 0`` each slide's mean tile probability is also fitted to its true
    tumour fraction (the share of its labelled tiles that are tumour in ``tiles_train``):
    learning from label proportions, squared error in units of :data:`FRACTION_UNIT`. Those
    fractions come from the truth masks, so the method is an oracle, as the tile probe is: it
    asks whether a per-slide *amount* of tumour, far more than a tumour/normal label, would
    teach a linear scorer where the tumour is.

    Args:
        train: training slides' features, each ``(n_i, D)``.
        y_train: ``(S_train,)`` slide labels.
        test: test slides' features, each ``(m_j, D)``.
        tiles_train: training slides' tile labels (``fraction_weight > 0`` only), each
            ``(n_i,)`` in {1 tumour, 0 normal, -1 left out}.
        share: top share of the tile logits pooled (training and scoring).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        epochs: passes over the fitting slides.
        batch: slides per step.
        val: share of the training slides held out to choose the epoch (0: none).
        seed: seed of the split, the shuffles and the initial weights.
        slide_weight: weight of the slide-label term (0: none).
        fraction_weight: weight of the tumour-fraction term (0: none).

    Returns:
        ``(S_test,)`` slide scores (mean of the top ``share`` tile logits).
    """
    import torch
    import torch.nn.functional as F

    _both(y_train, "top_share")
    if fraction_weight and tiles_train is None:
        raise ValueError("top_share with fraction_weight > 0 needs the training tile labels")
    fractions = torch.tensor(
        [float(np.mean(t[t >= 0] == 1)) if (t >= 0).any() else 0.0 for t in tiles_train]
        if fraction_weight
        else np.zeros(len(train)),
        dtype=torch.float32,
    )
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n = len(train)
    order = rng.permutation(n)
    n_val = round(val * n) if val else 0
    held, fitting = order[:n_val], order[n_val:]
    z = _standardiser(np.concatenate([train[i] for i in fitting]))
    bags = [torch.from_numpy(z(f)).float() for f in train]
    y = torch.tensor(np.asarray(y_train), dtype=torch.float32)
    linear = torch.nn.Linear(bags[0].shape[1], 1)
    opt = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)

    def loss_of(ids: np.ndarray) -> torch.Tensor:
        slides, amounts, normals = [], [], []
        for i in ids:
            t = linear(bags[i]).squeeze(-1)
            slides.append(t.topk(max(1, round(len(t) * share))).values.mean())
            amounts.append(torch.sigmoid(t).mean())
            if y[i] == 0:
                normals.append(F.binary_cross_entropy_with_logits(t, torch.zeros_like(t)))
        loss = slide_weight * F.binary_cross_entropy_with_logits(torch.stack(slides), y[ids])
        if fraction_weight:
            gap = (torch.stack(amounts) - fractions[ids]) / FRACTION_UNIT
            loss = loss + fraction_weight * gap.pow(2).mean()
        return loss + torch.stack(normals).mean() if normals else loss

    best, state = np.inf, None
    for _ in range(epochs):
        shuffled = rng.permutation(fitting)
        for s in range(0, len(shuffled), batch):
            opt.zero_grad()
            loss_of(shuffled[s : s + batch]).backward()
            opt.step()
        if n_val:
            with torch.no_grad():
                v = float(loss_of(held))
            if v < best:
                best, state = v, {k: x.clone() for k, x in linear.state_dict().items()}
    if state is not None:
        linear.load_state_dict(state)
    with torch.no_grad():
        return np.array(
            [
                top_share_mean(linear(torch.from_numpy(z(f)).float()).squeeze(-1).numpy(), share)
                for f in test
            ]
        )


def top_share_warm(
    train: Sequence[np.ndarray],
    y_train: np.ndarray,
    test: Sequence[np.ndarray],
    tiles_train: Sequence[np.ndarray] | None = None,
    starts: int = 10,
    share: float = SHARE,
    epochs: int = 100,
    seed: int = 0,
) -> np.ndarray:
    """The top-share scorer as the pipeline warm-starts it (``--model.tumour_warm_start``):
    the best of ``starts`` exemplar starts, each fitted alone for 100 epochs
    (:func:`histcode.finetune.warmstart.warm_start`, lr and weight decay 1e-2).

    Args:
        train: training slides' features, each ``(n_i, D)``.
        y_train: ``(S_train,)`` slide labels.
        test: test slides' features, each ``(m_j, D)``.
        tiles_train: unused (no tile labels).
        starts: exemplar starts fitted.
        share: top share of the tile logits pooled (training and scoring).
        epochs: passes over the training slides per start.
        seed: seed of the draws and the fits.

    Returns:
        ``(S_test,)`` slide scores (mean of the top ``share`` tile logits).
    """
    import torch

    from histcode.finetune.heads import TopShareTumourPath
    from histcode.finetune.warmstart import warm_start

    _both(y_train, "top_share_warm")
    torch.manual_seed(seed)
    path = TopShareTumourPath(train[0].shape[1], share)
    warm_start(path, train, np.asarray(y_train), starts=starts, epochs=epochs, seed=seed)
    path.eval()
    with torch.no_grad():
        return np.array(
            [
                top_share_mean(
                    path.tiles(torch.from_numpy(f)[None], torch.ones(1, len(f), dtype=torch.bool))
                    .squeeze(0)
                    .numpy(),
                    share,
                )
                for f in test
            ]
        )


#: A method: (train bags, train slide labels, test bags, train tile labels, seed=) → scores.
Method = Callable[..., np.ndarray]


@dataclass(frozen=True)
class MethodSpec:
    """One aggregation method of the benchmark.

    Attributes:
        fn: the scoring function (:data:`Method`).
        kwargs: its fixed arguments.
        what: one line for the report.
    """

    fn: Method
    kwargs: dict[str, Any]
    what: str


METHODS: dict[str, MethodSpec] = {
    "truth": MethodSpec(
        truth_probe,
        {},
        "tile probe on truth-mask labels, top 2 % (the ceiling; labels MIL never gets)",
    ),
    "knn_normal": MethodSpec(
        knn_normal, {}, "distance to the 10th nearest training-normal tile, top 2 %"
    ),
    "pu_logistic": MethodSpec(
        pu_logistic, {}, "PU logistic, tumour slides' top 5 % re-picked 3×, top 2 %"
    ),
    "top_share_val": MethodSpec(
        top_share, {"val": 0.2}, "top-5 % linear scorer, epoch chosen on 20 % held-out slides"
    ),
    "top_share_all": MethodSpec(
        top_share, {"val": 0.0}, "top-5 % linear scorer, all training slides, 100 epochs"
    ),
    "top_share_warm": MethodSpec(
        top_share_warm,
        {},
        "top-5 % linear scorer, best of 10 exemplar starts (the pipeline's warm start)",
    ),
    "fraction_truth": MethodSpec(
        top_share,
        {"val": 0.0, "slide_weight": 0.0, "fraction_weight": 1.0},
        "linear scorer whose mean tile probability is fitted to each slide's true tumour "
        "fraction (label proportions from the truth masks: an oracle), top 5 %",
    ),
}


# -- evaluation -----------------------------------------------------------------------------


def training_subset(
    train: np.ndarray,
    patients: np.ndarray,
    slide_labels: np.ndarray,
    share: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A random ``share`` of the training patients' slides, with both classes among them.

    Args:
        train: indices of the training slides.
        patients: ``(S,)`` patient of every slide.
        slide_labels: ``(S,)`` 1 tumour, 0 normal.
        share: share of the training patients kept (at least two).
        rng: the draw.

    Returns:
        The kept indices, in ``train``'s order.

    Raises:
        ValueError: no draw of 100 had both classes.
    """
    owners = np.unique(patients[train])
    n = min(len(owners), max(2, round(share * len(owners))))
    for _ in range(100):
        keep = np.isin(patients[train], rng.choice(owners, n, replace=False))
        if len(set(slide_labels[train[keep]].tolist())) == 2:
            return train[keep]
    raise ValueError(f"no {n} of the {len(owners)} training patients hold both classes")


def out_of_fold(
    method: Method,
    bags: Sequence[np.ndarray],
    tile_labels: Sequence[np.ndarray],
    slide_labels: np.ndarray,
    folds: np.ndarray,
    seed: int = 0,
    train_share: float = 1.0,
    patients: np.ndarray | None = None,
    draw: int = 0,
    **kwargs: Any,
) -> np.ndarray:
    """Each slide's score by the method fitted on the other folds.

    Only the training folds' bags, slide labels and tile labels reach ``method``; the test
    fold gives its bags alone. With ``train_share < 1`` each fold's method sees only that
    share of its training patients (:func:`training_subset`), so the same test folds measure
    how the figure grows with the number of training patients.

    Args:
        method: a scoring function (:data:`Method`).
        bags: per-slide features, each ``(n_i, D)``.
        tile_labels: per-slide tile labels, each ``(n_i,)`` in {1, 0, -1}.
        slide_labels: ``(S,)`` 1 tumour, 0 normal.
        folds: ``(S,)`` test fold of each slide.
        seed: passed to ``method`` for every fold.
        train_share: share of each fold's training patients the method is fitted on.
        patients: ``(S,)`` patient of each slide (needed with ``train_share < 1``; each
            slide its own patient when None).
        draw: which random subset (with ``train_share < 1``).
        **kwargs: more arguments of ``method``.

    Returns:
        ``(S,)`` out-of-fold slide scores.
    """
    slide_labels = np.asarray(slide_labels).astype(int)
    folds = np.asarray(folds)
    if not len(bags) == len(tile_labels) == len(slide_labels) == len(folds):
        raise ValueError("bags, tile_labels, slide_labels and folds must have one entry a slide")
    owners = np.arange(len(bags)) if patients is None else np.asarray(patients)
    scores = np.full(len(bags), np.nan)
    for fold in np.unique(folds):
        test = np.flatnonzero(folds == fold)
        train = np.flatnonzero(folds != fold)
        if train_share < 1:
            rng = np.random.default_rng([seed, draw, int(fold)])
            train = training_subset(train, owners, slide_labels, train_share, rng)
        scores[test] = method(
            [bags[i] for i in train],
            slide_labels[train],
            [bags[i] for i in test],
            [tile_labels[i] for i in train],
            seed=seed,
            **kwargs,
        )
    return scores


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if len(set(np.asarray(y).tolist())) == 2 else None


def score_slides(
    scores: np.ndarray, slide_labels: np.ndarray, sites: np.ndarray, folds: np.ndarray
) -> dict[str, Any]:
    """Slide AUCs of scores: pooled, within site and per fold.

    Args:
        scores: ``(S,)`` slide scores.
        slide_labels: ``(S,)`` 1 tumour, 0 normal.
        sites: ``(S,)`` tissue source site of each slide.
        folds: ``(S,)`` test fold of each slide.

    Returns:
        ``auc`` (pooled), ``within_site_auc`` (mean of the per-site AUCs over sites with both
        classes; None when there is none), ``sites`` (how many), ``fold_aucs`` (per fold,
        None for a one-class fold) and ``fold_auc`` (their mean).
    """
    y = np.asarray(slide_labels).astype(int)
    s, sites, folds = np.asarray(scores), np.asarray(sites), np.asarray(folds)
    within = [_auc(y[sites == st], s[sites == st]) for st in np.unique(sites)]
    within = [a for a in within if a is not None]
    per_fold = [_auc(y[folds == f], s[folds == f]) for f in np.unique(folds)]
    used = [a for a in per_fold if a is not None]
    return {
        "auc": _auc(y, s),
        "within_site_auc": float(np.mean(within)) if within else None,
        "sites": len(within),
        "fold_aucs": per_fold,
        "fold_auc": float(np.mean(used)) if used else None,
    }


# -- demos ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoData:
    """What the benchmark reads from a finished demo folder, in ``predictions.csv`` order.

    Attributes:
        slide_ids: ``S`` slide ids.
        bags: per-slide tile features, each ``(n_i, D)`` float32.
        tile_labels: per-slide truth-mask tumour labels, each ``(n_i,)`` in {1, 0, -1}.
        slide_labels: ``(S,)`` 1 tumour, 0 normal (``tumour_true``).
        folds: ``(S,)`` the pipeline's patient-grouped test fold of each slide.
        sites: ``(S,)`` tissue source site.
        patients: ``(S,)`` patient id.
        pipeline: ``(S,)`` the pipeline's own out-of-fold ``tumour_prob``.
        features: the feature store read.
        coords: per-slide level-0 tile corners, each ``(n_i, 2)``.
    """

    slide_ids: list[str]
    bags: list[np.ndarray]
    tile_labels: list[np.ndarray]
    slide_labels: np.ndarray
    folds: np.ndarray
    sites: np.ndarray
    patients: np.ndarray
    pipeline: np.ndarray
    features: Path
    coords: list[np.ndarray] = field(default_factory=list)


def features_of(demo: Path, arm: str) -> Path:
    """The feature store the arm's finetune read (its ``config.yaml``), in ``demo/features``."""
    config = demo / "finetune" / arm / "config.yaml"
    if config.is_file():
        import yaml

        named = (yaml.safe_load(config.read_text()) or {}).get("features")
        if named and (demo / "features" / Path(named).name).exists():
            return demo / "features" / Path(named).name
    return demo / "features" / f"{ARM_FEATURES[arm]}.zarr"


def cohort_of(demo: Path) -> Path:
    """The cohort folder a demo ran on: ``--cohort`` as its ``demo.json`` records it, else the
    ``cohort/`` it synthesised inside ``demo``."""
    record = demo / "demo.json"
    if record.is_file():
        named = (json.loads(record.read_text()).get("options") or {}).get("cohort")
        if named:
            return Path(named)
    return demo / "cohort"


def load_demo(demo: Path, arm: str = "simclr") -> DemoData:
    """Read a finished demo's tile features, truth-mask tile labels and the arm's folds.

    Args:
        demo: a ``histcode demo`` output folder (``tiles.zarr``, ``features/*.zarr``,
            ``finetune/<arm>/predictions.csv``) on a synthetic cohort with ``truth`` masks:
            its own ``cohort/`` or the ``--cohort`` it was given.
        arm: ``simclr`` or ``naive``.

    Raises:
        FileNotFoundError: the folder lacks a part (not a finished demo).
        ValueError: a slide's features do not match its tiles.
    """
    from benchmarks.ceiling import label_tiles
    from histcode.featurestore import FeatureStore

    predictions = demo / "finetune" / arm / "predictions.csv"
    features = features_of(demo, arm)
    cohort = cohort_of(demo)
    for need in (predictions, features, demo / "tiles.zarr", cohort / "truth"):
        if not need.exists():
            raise FileNotFoundError(f"{need}: missing; {demo} is not a finished histcode demo")
    with predictions.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = label_tiles(cohort, demo / "tiles.zarr")
    where = {sid: s for s, sid in enumerate(labels.slide_ids)}
    store = FeatureStore(features)
    rows = [r for r in rows if r["slide_id"] in where]
    bags, tiles, corners = [], [], []
    for r in rows:
        s = where[r["slide_id"]]
        span = labels.index.slide_range(s)
        got = store.read(r["slide_id"])
        coords = labels.index.coords[span.start : span.stop]
        if got.features.shape[0] != len(coords) or not np.array_equal(got.coords, coords):
            raise ValueError(f"{features}: slide {r['slide_id']}'s features do not match its tiles")
        bags.append(np.asarray(got.features, dtype=np.float32))
        tiles.append(labels.tumour[span.start : span.stop])
        corners.append(np.asarray(coords))
    return DemoData(
        slide_ids=[r["slide_id"] for r in rows],
        bags=bags,
        tile_labels=tiles,
        slide_labels=np.array([round(float(r["tumour_true"])) for r in rows]),
        folds=np.array([int(r["fold"]) for r in rows]),
        sites=np.array([r["site"] for r in rows]),
        patients=np.array([r["patient_id"] for r in rows]),
        pipeline=np.array([float(r["tumour_prob"]) for r in rows]),
        features=features,
        coords=corners,
    )


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def run_demo(
    data: DemoData,
    methods: Sequence[str],
    seed: int = 0,
    log: Callable[[str], None] = print,
    train_shares: Sequence[float] = (),
    draws: int = 3,
) -> dict[str, Any]:
    """Every method's figures on one demo, and the pipeline's own for reference.

    Args:
        data: the demo's features, labels and folds.
        methods: names in :data:`METHODS`.
        seed: draws, splits and initial weights.
        log: where progress lines go.
        train_shares: shares (< 1) of each fold's training patients to refit every method
            on, on the same test folds: the learning curve (``methods.<name>.curve``, the
            pooled AUC at each share, mean over ``draws`` random subsets; share 1 is the
            method's own figure).
        draws: random subsets per share.
    """
    y = data.slide_labels
    pipe = score_slides(data.pipeline, y, data.sites, data.folds)
    tiles = np.concatenate(data.tile_labels)
    out: dict[str, Any] = {
        "slides": len(y),
        "patients": len(set(data.patients.tolist())),
        "tumour_slides": int(y.sum()),
        "normal_slides": int((y == 0).sum()),
        "folds": len(set(data.folds.tolist())),
        "tiles": len(tiles),
        "dim": int(data.bags[0].shape[1]),
        "tumour_tile_share": _r(float((tiles == 1).mean())),
        "features": str(data.features),
        "pipeline": {
            "fold_auc": _r(pipe["fold_auc"]),
            "fold_aucs": [_r(a) for a in pipe["fold_aucs"]],
            "auc": _r(pipe["auc"]),
            "within_site_auc": _r(pipe["within_site_auc"]),
        },
        "methods": {},
    }
    for name in methods:
        spec = METHODS[name]
        start = time.perf_counter()
        scores = out_of_fold(
            spec.fn, data.bags, data.tile_labels, y, data.folds, seed=seed, **spec.kwargs
        )
        fig = score_slides(scores, y, data.sites, data.folds)
        out["methods"][name] = {
            "auc": _r(fig["auc"]),
            "within_site_auc": _r(fig["within_site_auc"]),
            "fold_aucs": [_r(a) for a in fig["fold_aucs"]],
            "seconds": round(time.perf_counter() - start, 1),
        }
        log(f"aggregation: {name}: AUC {fig['auc']:.3f}, within site {fig['within_site_auc']}")
        if train_shares:
            curve = {}
            for share in sorted(train_shares):
                aucs = [
                    score_slides(
                        out_of_fold(
                            spec.fn, data.bags, data.tile_labels, y, data.folds, seed=seed,
                            train_share=share, patients=data.patients, draw=draw,
                            **spec.kwargs,
                        ),
                        y, data.sites, data.folds,
                    )["auc"]
                    for draw in range(draws)
                ]  # fmt: skip
                key = f"{share:g}"
                curve[key] = _r(float(np.mean(aucs)))
                log(f"aggregation: {name} on {key} of the training patients: {curve[key]}")
            curve["1"] = _r(fig["auc"])
            out["methods"][name]["curve"] = curve
    return out


def stat(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "sd", "n", "values"}`` of the figures that exist (sd with ddof 1)."""
    got = [v for v in values if v is not None]
    return {
        "mean": _r(float(np.mean(got))) if got else None,
        "sd": _r(float(np.std(got, ddof=1))) if len(got) > 1 else None,
        "n": len(got),
        "values": list(values),
    }


def summarise(demos: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Mean ± sd over demos of each method's figures and of the pipeline's."""
    out = {
        name: {k: stat([d["methods"][name][k] for d in demos]) for k in ("auc", "within_site_auc")}
        for name in methods
    }
    for name in methods:
        shares = demos[0]["methods"][name].get("curve", {}) if demos else {}
        if shares:
            out[name]["curve"] = {
                share: stat([d["methods"][name].get("curve", {}).get(share) for d in demos])
                for share in shares
            }
    out["pipeline"] = {
        k: stat([d["pipeline"][k] for d in demos]) for k in ("fold_auc", "auc", "within_site_auc")
    }
    return out


def make_demos(work: Path, seeds: Sequence[int], patients: int, difficulty: str) -> list[Path]:
    """Run ``histcode demo`` for each seed under ``work`` (a finished one is reused)."""
    from benchmarks.ceiling import histcode

    out = []
    for seed in seeds:
        folder = work / f"demo-{difficulty}-{patients}p-s{seed}"
        summary = folder / "summary.json"
        done = summary.is_file() and json.loads(summary.read_text()).get("exit_code") == 0
        if not done:
            histcode(
                "demo", "--out", str(folder), "--difficulty", difficulty,
                "--patients", str(patients), "--seed", str(seed),
            )  # fmt: skip
        out.append(folder)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "demos", type=Path, nargs="*", metavar="DEMO",
        help="finished histcode demo folders (none: make --demo-seeds under --work)",
    )  # fmt: skip
    parser.add_argument("--arm", default="simclr", choices=sorted(ARM_FEATURES))
    parser.add_argument(
        "--features", default="raw", choices=list(FEATURE_VIEWS),
        help="view of the tile features every method runs on: " + "; ".join(
            f"{k}: {v}" for k, v in FEATURE_VIEWS.items()),
    )  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seed", type=int, default=0, help="draws, splits and initial weights")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the lab's 1)")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/aggregation"))
    parser.add_argument("--demo-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--train-shares", type=float, nargs="*", default=[], metavar="SHARE",
        help="also refit every method on these shares (< 1) of each fold's training patients, "
        "on the same test folds: the learning curve, does the figure still grow with patients",
    )  # fmt: skip
    parser.add_argument("--draws", type=int, default=3, help="random subsets per share")
    args = parser.parse_args(argv)
    if any(not 0 < share < 1 for share in args.train_shares):
        parser.error(f"--train-shares must lie strictly between 0 and 1: {args.train_shares}")
    for demo in args.demos:
        if not (demo / "finetune" / args.arm / "predictions.csv").is_file():
            parser.error(f"{demo}: no finetune/{args.arm}/predictions.csv; not a finished demo")
    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    demos = args.demos or make_demos(args.work, args.demo_seeds, DEMO_PATIENTS, DEMO_DIFFICULTY)
    results = []
    for demo in demos:
        print(f"aggregation: {demo} ({args.arm})", file=sys.stderr, flush=True)
        data = feature_view(load_demo(demo, args.arm), args.features)
        entry = run_demo(
            data, args.methods, args.seed, lambda m: print(m, file=sys.stderr),
            train_shares=args.train_shares, draws=args.draws,
        )  # fmt: skip
        results.append({"demo": str(demo), **entry})
    result = {
        "benchmark": "aggregation",
        "arm": args.arm,
        "features": args.features,
        "features_what": FEATURE_VIEWS[args.features],
        "methods": list(args.methods),
        "what": {name: METHODS[name].what for name in args.methods},
        "seed": args.seed,
        "train_shares": args.train_shares,
        "draws": args.draws,
        "demos": results,
        "summary": summarise(results, args.methods),
        "command": " ".join(["python -m benchmarks.aggregation", *(argv or sys.argv[1:])]),
        "torch_threads": args.threads,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result), flush=True)
    return result


# -- report ---------------------------------------------------------------------------------


def _pm(stat: dict[str, Any] | None) -> str:
    """``mean ± sd`` with two digits ("–" when missing)."""
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.2f}" + ("" if stat.get("sd") is None else f" ± {stat['sd']:.2f}")


def _values(stat: dict[str, Any]) -> str:
    return " / ".join("–" if v is None else f"{v:.2f}" for v in stat.get("values", []))


def table(r: dict[str, Any]) -> list[str]:
    """The markdown table of a result: one row a method, then the pipeline's own figures."""
    lines = [
        "| method | slide AUC (pooled out of fold) | per demo | within-site AUC | what |",
        "|---|---|---|---|---|",
    ]
    summary = r.get("summary", {})
    for name in r.get("methods", []):
        s = summary.get(name, {})
        lines.append(
            f"| {name} | {_pm(s.get('auc'))} | {_values(s.get('auc', {}))} "
            f"| {_pm(s.get('within_site_auc'))} | {r.get('what', {}).get(name, '')} |"
        )
    p = summary.get("pipeline")
    if p:
        lines.append(
            f"| pipeline (its predictions.csv) | {_pm(p.get('auc'))} | {_values(p.get('auc', {}))} "
            f"| {_pm(p.get('within_site_auc'))} | per-fold AUC as metrics.json reports it: "
            f"{_pm(p.get('fold_auc'))} ({_values(p.get('fold_auc', {}))}) |"
        )
    return lines


def curve_table(r: dict[str, Any]) -> list[str]:
    """The learning curve's markdown table (empty without ``--train-shares``)."""
    summary = r.get("summary", {})
    named = [n for n in r.get("methods", []) if summary.get(n, {}).get("curve")]
    if not named:
        return []
    shares = list(summary[named[0]]["curve"])
    lines = [
        "",
        f"Pooled slide AUC when each fold's method is fitted on a share of its training "
        f"patients (same test folds; mean over {r.get('draws')} random subsets, then mean ± sd "
        "over the demos):",
        "",
        "| method | " + " | ".join(f"{float(s):.0%} of patients" for s in shares) + " |",
        "|---|" + "---|" * len(shares),
    ]
    for name in named:
        curve = summary[name]["curve"]
        lines.append(f"| {name} | " + " | ".join(_pm(curve.get(s)) for s in shares) + " |")
    return lines


def section(entry: dict[str, Any]) -> list[str]:
    """Setup and table of the aggregation benchmark for ``RESULTS.md``."""
    r = entry["result"]
    demos = r.get("demos", [])
    if not demos:
        return [f"No demo was scored: {tail(str(r), 200)}"]
    d0 = demos[0]
    return [
        f"The same {r.get('arm')} tile features ({d0.get('dim')}-d; view "
        f"`{r.get('features', 'raw')}`: {r.get('features_what', FEATURE_VIEWS['raw'])}) of "
        f"{len(demos)} finished "
        f"`histcode demo` folder(s) ({d0.get('slides')} slides, {d0.get('patients')} patients, "
        f"tumour {100 * (d0.get('tumour_tile_share') or 0):.1f} % of the tiles in the first), "
        "aggregated each way on the pipeline's own patient-grouped folds; every method is fitted "
        "on the training folds only. Figures are mean ± sd over the demos (per demo in order: "
        f"{', '.join(Path(d['demo']).name for d in demos)}); seed {r.get('seed')}, "
        f"{r.get('seconds')} s.",
        "",
        *table(r),
        *curve_table(r),
    ]


SPEC = Benchmark(
    name="aggregation",
    what="slide tumour AUC of each way of aggregating the same tile features, vs the truth ceiling",
    quick=None,
    timeout=4 * 3600,
    order=98,
    goals=(
        "none: a diagnosis. The gap between the truth-mask ceiling and the slide-label methods "
        "is what the aggregation loses; the ceiling itself is what the features allow",
    ),
    section=Section("Aggregation: the same tile features pooled each way", section, order=22),
)


if __name__ == "__main__":
    main()
