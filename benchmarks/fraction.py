"""Tumour fraction: how well tile calls can count a slide's tumour, and what that allows the
tumour-burden genes.

Bulk expression of a gene made by tumour cells follows the tumour's share of the sample, so a
slide model predicts such a gene only as well as it counts the slide's tumour. This benchmark
measures that count's ceiling on a finished ``histcode demo`` folder, with labels MIL never
gets, on the pipeline's own patient-grouped folds (the ``fold`` column of
``finetune/<arm>/predictions.csv``; nothing of the test fold is fitted):

- a linear tile probe (features standardised over the training tiles, logistic regression
  C=0.1) is trained on the truth-mask tile labels of the training slides, as the aggregation
  benchmark's ceiling, but unbalanced so that its probabilities count;
- each held-out tumour slide's tumour fraction is estimated two ways: ``mean_prob``, the mean
  of its tiles' probabilities (what ``--model.tumour_fraction_genes`` reads), and ``count``,
  the share of its tiles above the threshold at which the training tiles' count equals their
  true number of tumour tiles;
- ``fraction_r``: Pearson r of each estimate with the slide's true tumour fraction
  (``cohort/cohort.csv``) over the fold's held-out tumour slides, mean over folds;
- ``gene_r``: for each tumour-burden gene (``cohort/genes.json`` role ``tumour``), a linear
  fit of its true log2 fold change on the estimate over the training tumour slides, and the
  Pearson r of its predictions with the truth on the held-out ones; mean over genes, then
  over folds. ``true_fraction`` is the same fit on the true fraction (what perfect counting
  gives; the rest is expression noise) and ``pipeline`` the arm's own predictions from the
  same ``predictions.csv``.

Per slide here, where the demo's table is per patient; a hard demo's patients have one tumour
slide each, so the two agree there.

    python -m benchmarks.fraction [DEMO ...] [--arm simclr|naive] [--views raw context]

Without a ``DEMO`` it makes (or reuses) the aggregation benchmark's demos under ``--work``.

Prints one JSON line; its ``SPEC`` renders it for ``benchmarks.run`` (:func:`section`).
Measured on the three 30-patient hard demos (seeds 0–2) and the three easy ones:
``benchmarks/RESULTS.md``, "Tumour fraction".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.aggregation import (
    ARM_FEATURES,
    DEMO_DIFFICULTY,
    DEMO_PATIENTS,
    FEATURE_VIEWS,
    _pm,
    _standardiser,
    cohort_of,
    feature_view,
    load_demo,
    make_demos,
    stat,
)
from benchmarks.spec import Benchmark, Section, tail

#: Estimates of a slide's tumour fraction from its tile probabilities.
ESTIMATES = ("mean_prob", "count")


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson r (:func:`histcode.finetune.metrics.correlation`), None where it is undefined
    (fewer than 3 pairs, a constant side)."""
    from histcode.finetune.metrics import correlation

    r = correlation(np.asarray(x, np.float64), np.asarray(y, np.float64))["pearson_r"]
    return None if math.isnan(r) else r


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Least-squares line of ``y_train`` on ``x_train`` (both ``(n,)``), applied to ``x_test``."""
    slope, intercept = np.polyfit(x_train, y_train, 1)
    return slope * x_test + intercept


def _mean(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return float(np.mean(got)) if got else None


def fraction_ceiling(
    bags: Sequence[np.ndarray],
    tile_labels: Sequence[np.ndarray],
    slide_labels: np.ndarray,
    folds: np.ndarray,
    fraction: np.ndarray,
    genes: Mapping[str, np.ndarray],
    pipeline: Mapping[str, np.ndarray] | None = None,
    c: float = 0.1,
) -> dict[str, Any]:
    """The truth probe's tumour-fraction estimates and the gene fits they allow, per fold.

    Args:
        bags: per-slide features, each ``(n_i, D)``.
        tile_labels: per-slide truth-mask tile labels, each ``(n_i,)`` in {1, 0, -1}.
        slide_labels: ``(S,)`` 1 tumour, 0 normal.
        folds: ``(S,)`` test fold of each slide.
        fraction: ``(S,)`` each slide's true tumour fraction.
        genes: tumour-burden gene → ``(S,)`` its true log2 fold change (NaN where unknown,
            e.g. normal slides).
        pipeline: gene → ``(S,)`` the pipeline's predicted log2 fold change (optional).
        c: inverse L2 strength of the probe.

    Returns:
        ``fraction_r`` (estimate → mean over folds of the per-fold r), ``gene_r`` (estimate,
        ``true_fraction`` and ``pipeline`` → mean over folds of the per-fold mean over genes),
        ``folds`` (per fold: the same figures and the number of held-out tumour slides).
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(slide_labels).astype(int)
    folds, fraction = np.asarray(folds), np.asarray(fraction, np.float64)
    per_fold = []
    for fold in np.unique(folds):
        train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        x = np.concatenate([bags[i] for i in train])
        t = np.concatenate([tile_labels[i] for i in train]).astype(int)
        keep = t >= 0
        z = _standardiser(x)
        probe = LogisticRegression(C=c, max_iter=1000).fit(z(x[keep]), t[keep])
        tumour_train = [i for i in train if y[i] == 1]
        tumour_test = [i for i in test if y[i] == 1]
        probs = {i: probe.predict_proba(z(bags[i]))[:, 1] for i in [*train, *tumour_test]}
        labelled = np.concatenate([probs[i][tile_labels[i] >= 0] for i in train])
        threshold = np.quantile(labelled, 1 - (t[keep] == 1).mean())
        tumour = [*tumour_train, *tumour_test]
        sources = {
            "mean_prob": {i: float(probs[i].mean()) for i in tumour},
            "count": {i: float((probs[i] > threshold).mean()) for i in tumour},
            "true_fraction": {i: float(fraction[i]) for i in tumour},
        }
        row: dict[str, Any] = {
            "tumour_slides": len(tumour_test),
            "fraction_r": {
                k: _pearson([sources[k][i] for i in tumour_test], fraction[tumour_test])
                for k in ESTIMATES
            },
            "gene_r": {},
        }
        for name, source in sources.items():
            rs = []
            for truth in genes.values():
                tr = [i for i in tumour_train if np.isfinite(truth[i])]
                te = [i for i in tumour_test if np.isfinite(truth[i])]
                if len(tr) < 3 or len(te) < 3:
                    continue
                fitted = _fit_predict(
                    np.array([source[i] for i in tr]), truth[tr], np.array([source[i] for i in te])
                )
                rs.append(_pearson(fitted, truth[te]))
            row["gene_r"][name] = _mean(rs)
        if pipeline:
            rs = []
            for g in (g for g in genes if g in pipeline):
                ok = [i for i in tumour_test if np.isfinite(genes[g][i])]
                rs.append(_pearson(pipeline[g][ok], genes[g][ok]))
            row["gene_r"]["pipeline"] = _mean(rs)
        per_fold.append(row)
    keys = [*ESTIMATES, "true_fraction", *(["pipeline"] if pipeline else [])]
    return {
        "fraction_r": {k: _mean([f["fraction_r"][k] for f in per_fold]) for k in ESTIMATES},
        "gene_r": {k: _mean([f["gene_r"].get(k) for f in per_fold]) for k in keys},
        "folds": per_fold,
    }


