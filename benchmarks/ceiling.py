"""Ceiling check: can the tile features separate tumour and lymphocyte tiles at all?

Attention MIL only ever sees slide labels. This benchmark gives a linear probe the labels MIL
never gets — each tile labelled from the synthetic cohort's truth masks — and asks how far the
*features* can go, so that a weak slide-level result can be blamed on the features or on the
aggregation:

1. ``histcode synth`` a cohort (``--difficulty hard``, plus ``--reference easy`` as the cohort
   the defaults were tuned on) and ``histcode tile`` it at each ``--mpp``. Tiles keep a fixed
   **64 µm** field of view (32 px at 2 µm/px, 64 px at 1, 128 px at 0.5): the demo's tile is
   64 px at 1 µm/px, and holding the context fixed makes the resolution the only thing that
   changes — the same tissue grid, the same labelled tiles, so the probes compare like with
   like (fixed 64 px tiles would also change the context 4× and the tile count 16×).
2. Three encoders per resolution and seed, embedded in eval mode with their input
   normalisation, as ``histcode embed`` runs them: the demo's ``tiny`` CNN (64-d) with random
   weights, a random-weight ResNet-18 (the naive baseline's encoder) and the tiny CNN after
   ``histcode pretrain`` with the demo's SimCLR recipe (``histcode.demo._pretrain_config``:
   AdamW 2e-3, batch 32, temperature 0.1, the default augmentations; 1,000 steps).
3. Tile labels from the truth masks (:func:`label_tiles`): tumour = the tile's centre on the
   tumour mask, normal = no tumour under the tile (border tiles left out); the same for
   lymphocyte-rich tissue.
4. Per task, a linear probe (standardised features, L2 logistic regression) with
   patient-grouped folds (:func:`tile_probe`): **tile AUC** on held-out patients' tiles; the
   **slide ceiling** — every sampled tile of a held-out slide scored by the fold's probe,
   tumour vs normal slides ranked by the mean of their top 2 % tiles (slide AUC), and each
   slide's mean lymphocyte probability against its true lymphocyte fraction (Pearson r).
5. Collapse diagnostics: SimCLR's final loss against ln(2B − 1), the NT-Xent loss of a
   constant embedding (or of any embedding whose similarities are all equal), its loss curve,
   and for every encoder the effective rank (Roy & Vetterli 2007) and per-dimension sd of
   the features on the tiles (:func:`feature_stats`).

``--variants`` adds SimCLR runs with one change to the recipe (:data:`VARIANTS`, e.g.
``nocolour``: no colour jitter and no grayscale) on the first seed at ``--variant-mpp``, as
an A/B of the probe. Seeds change the encoders' initialisation and SimCLR's augmentations and
batches; the cohort (synth seed 0) and the probe's folds stay fixed. Finished SimCLR runs and
cells are cached in ``--work`` and reused by a rerun with the same settings.

Prints one JSON line; its ``SPEC`` renders it for ``benchmarks.run`` (:func:`ceiling_section`).
``--merge`` adds earlier runs' cells (other encoders, seeds or step counts) to the table;
``--seeds`` with no value runs nothing and only merges.

    python -m benchmarks.ceiling [--quick] [--difficulty hard] [--reference easy|none] \\
        [--patients 20] [--mpp 2 1 0.5] [--seeds 0 1 2] [--steps 1000] [--variants nocolour] \\
        [--encoders tiny_random resnet18_random simclr] [--merge OUT.json …]

Measured on 2 shared CPU cores (hard cohort, 20 patients; see RESULTS.md): tumour tile AUC of
the random tiny CNN 0.64 / 0.78 / 0.81 at 2 / 1 / 0.5 µm/px, but the slide ceiling stays at
0.46–0.64 for every encoder (tumour is ~4 % of the tissue); lymphocyte tiles ≥ 0.998
everywhere; SimCLR (demo recipe) ends near ln(2B − 1) with effective rank ~8 of 64 against 18
for random weights and no more tumour signal. Cost: ~1 min a cell and encoder for the probes
(tiles read once a store), plus SimCLR (~0.1 s a step on an idle machine, 1–2.7 s loaded).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.spec import Benchmark, Section, fmt, last_json, tail

#: Field of view of a tile in µm at every resolution (the demo's 64 px at 1 µm/px).
CONTEXT_UM = 64.0
#: Encoders of a cell: zoo name and builder arguments of the random-weight ones.
RANDOM_ENCODERS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny_random": ("tiny", {"embed_dim": 64, "width": 16}),
    "resnet18_random": ("resnet18", {}),
}
ENCODERS = (*RANDOM_ENCODERS, "simclr")
#: One-change SimCLR recipes for an A/B of the probe (``histcode pretrain`` overrides).
VARIANTS: dict[str, list[str]] = {
    "nocolour": ["--model.augmentation.jitter_prob", "0", "--model.augmentation.gray_prob", "0"],
    "weakcrop": ["--model.augmentation.crop_scale", "[0.6, 1.0]"],
    "temp05": ["--model.temperature", "0.5"],
    "lr2e-4": ["--model.lr", "0.0002"],
}
TASKS = ("tumour", "lymphocyte")


# -- labels -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileLabels:
    """Truth-mask labels of every tile of a tile store, in ``TileIndex`` order.

    Attributes:
        index: the store's :class:`histcode.tilereader.TileIndex`.
        tumour: ``(N,)`` int8: 1 = the tile's centre is on tumour, 0 = no tumour under the
            tile, -1 = a border tile (some tumour, centre outside): left out of the probe.
        lymphocyte: ``(N,)`` int8, the same for lymphocyte-rich tissue.
        patient: ``(N,)`` patient id of each tile (the first 12 characters of the slide id).
        slide_ids: slide ids in index order.
        slide_tumour: ``(S,)`` 1 for tumour slides (TCGA sample type 01–09), 0 for normal.
        slide_tumour_fraction: ``(S,)`` tumour share of the tissue, from the truth mask.
        slide_lymphocyte_fraction: ``(S,)`` lymphocyte-rich share of the tissue.
    """

    index: Any
    tumour: np.ndarray
    lymphocyte: np.ndarray
    patient: np.ndarray
    slide_ids: list[str]
    slide_tumour: np.ndarray
    slide_tumour_fraction: np.ndarray
    slide_lymphocyte_fraction: np.ndarray


def _mask_labels(mask: np.ndarray, coords: np.ndarray, side: float, scale: float) -> np.ndarray:
    """1 where a tile's centre is on ``mask``, 0 where no mask pixel is under it, else -1."""
    from histcode.synth.scoring import tile_labels_from_mask

    h, w = mask.shape
    on = tile_labels_from_mask(coords, side, scale, mask, 1.0)  # the centre, as heatmaps score
    x0 = np.clip(np.floor(coords[:, 0] * scale).astype(int), 0, w - 1)
    y0 = np.clip(np.floor(coords[:, 1] * scale).astype(int), 0, h - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + side) * scale).astype(int), 1, w)
    y1 = np.clip(np.ceil((coords[:, 1] + side) * scale).astype(int), 1, h)
    # any mask pixel under the tile, by a summed-area table (one lookup a tile)
    sat = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    under = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return np.where(on, 1, np.where(under == 0, 0, -1)).astype(np.int8)


def label_tiles(cohort: Path, tiles: Path) -> TileLabels:
    """Label every tile of ``tiles`` from the truth masks of the synthetic ``cohort``.

    Args:
        cohort: the folder ``histcode synth`` wrote (``truth/<slide>.npz``).
        tiles: a tile store of that cohort's slides.

    Raises:
        FileNotFoundError: a slide has no truth mask (not a synthetic cohort, or another one).
    """
    from histcode.synth import SlideTruth
    from histcode.tilereader import TileIndex

    index = TileIndex(tiles)
    tumour, lymph, patient = [], [], []
    slide_y, t_frac, l_frac = [], [], []
    for s, geometry in enumerate(index.slides):
        path = cohort / "truth" / f"{geometry.slide_id}.npz"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no truth mask for slide {geometry.slide_id}; the ceiling check needs "
                f"the cohort that {tiles} was tiled from (histcode synth writes truth/)"
            )
        truth = SlideTruth.load(path)
        rows = index.slide_range(s)
        coords = index.coords[rows.start : rows.stop]
        attrs = index.store.read(geometry.slide_id).attrs
        side, scale = attrs["tile_size_level0"], attrs["mpp_level0"] / truth.mask_mpp
        tumour.append(_mask_labels(truth.tumour, coords, side, scale))
        lymph.append(_mask_labels(truth.lymphocyte, coords, side, scale))
        patient += [geometry.slide_id[:12]] * len(coords)
        slide_y.append(int(int(geometry.slide_id[13:15]) < 10))  # TCGA sample type 01–09
        t_frac.append(truth.tumour_fraction)
        l_frac.append(truth.lymphocyte_fraction)
    return TileLabels(
        index=index,
        tumour=np.concatenate(tumour),
        lymphocyte=np.concatenate(lymph),
        patient=np.array(patient),
        slide_ids=[g.slide_id for g in index.slides],
        slide_tumour=np.array(slide_y),
        slide_tumour_fraction=np.array(t_frac),
        slide_lymphocyte_fraction=np.array(l_frac),
    )