def demo_inputs(demo: Path, arm: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """A demo's true tumour fractions, tumour-burden genes' true and predicted log2FC, in
    ``predictions.csv`` order.

    Raises:
        FileNotFoundError: no ``cohort/cohort.csv`` or ``cohort/genes.json`` (not a
            synthetic demo: the true fractions and gene roles come from the generator).
        ValueError: no gene has the role ``tumour``.
    """
    import pandas as pd

    from histcode.synth.cohort import read_gene_roles

    cohort = cohort_of(demo)
    for need in ("cohort.csv", "genes.json"):
        if not (cohort / need).is_file():
            raise FileNotFoundError(
                f"{cohort / need}: missing; the tumour-fraction benchmark needs a "
                "synthetic demo (true fractions and gene roles)"
            )
    predictions = pd.read_csv(demo / "finetune" / arm / "predictions.csv")
    truth = pd.read_csv(cohort / "cohort.csv").set_index("slide_id")
    fraction = truth.loc[predictions.slide_id, "tumour_fraction"].to_numpy(np.float64)
    roles = read_gene_roles(cohort / "genes.json")
    named = [g for g, r in roles.items() if r == "tumour" and f"{g}_log2fc_true" in predictions]
    if not named:
        raise ValueError(f"{demo}: no tumour-burden gene (genes.json role 'tumour') was predicted")
    genes = {g: predictions[f"{g}_log2fc_true"].to_numpy(np.float64) for g in named}
    predicted = {g: predictions[f"{g}_log2fc_pred"].to_numpy(np.float64) for g in named}
    return fraction, genes, predicted


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "demos", type=Path, nargs="*", metavar="DEMO",
        help="finished synthetic histcode demo folders (none: make --demo-seeds under --work, "
        "as benchmarks.aggregation does)",
    )  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/aggregation"))
    parser.add_argument("--demo-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arm", default="simclr", choices=sorted(ARM_FEATURES))
    parser.add_argument(
        "--views", nargs="+", default=list(FEATURE_VIEWS), choices=list(FEATURE_VIEWS),
        help="views of the tile features the probe runs on: " + "; ".join(
            f"{k}: {v}" for k, v in FEATURE_VIEWS.items()),
    )  # fmt: skip
    args = parser.parse_args(argv)
    for demo in args.demos:
        if not (demo / "finetune" / args.arm / "predictions.csv").is_file():
            parser.error(f"{demo}: no finetune/{args.arm}/predictions.csv; not a finished demo")
    start = time.perf_counter()
    demos = args.demos or make_demos(args.work, args.demo_seeds, DEMO_PATIENTS, DEMO_DIFFICULTY)
    results = []
    for demo in demos:
        print(f"fraction: {demo} ({args.arm})", file=sys.stderr, flush=True)
        base = load_demo(demo, args.arm)
        fraction, genes, predicted = demo_inputs(demo, args.arm)
        entry: dict[str, Any] = {"demo": str(demo), "tumour_slides": int(base.slide_labels.sum())}
        for view in args.views:
            data = feature_view(base, view)
            got = fraction_ceiling(
                data.bags, data.tile_labels, data.slide_labels, data.folds, fraction, genes,
                predicted,
            )  # fmt: skip
            entry[view] = got
            print(f"fraction: {view}: {json.dumps({k: got[k] for k in ('fraction_r', 'gene_r')})}",
                  file=sys.stderr, flush=True)  # fmt: skip
        results.append(entry)
    summary = {
        view: {
            part: {k: stat([d[view][part][k] for d in results]) for k in results[0][view][part]}
            for part in ("fraction_r", "gene_r")
        }
        for view in args.views
    }
    result = {
        "benchmark": "fraction",
        "arm": args.arm,
        "views": list(args.views),
        "demos": results,
        "summary": summary,
        "command": " ".join(["python -m benchmarks.fraction", *(argv or sys.argv[1:])]),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result), flush=True)
    return result