def tile_labels(
    cohort: Path, tiles: Path, max_neg_per_slide: int, seed: int
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Tumour-labelled tiles: every tumour tile and up to ``max_neg_per_slide`` normal ones.

    Returns:
        The ``TileIndex``, the chosen tiles' flat indices, their labels (1 tumour, 0 normal)
        and each one's patient.
    """
    labels = label_tiles(cohort, tiles)
    rng = np.random.default_rng(seed)
    chosen = []
    for s in range(len(labels.slide_ids)):
        rows = labels.index.slide_range(s)
        local = labels.tumour[rows.start : rows.stop]
        neg = np.flatnonzero(local == 0)
        neg = rng.choice(neg, min(len(neg), max_neg_per_slide), replace=False)
        chosen += [rows.start + int(i) for i in (*np.flatnonzero(local == 1), *neg)]
    chosen_arr = np.array(chosen, dtype=np.int64)
    return (
        labels.index,
        chosen_arr,
        labels.tumour[chosen_arr].astype(int),
        labels.patient[chosen_arr],
    )


def sample_tiles(index: Any, per_slide: int, seed: int) -> np.ndarray:
    """Up to ``per_slide`` tiles of each slide, drawn at random: ``(M,)`` flat indices, sorted."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(len(index.slides)):
        rows = index.slide_range(s)
        n = rows.stop - rows.start
        pick = np.arange(n) if n <= per_slide else rng.choice(n, per_slide, replace=False)
        out.append(rows.start + np.sort(pick))
    return np.concatenate(out).astype(np.int64)


# -- probe --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """A patient-grouped probe's out-of-fold predictions.

    Attributes:
        auc: ROC AUC of the pooled out-of-fold probabilities of the labelled tiles.
        auc_per_fold: ROC AUC within each test fold (folds with one class left out).
        oof: ``(N,)`` out-of-fold probability of each labelled tile.
        scores: ``(M,)`` probability of each scored tile by the probe of the fold that held
            its patient out (None when no tiles were given to score).
    """

    auc: float
    auc_per_fold: list[float]
    oof: np.ndarray
    scores: np.ndarray | None


def tile_probe(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    folds: int = 3,
    c: float = 0.1,
    x_score: np.ndarray | None = None,
    groups_score: np.ndarray | None = None,
) -> ProbeResult:
    """A linear probe with patient-grouped folds: no test patient's tile is ever trained on.

    Args:
        x: ``(N, D)`` features of the labelled tiles.
        y: ``(N,)`` labels in {0, 1}.
        groups: ``(N,)`` patient of each tile; folds split patients (``GroupKFold``).
        folds: number of folds.
        c: inverse L2 strength of the logistic regression (on standardised features).
        x_score: ``(M, D)`` more tiles to score (e.g. every tile of the slides), each by the
            probe whose test fold holds its patient.
        groups_score: ``(M,)`` patient of each tile of ``x_score``.

    Returns:
        The :class:`ProbeResult`.

    Raises:
        ValueError: fewer patients than folds, one class only, or a tile to score whose
            patient has no labelled tile (it would be in no test fold).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y).astype(int)
    if len(set(y.tolist())) != 2:
        raise ValueError(f"the probe needs tiles of both classes, got labels {sorted(set(y))}")
    if len(set(groups.tolist())) < folds:
        raise ValueError(
            f"{len(set(groups.tolist()))} patients for {folds} folds: use fewer --folds or "
            "more --patients"
        )
    if groups_score is not None and (missing := set(groups_score.tolist()) - set(groups.tolist())):
        raise ValueError(
            f"patients {sorted(missing)[:5]} have tiles to score but no labelled tile, so no "
            "fold holds them out; label at least one tile of every patient"
        )
    oof = np.full(len(y), np.nan)
    scores = None if x_score is None else np.full(len(x_score), np.nan)
    per_fold = []
    for train, test in GroupKFold(n_splits=folds).split(x, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
        model.fit(x[train], y[train])
        oof[test] = model.predict_proba(x[test])[:, 1]
        if len(set(y[test].tolist())) == 2:
            per_fold.append(round(float(roc_auc_score(y[test], oof[test])), 4))
        if x_score is not None and groups_score is not None and scores is not None:
            held = np.isin(groups_score, np.unique(groups[test]))
            if held.any():
                scores[held] = model.predict_proba(x_score[held])[:, 1]
    return ProbeResult(round(float(roc_auc_score(y, oof)), 4), per_fold, oof, scores)


def top_mean(scores: np.ndarray, slide_of: np.ndarray, slides: int, top: float) -> np.ndarray:
    """Each slide's mean of its top ``top`` share of tile scores (at least one tile).

    Args:
        scores: ``(M,)`` tile scores.
        slide_of: ``(M,)`` slide of each tile, in ``range(slides)``.
        slides: number of slides.
        top: share of a slide's tiles averaged, e.g. 0.02.
    """
    out = np.full(slides, np.nan)
    for s in range(slides):
        own = np.sort(scores[slide_of == s])
        if len(own):
            out[s] = own[-max(1, round(len(own) * top)) :].mean()
    return out


def feature_stats(x: np.ndarray, max_tiles: int = 4000, seed: int = 0) -> dict[str, Any]:
    """How much of the feature space the tiles use: effective rank, per-dimension sd.

    Effective rank (Roy & Vetterli 2007): exp of the entropy of the normalised singular values
    of the centred features — D for isotropic features, 1 for features on a line, ~0 spread
    for a collapsed (constant) embedding. ``dead_dims``: dimensions whose sd is below 1e-3 of
    the largest. ``mean_cosine``: mean cosine similarity between different tiles' raw
    features (→ 1 when every tile maps to the same direction).

    Args:
        x: ``(N, D)`` features.
        max_tiles: at most this many tiles (drawn at random) are used.
        seed: seed of that draw.
    """
    import torch

    from histcode.pretrain.collapse import effective_rank

    rng = np.random.default_rng(seed)
    if len(x) > max_tiles:
        x = x[rng.choice(len(x), max_tiles, replace=False)]
    x = x.astype(np.float64)
    sd = x.std(axis=0)
    # pretraining's collapse check measures the uncentred features; here they are centred
    erank = effective_rank(torch.from_numpy(x - x.mean(axis=0)))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1)
    cos = unit @ unit.T
    n = len(x)
    mean_cos = float((cos.sum() - np.trace(cos)) / (n * (n - 1))) if n > 1 else float("nan")
    return {
        "dim": int(x.shape[1]),
        "effective_rank": round(erank, 2),
        "effective_rank_share": round(erank / x.shape[1], 4),
        "sd_median": float(f"{np.median(sd):.4g}"),
        "sd_max": float(f"{sd.max():.4g}"),
        "dead_dims": int((sd < 1e-3 * max(sd.max(), 1e-30)).sum()),
        "mean_cosine": round(mean_cos, 4),
    }


def probe_features(
    x: np.ndarray,
    labels: TileLabels,
    sampled: np.ndarray,
    folds: int,
    c: float,
    top: float,
) -> dict[str, Any]:
    """Both tasks' tile AUC and slide ceiling on one encoder's features of the sampled tiles.

    Args:
        x: ``(M, D)`` features of the tiles ``sampled`` (flat indices into ``labels.index``).
        labels: the store's :class:`TileLabels`.
        sampled: ``(M,)`` the tiles embedded.
        folds, c: the probe's folds and regularisation (:func:`tile_probe`).
        top: share of a slide's tiles whose mean scores it (tumour slide ceiling).
    """
    from scipy.stats import pearsonr
    from sklearn.metrics import roc_auc_score

    slide_of = np.asarray(labels.index.slide_of)[sampled]
    groups = labels.patient[sampled]
    slides = len(labels.slide_ids)
    out: dict[str, Any] = {}
    for task in TASKS:
        y_all = (labels.tumour if task == "tumour" else labels.lymphocyte)[sampled]
        keep = y_all >= 0
        if len(set(y_all[keep].tolist())) < 2:
            out[task] = {"error": f"the sampled tiles hold one {task} class only"}
            continue
        result = tile_probe(x[keep], y_all[keep], groups[keep], folds, c, x, groups)
        scores = np.asarray(result.scores)
        entry: dict[str, Any] = {
            "tile_auc": result.auc,
            "tile_auc_per_fold": result.auc_per_fold,
            "positives": int((y_all == 1).sum()),
            "negatives": int((y_all == 0).sum()),
        }
        if task == "tumour":
            slide_score = top_mean(scores, slide_of, slides, top)
            entry["slide_auc_top"] = round(
                float(roc_auc_score(labels.slide_tumour, slide_score)), 4
            )
            mean_score = top_mean(scores, slide_of, slides, 1.0)
            entry["slide_auc_mean"] = round(
                float(roc_auc_score(labels.slide_tumour, mean_score)), 4
            )
        else:
            mean_score = top_mean(scores, slide_of, slides, 1.0)
            r = pearsonr(mean_score, labels.slide_lymphocyte_fraction).statistic
            entry["slide_r_fraction"] = round(float(r), 4)
        out[task] = entry
    return out


def tile_ceiling(
    cohort: Path, tiles: Path, features: dict[str, Path], folds: int, seed: int
) -> dict[str, dict[str, float]]:
    """The tumour ceiling of encoders already embedded into feature stores (``histcode embed``).

    Every tumour tile and up to 200 normal tiles a slide (:func:`tile_labels`) train a linear
    tile classifier on the other folds' patients (:func:`tile_probe`), which scores (1) the test
    patients' labelled tiles — tile AUC — and (2) every tile of the test patients' slides, a
    slide scoring the mean of its top 2 % tiles — slide AUC. When the second is low, no
    aggregator trained on slide labels can do much better on these features.

    Args:
        cohort: the synthetic cohort (truth masks).
        tiles: its tile store.
        features: encoder name → feature store of ``tiles``.
        folds: patient-grouped folds.
        seed: seed of the draw of normal tiles.
    """
    from sklearn.metrics import roc_auc_score

    from histcode.featurestore import FeatureStore

    index, chosen, y, groups = tile_labels(cohort, tiles, 200, seed)
    ids = [g.slide_id for g in index.slides]
    slide_y = np.array([int(s[13:15]) < 10 for s in ids], int)  # TCGA sample type 01-09
    slide_of = np.asarray(index.slide_of)
    patients = np.array([ids[s][:12] for s in slide_of])
    out: dict[str, dict[str, float]] = {}
    for name, path in features.items():
        store = FeatureStore(path)
        x_all = np.concatenate([np.asarray(store.read(s).features, np.float32) for s in ids])
        if len(x_all) != len(index):
            raise ValueError(
                f"{path} holds {len(x_all)} tiles but {tiles} has {len(index)}: embed that tile "
                "store again (histcode embed --overwrite true)"
            )
        result = tile_probe(x_all[chosen], y, groups, folds, 0.1, x_all, patients)
        slide_score = top_mean(np.asarray(result.scores), slide_of, len(ids), 0.02)
        out[name] = {
            "tile_auc": result.auc,
            "slide_auc_top2pct": round(float(roc_auc_score(slide_y, slide_score)), 4),
            "labelled_tiles": len(y),
        }
    return out


# -- pipeline -----------------------------------------------------------------------------------


def histcode(*args: str) -> dict[str, Any]:
    """Run a histcode command in-process; return its final JSON line.

    Raises:
        RuntimeError: the command exited with a status other than 0.
    """
    from histcode.cli import run_captured

    code, result = run_captured(args)
    if code != 0 or result is None:
        raise RuntimeError(f"histcode {args[0]} exited {code} (its message is above)")
    return result


def tile_size_at(mpp: float) -> int:
    """Tile side in px for a :data:`CONTEXT_UM` field of view at ``mpp`` µm/px."""
    return round(CONTEXT_UM / mpp)


def make_cohort(work: Path, difficulty: str, patients: int, slide_mm: tuple[float, float]) -> Path:
    """``histcode synth`` (seed 0; skipped when the folder holds it already)."""
    cohort = work / f"cohort-{difficulty}-{patients}p"
    if not (cohort / "cohort.csv").is_file():
        histcode(
            "synth", "--out", str(cohort), "--patients", str(patients),
            "--difficulty", difficulty, "--seed", "0", "--slide_mm", json.dumps(list(slide_mm)),
            "--progress", "false",
        )  # fmt: skip
    return cohort


def make_tiles(work: Path, cohort: Path, difficulty: str, patients: int, mpp: float) -> Path:
    """``histcode tile`` at ``mpp`` with a 64 µm field of view (skipped when done)."""
    tiles = work / f"tiles-{difficulty}-{patients}p-{mpp:g}.zarr"
    if not (tiles / "summary.json").is_file():
        histcode(
            "tile", "--slides", str(cohort / "slides"), "--out", str(tiles), "--mpp", str(mpp),
            "--tile_size", str(tile_size_at(mpp)), "--progress", "false",
        )  # fmt: skip
    return tiles