# -- report ---------------------------------------------------------------------------------


def section(entry: dict[str, Any]) -> list[str]:
    """Setup and table of the tumour-fraction benchmark for ``RESULTS.md``."""
    r = entry["result"]
    demos = r.get("demos", [])
    if not demos:
        return [f"No demo was scored: {tail(str(r), 200)}"]
    lines = [
        f"The {r.get('arm')} tile features of {len(demos)} finished `histcode demo` folder(s) "
        f"({', '.join(Path(d['demo']).name for d in demos)}); a tile probe trained on the truth "
        "masks of each fold's training slides estimates each held-out tumour slide's tumour "
        "fraction; gene r: each tumour-burden gene fitted linearly on that estimate (or on the "
        "true fraction) over the training tumour slides, Pearson r on the held-out ones, mean "
        f"over genes and folds; mean ± sd over the demos; {r.get('seconds')} s.",
        "",
        "| view | fraction r: mean probability | fraction r: count | gene r: mean probability "
        "| gene r: count | gene r: true fraction | gene r: the pipeline |",
        "|---|---|---|---|---|---|---|",
    ]
    for view in r.get("views", []):
        s = r["summary"][view]
        f, g = s["fraction_r"], s["gene_r"]
        lines.append(
            f"| {view} | {_pm(f.get('mean_prob'))} | {_pm(f.get('count'))} "
            f"| {_pm(g.get('mean_prob'))} | {_pm(g.get('count'))} "
            f"| {_pm(g.get('true_fraction'))} | {_pm(g.get('pipeline'))} |"
        )
    return lines


SPEC = Benchmark(
    name="fraction",
    what="how well a truth-mask tile probe counts a slide's tumour, and the tumour-burden gene "
    "r that count allows",
    quick=None,
    timeout=3600,
    order=99,
    goals=(
        "none: a diagnosis. The gene r of the probe's count is what tile calls of these "
        "features allow the tumour-burden genes; true_fraction is what perfect counting gives",
    ),
    section=Section(
        "Tumour fraction: what tile calls allow the tumour-burden genes", section, order=23
    ),
)


if __name__ == "__main__":
    main()