def pretrain_config(work: Path, seed: int, steps: int, batch_size: int) -> tuple[Path, dict]:
    """The demo's SimCLR config (``histcode.demo._pretrain_config``) as a YAML file."""
    import yaml

    from histcode.demo import DemoOptions, _pretrain_config

    options = DemoOptions(
        patients=0, difficulty="", slide_mm=(0, 0), mpp=1.0, tile_size=64,
        pretrain_steps=steps, batch_size=batch_size, epochs=1, folds=3,
        baseline_encoder="resnet18", aggregator="abmil", seed=seed,
    )  # fmt: skip
    config = _pretrain_config(options)
    path = work / f"pretrain-config-s{seed}-{steps}.yaml"
    if batch_size != 32:
        path = path.with_name(f"pretrain-config-s{seed}-{steps}-b{batch_size}.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config


def _loss_curve(out: Path) -> dict[str, Any]:
    """First, lowest and last logged training loss of a pretrain run (Lightning's CSV log)."""
    logs = sorted(out.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return {}
    with open(logs[-1]) as f:
        rows = [
            (int(r["step"]), float(r["train_loss"]))
            for r in csv.DictReader(f)
            if r.get("train_loss")
        ]
    if not rows:
        return {}
    losses = [v for _, v in rows]
    return {
        "first_logged": round(losses[0], 4),
        "min": round(min(losses), 4),
        "min_step": rows[int(np.argmin(losses))][0],
        "last_logged": round(losses[-1], 4),
        "curve": [[s, round(v, 3)] for s, v in rows[:: max(1, len(rows) // 10)]],
    }


def simclr(
    work: Path,
    tiles: Path,
    tag: str,
    seed: int,
    steps: int,
    batch_size: int,
    variant: str | None = None,
) -> dict[str, Any]:
    """``histcode pretrain`` with the demo's recipe (plus a :data:`VARIANTS` change); cached.

    Returns:
        ``ref``, ``final_loss``, ``chance_loss`` = ln(2B − 1), the loss curve, ``seconds`` and
        whether it was ``reused``.
    """
    config, _ = pretrain_config(work, seed, steps, batch_size)
    suffix = f"-{variant}" if variant else ""
    out = work / "pretrain" / f"{tag}-s{seed}-{steps}{suffix}"
    if batch_size != 32:
        out = out.with_name(out.name + f"-b{batch_size}")
    chance = math.log(2 * batch_size - 1)
    done = None
    try:
        summary = json.loads((out / "summary.json").read_text())
        cfg = summary.get("config", {})
        if (
            summary.get("exit_code") == 0
            and Path(cfg["data"]["tiles"]).resolve() == tiles.resolve()
            and cfg["trainer"]["max_steps"] == steps
            and cfg["data"]["batch_size"] == batch_size
            and cfg["seed_everything"] == seed
        ):
            done = summary["result"]
            done["seconds"] = summary.get("seconds")
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        done = None
    reused = done is not None
    if done is None:
        start = time.perf_counter()
        n_tiles = _n_tiles(tiles)
        done = histcode(
            "pretrain", f"--config={config}", "--data.tiles", str(tiles),
            "--name", f"ceil-{tag}-s{seed}-{steps}{suffix}", "--registry", str(work / "registry"),
            "--out", str(out), "--resume", "false",
            "--trainer.val_check_interval", str(max(1, min(steps // 4, n_tiles // batch_size))),
            "--trainer.enable_progress_bar", "false",
            *(VARIANTS[variant] if variant else []),
        )  # fmt: skip
        done["seconds"] = round(time.perf_counter() - start, 1)
    return {
        "ref": done["ref"],
        "variant": variant,
        "overrides": VARIANTS[variant] if variant else [],
        "steps": steps,
        "batch_size": batch_size,
        "final_loss": done["final_loss"],
        "chance_loss": round(chance, 4),
        "final_over_chance": round(done["final_loss"] / chance, 4),
        "loss": _loss_curve(out),
        "seconds": done.get("seconds"),
        "reused": reused,
    }


def _n_tiles(tiles: Path) -> int:
    return int(json.loads((tiles / "summary.json").read_text())["result"]["tiles"])


#: Pixels of the sampled tiles per tile store, read once and shared by every encoder and seed.
_PIXELS: dict[tuple[str, int, int], np.ndarray] = {}


def tile_pixels(labels: TileLabels, sampled: np.ndarray) -> np.ndarray:
    """``(M, 3, S, S)`` uint8 pixels of the sampled tiles (read from the slides once a run)."""
    from histcode.tilereader import TileDataset

    key = (str(labels.index.store.path), len(sampled), hash(sampled.tobytes()))
    if key not in _PIXELS:
        _PIXELS.clear()  # one store at a time: 128 px tiles of a cohort are ~0.6 GB
        dataset = TileDataset(labels.index)
        _PIXELS[key] = np.stack([dataset[int(i)].numpy() for i in sampled])
    return _PIXELS[key]


def embed(encoder: Any, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``(M, D)`` features of uint8 tiles ``(M, 3, S, S)``, as ``histcode embed`` computes them:
    eval mode, the encoder's input normalisation, float32 on the CPU."""
    import torch

    spec = encoder.input_spec
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    encoder = encoder.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            x = torch.from_numpy(pixels[start : start + batch_size]).float() / 255
            out.append(encoder((x - mean) / std).float())
    return torch.cat(out).numpy()


def run_cell(
    args: argparse.Namespace,
    difficulty: str,
    cohort: Path,
    mpp: float,
    seed: int,
    variants: list[str],
) -> dict[str, Any]:
    """Every encoder at one resolution and seed: probes, slide ceilings, feature stats."""
    import torch

    from histcode.encoders import create_encoder
    from histcode.registry import Registry

    t0 = time.perf_counter()
    tiles = make_tiles(args.work, cohort, difficulty, args.patients, mpp)
    labels = label_tiles(cohort, tiles)
    sampled = sample_tiles(labels.index, args.tiles_per_slide, 0)
    tag = f"{difficulty}-{args.patients}p-{mpp:g}"
    spec = {"mpp": mpp, "tile_size": tile_size_at(mpp)}
    cell: dict[str, Any] = {
        "difficulty": difficulty,
        "mpp": mpp,
        "tile_size": tile_size_at(mpp),
        "seed": seed,
        "tiles": len(labels.index),
        "tiles_probed": len(sampled),
        "encoders": {},
    }
    arms: list[tuple[str, str | None]] = [(n, None) for n in args.encoders]
    arms += [(f"simclr_{v}", v) for v in variants]
    for name, variant in arms:
        start = time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            if name in RANDOM_ENCODERS:
                arch, kwargs = RANDOM_ENCODERS[name]
                torch.manual_seed(seed)
                encoder = create_encoder(arch, **kwargs, **spec)
                entry["encoder"] = f"{arch} {kwargs or ''} random weights (seed {seed})".strip()
            else:
                run = simclr(args.work, tiles, tag, seed, args.steps, args.batch_size, variant)
                encoder, _ = Registry(args.work / "registry").load(run["ref"])
                entry["encoder"] = f"tiny SimCLR {run['ref']}"
                entry["pretrain"] = run
            x = embed(encoder, tile_pixels(labels, sampled))
            entry.update(probe_features(x, labels, sampled, args.folds, args.probe_c, args.top))
            entry["features"] = feature_stats(x, seed=seed)
            entry["status"] = "ok"
        except Exception as err:  # a failed arm is a row of the table, not the end
            entry.update(status="failed", error=f"{type(err).__name__}: {err}")
        entry["seconds"] = round(time.perf_counter() - start, 1)
        cell["encoders"][name] = entry
        print(
            f"ceiling: {tag} seed {seed} {name}: "
            + (
                f"tumour tile {entry['tumour'].get('tile_auc')} slide "
                f"{entry['tumour'].get('slide_auc_top')}, lymphocyte tile "
                f"{entry['lymphocyte'].get('tile_auc')}, erank "
                f"{entry['features']['effective_rank']} ({entry['seconds']} s)"
                if entry["status"] == "ok"
                else entry["error"]
            ),
            file=sys.stderr,
            flush=True,
        )
    cell["seconds"] = round(time.perf_counter() - t0, 1)
    return cell


def _cell_key(
    args: argparse.Namespace, difficulty: str, mpp: float, seed: int, variants: list[str]
) -> dict:
    return {
        "difficulty": difficulty, "patients": args.patients, "slide_mm": list(args.slide_mm),
        "mpp": mpp, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
        "encoders": list(args.encoders), "variants": variants, "folds": args.folds,
        "probe_c": args.probe_c, "top": args.top, "tiles_per_slide": args.tiles_per_slide,
    }  # fmt: skip


def cached_cell(
    args: argparse.Namespace,
    difficulty: str,
    cohort: Path,
    mpp: float,
    seed: int,
    variants: list[str],
) -> dict[str, Any]:
    """:func:`run_cell`, reused from ``--work/cells`` when run with the same settings."""
    key = _cell_key(args, difficulty, mpp, seed, variants)
    name = f"{difficulty}-{args.patients}p-{mpp:g}-s{seed}-{args.steps}"
    path = args.work / "cells" / (name + ("-" + "-".join(variants) if variants else "") + ".json")
    try:
        done = json.loads(path.read_text())
        if done.get("key") == key and all(
            e.get("status") == "ok" for e in done["cell"]["encoders"].values()
        ):
            return {**done["cell"], "reused": True}
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    cell = run_cell(args, difficulty, cohort, mpp, seed, variants)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "cell": cell}))
    tmp.replace(path)
    return cell


# -- summary ------------------------------------------------------------------------------------

#: Figures summarised over seeds: (name, path into an encoder's entry).
FIGURES: dict[str, tuple[str, ...]] = {
    "tumour_tile_auc": ("tumour", "tile_auc"),
    "tumour_slide_auc": ("tumour", "slide_auc_top"),
    "tumour_slide_auc_mean": ("tumour", "slide_auc_mean"),
    "lymphocyte_tile_auc": ("lymphocyte", "tile_auc"),
    "lymphocyte_slide_r": ("lymphocyte", "slide_r_fraction"),
    "effective_rank": ("features", "effective_rank"),
    "mean_cosine": ("features", "mean_cosine"),
    "final_loss": ("pretrain", "final_loss"),
}


def _get(entry: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = entry
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return float(node) if isinstance(node, int | float) else None


def mean_sd(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample sd of the defined values (sd None for fewer than 2), and the values."""
    ok = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": round(float(np.mean(ok)), 4) if ok else None,
        "sd": round(float(np.std(ok, ddof=1)), 4) if len(ok) > 1 else None,
        "n": len(ok),
        "values": [None if v is None else round(v, 4) for v in values],
    }


def summarise(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cohort × resolution × encoder (× SimCLR steps): mean ± sd over seeds.

    An encoder measured twice for the same cohort, resolution, seed and steps (merged runs)
    counts once: the first one.
    """
    groups: dict[tuple[str, float, str, int | None], list[dict[str, Any]]] = {}
    seen = set()
    for cell in cells:
        for name, entry in cell["encoders"].items():
            steps = (entry.get("pretrain") or {}).get("steps")
            key = (cell["difficulty"], cell["mpp"], name, steps)
            if entry.get("status") == "ok" and (*key, cell["seed"]) not in seen:
                seen.add((*key, cell["seed"]))
                groups.setdefault(key, []).append(entry)
    rows = []
    for (difficulty, mpp, name, steps), entries in groups.items():
        row: dict[str, Any] = {"difficulty": difficulty, "mpp": mpp, "encoder": name}
        row["steps"] = steps
        row["seeds"] = len(entries)
        for figure, path in FIGURES.items():
            if any(_get(e, path) is not None for e in entries):
                row[figure] = mean_sd([_get(e, path) for e in entries])
        if "pretrain" in entries[0]:
            row["chance_loss"] = entries[0]["pretrain"]["chance_loss"]
        rows.append(row)
    return rows


def load_result(path: Path) -> dict[str, Any]:
    """The last JSON line of a file this benchmark's stdout went to.

    Raises:
        ValueError: the file holds no result of this benchmark.
    """
    try:
        return last_json(path.read_text(), "ceiling")
    except ValueError:
        raise ValueError(f"--merge {path}: no JSON line of benchmarks.ceiling in it") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement (see the module docstring); returns the result."""
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    cohorts: list[tuple[str, list[float], list[int]]] = [(args.difficulty, args.mpp, args.seeds)]
    if args.reference not in ("none", args.difficulty) and args.seeds:
        cohorts.append((args.reference, args.reference_mpp, args.reference_seeds or args.seeds))
    cells, made = [], {}
    for difficulty, mpps, seeds in cohorts:
        if not seeds:
            continue
        cohort = make_cohort(args.work, difficulty, args.patients, args.slide_mm)
        result = json.loads((cohort / "summary.json").read_text()).get("result", {})
        made[difficulty] = {
            "patients": args.patients,
            "slides": result.get("slides"),
            "normal_slides": result.get("normal_slides"),
            "mean_tumour_fraction": result.get("mean_tumour_fraction"),
            "slide_mm": list(args.slide_mm),
            "synth_seed": 0,
        }
        for mpp in mpps:
            for seed in seeds:
                first = difficulty == args.difficulty and seed == seeds[0]
                variants = list(args.variants) if first and mpp == args.variant_mpp else []
                cells.append(cached_cell(args, difficulty, cohort, mpp, seed, variants))
    _, config = pretrain_config(args.work, (args.seeds or [0])[0], args.steps, args.batch_size)
    merged_seconds = 0.0
    for old in (load_result(path) for path in args.merge):
        cells += old["cells"]
        merged_seconds += old.get("seconds") or 0
        for d, c in old.get("cohorts", {}).items():
            made.setdefault(d, c)
    pretrained = [e["pretrain"] for c in cells for e in c["encoders"].values() if "pretrain" in e]
    return {
        "benchmark": "ceiling",
        "cohorts": made,
        "context_um": CONTEXT_UM,
        "probe": f"StandardScaler + LogisticRegression(C={args.probe_c}), {args.folds}-fold "
        f"GroupKFold by patient; slide ceiling: mean of a slide's top {args.top:.0%} tiles",
        "tiles_per_slide": args.tiles_per_slide,
        "simclr_recipe": {
            "source": "histcode.demo._pretrain_config",
            **config["model"],
            "batch_size": args.batch_size,
            "steps": sorted({p["steps"] for p in pretrained}) or [args.steps],
        },
        "merged_from": [str(p) for p in args.merge],
        "seeds": sorted({c["seed"] for c in cells}),
        "rows": summarise(cells),
        "cells": cells,
        "seconds": round(time.perf_counter() - t0 + merged_seconds, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 patients, 1 µm/px, 100 steps")
    parser.add_argument("--difficulty", default="hard", choices=["hard", "easy"])
    parser.add_argument("--reference", default="easy", choices=["easy", "hard", "none"])
    parser.add_argument("--patients", type=int, default=None, help="default 20 (quick 8)")
    parser.add_argument("--slide_mm", type=float, nargs=2, default=(2.5, 2.0), help="the demo's")
    parser.add_argument("--mpp", type=float, nargs="+", default=None, help="default 2 1 0.5")
    parser.add_argument("--reference-mpp", type=float, nargs="+", default=[1.0])
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=None, help="default 0 1 2; none: only --merge"
    )
    parser.add_argument("--reference-seeds", type=int, nargs="+", default=None, help="= --seeds")
    parser.add_argument("--steps", type=int, default=None, help="SimCLR steps: 1000 (quick 100)")
    parser.add_argument("--batch-size", type=int, default=32, help="SimCLR batch (the demo's)")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    parser.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS))
    parser.add_argument("--variant-mpp", type=float, default=1.0)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--probe-c", type=float, default=0.1, help="inverse L2 strength")
    parser.add_argument("--top", type=float, default=0.02, help="slide score: top share of tiles")
    parser.add_argument("--tiles-per-slide", type=int, default=None, help="600 (quick 200)")
    parser.add_argument("--work", type=Path, default=None, help="default benchmarks/out/ceiling")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="earlier runs' stdout: their cells join this run's table (e.g. other --steps)",
    )
    args = parser.parse_args(argv)
    q = args.quick
    args.patients = args.patients or (8 if q else 20)
    args.slide_mm = tuple(args.slide_mm)
    args.mpp = args.mpp or ([1.0] if q else [2.0, 1.0, 0.5])
    args.seeds = args.seeds if args.seeds is not None else ([0] if q else [0, 1, 2])
    args.steps = args.steps or (100 if q else 1000)
    args.tiles_per_slide = args.tiles_per_slide or (200 if q else 600)
    args.work = args.work or Path("benchmarks/out") / ("ceiling-quick" if q else "ceiling")
    if min(args.mpp + args.reference_mpp) <= 0:
        parser.error("--mpp and --reference-mpp must be positive µm/px values, e.g. 2 1 0.5")
    result = run(args)
    result["quick"] = q
    print(json.dumps(result), flush=True)
    return result


# -- report --------------------------------------------------------------------------------

#: Slide ceilings at or below this leave MIL little to find (a reading, not a goal).
CEILING_WEAK = 0.75


def _pm2(stat: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean ± sd (n)`` with fewer digits, for the ceiling table."""
    if not stat or stat.get("mean") is None:
        return "–"
    sd = "" if stat.get("sd") is None else f" ± {stat['sd']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{sd}"


def ceiling_table(r: dict[str, Any]) -> list[str]:
    """The markdown table of ``benchmarks.ceiling``'s result: one row a cohort × µm/px × encoder."""
    lines = [
        "| cohort | µm/px (px) | encoder | seeds | tumour tile AUC | tumour slide AUC (top "
        "2 %) | lymphocyte tile AUC | lymphocyte slide r | effective rank | SimCLR final loss "
        "(ln(2B−1)) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dims = {}
    for cell in r.get("cells", []):
        for name, e in cell.get("encoders", {}).items():
            if e.get("status") == "ok":
                dims[name] = (e.get("features") or {}).get("dim")
            else:
                lines.append(
                    f"| {cell.get('difficulty')} | {cell.get('mpp')} | {name} | seed "
                    f"{cell.get('seed')} | failed: {tail(str(e.get('error')), 100)} "
                    "| | | | | |"
                )
    rows = sorted(
        r.get("rows", []),
        key=lambda x: (
            x.get("difficulty") != "hard",
            -(x.get("mpp") or 0),
            x.get("encoder", ""),
            x.get("steps") or 0,
        ),
    )
    for row in rows:
        px = round(r.get("context_um", 64) / row["mpp"]) if row.get("mpp") else "?"
        loss = "–"
        if row.get("final_loss"):
            loss = f"{_pm2(row['final_loss'])} ({row.get('chance_loss', 0):.2f})"
        dim = dims.get(row["encoder"])
        name = row["encoder"] + (f" ({row['steps']} steps)" if row.get("steps") else "")
        lines.append(
            f"| {row['difficulty']} | {row['mpp']:g} ({px}) | {name} | {row['seeds']} "
            f"| {_pm2(row.get('tumour_tile_auc'))} | {_pm2(row.get('tumour_slide_auc'))} "
            f"| {_pm2(row.get('lymphocyte_tile_auc'))} | {_pm2(row.get('lymphocyte_slide_r'))} "
            f"| {_pm2(row.get('effective_rank'), 1)}{f' / {dim}' if dim else ''} | {loss} |"
        )
    return lines


def ceiling_section(entry: dict[str, Any]) -> list[str]:
    """Setup, table and a reading of the ceiling benchmark."""
    r = entry["result"]
    lines = []
    if r.get("quick"):
        lines += ["*Quick run: a smoke test of the benchmark, not evidence.*", ""]
    cohorts = "; ".join(
        f"{d}: {c.get('patients')} patients, {c.get('slides')} slides ({c.get('normal_slides')} "
        f"normal), tumour {100 * (c.get('mean_tumour_fraction') or 0):.1f} % of the tissue"
        for d, c in (r.get("cohorts") or {}).items()
    )
    recipe = r.get("simclr_recipe") or {}
    lines += [
        f"Synthetic cohorts ({cohorts}); tiles of {r.get('context_um', 64):g} µm at every "
        f"resolution, up to {r.get('tiles_per_slide')} a slide. Probe: {r.get('probe')}. "
        f"Encoders: the tiny CNN with random weights, a random-weight ResNet-18 (the naive "
        f"baseline's) and the tiny CNN after SimCLR with the demo's recipe "
        f"({recipe.get('optimizer')} lr {recipe.get('lr')}, batch {recipe.get('batch_size')}, "
        f"{recipe.get('steps')} steps). Figures are mean ± sd over seeds {r.get('seeds')} "
        "(encoder initialisation and SimCLR; cohort and folds fixed). Lymphocyte slide r: "
        "Pearson r of a slide's mean tile probability with its true lymphocyte fraction.",
        "",
        *ceiling_table(r),
    ]
    notes = []
    rows = r.get("rows", [])
    for d, mpp in sorted({(x["difficulty"], x["mpp"]) for x in rows}, key=lambda k: (k[0], -k[1])):
        here = [x for x in rows if (x["difficulty"], x["mpp"]) == (d, mpp)]
        slide = {
            x["encoder"] + (f" ({x['steps']} steps)" if x.get("steps") else ""): v
            for x in here
            if (v := (x.get("tumour_slide_auc") or {}).get("mean")) is not None
        }
        if slide and max(slide.values()) <= CEILING_WEAK:
            best = max(slide, key=slide.__getitem__)
            notes.append(
                f"on {d} at {mpp:g} µm/px no encoder's tiles rank slides above "
                f"{slide[best]:.2f} ({best}) even with a tile probe trained on the truth masks: "
                "the features, not the aggregator, cap the slide result"
            )
        random_rank = next(
            (
                (x.get("effective_rank") or {}).get("mean")
                for x in here
                if x["encoder"] == "tiny_random"
            ),
            None,
        )
        for x in here:
            loss, chance = (x.get("final_loss") or {}).get("mean"), x.get("chance_loss")
            if loss is None or not chance:
                continue
            rank = (x.get("effective_rank") or {}).get("mean")
            verdict = (
                "at chance"
                if abs(loss - chance) <= 0.05 * chance
                else ("above chance" if loss > chance else "below chance")
            )
            notes.append(
                f"{x['encoder']} ({x.get('steps')} steps) on {d} at {mpp:g} µm/px: final loss "
                f"{loss:.2f} = {loss / chance:.2f} × ln(2B−1) ({verdict}; a constant embedding "
                f"scores exactly ln(2B−1)), effective rank {fmt(rank)}"
                + (f" vs {random_rank:.1f} with random weights" if random_rank else "")
            )
    if notes:
        lines += ["", "Reading: " + "; ".join(notes) + "."]
    return lines


SPEC = Benchmark(
    name="ceiling",
    what="tile probes with truth-mask labels: what the features can separate, per resolution",
    quick=["--quick"],
    timeout=3 * 3600,
    order=100,
    goals=(
        "none: a diagnosis. A slide ceiling at or below "
        f"{CEILING_WEAK} means the features, not the aggregator, cap the slide result",
    ),
    section=Section(
        "Ceiling: what the tile features can separate (labels MIL never gets)",
        ceiling_section,
        order=20,
    ),
)


if __name__ == "__main__":
    main()
