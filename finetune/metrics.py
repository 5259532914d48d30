"""Metrics of out-of-fold predictions: per fold, mean ± sd over folds, and FDR-tested genes.

* Tumour: ROC AUC, accuracy and F1 (at probability 0.5) per test fold.
* Each gene, on tumour slides with a target: AUC of up vs the rest (``<GENE>_up_prob``),
  Pearson and Spearman correlation of predicted and true log2FC, per test fold.
* Per gene, the pooled out-of-fold predictions give one-sided tests of a positive
  correlation (Pearson and Spearman) over **samples** — slides of one expression sample share
  one target, so their predictions are averaged first and the sample counts once — and
  Benjamini–Hochberg FDR across genes (``scipy.stats.false_discovery_control``). A gene is
  significant when its Pearson q-value is below ``alpha``.

Undefined values (one class in a fold, a constant prediction) are NaN in Python and ``null``
in ``metrics.json``; means skip them and say over how many folds they are taken.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN / inf as None and numpy scalars as Python numbers (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return _finite(obj)
    return obj


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation over folds, skipping NaN.

    Returns:
        ``{"mean", "sd", "n", "folds"}``: ``n`` folds where the value is defined; ``sd`` is
        NaN with fewer than 2.
    """
    arr = np.asarray(values, dtype=np.float64)
    ok = arr[np.isfinite(arr)]
    return {
        "mean": float(ok.mean()) if len(ok) else math.nan,
        "sd": float(ok.std(ddof=1)) if len(ok) > 1 else math.nan,
        "n": len(ok),
        "folds": arr.tolist(),
    }


def binary_metrics(
    y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """ROC AUC, accuracy and F1 of probabilities ``prob`` (n,) for labels ``y_true`` (n,) 0/1.

    AUC is NaN when ``y_true`` has one class; F1 is 0 without predicted or true positives.
    """
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    keep = np.isfinite(y) & np.isfinite(p)
    y, p = y[keep].astype(int), p[keep]
    if not len(y):
        return {"auc": math.nan, "accuracy": math.nan, "f1": math.nan, "n": 0}
    pred = (p >= threshold).astype(int)
    return {
        "auc": float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else math.nan,
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "n": len(y),
    }


def correlation(
    pred: np.ndarray, true: np.ndarray, alternative: str = "greater"
) -> dict[str, float]:
    """Pearson and Spearman correlation with p-values (one-sided ``greater`` by default).

    Returns:
        ``pearson_r``, ``pearson_p``, ``spearman_r``, ``spearman_p`` (NaN with fewer than 3
        pairs or a constant input) and ``n``.
    """
    from scipy.stats import pearsonr, spearmanr

    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(true, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = {k: math.nan for k in ("pearson_r", "pearson_p", "spearman_r", "spearman_p")}
    out["n"] = len(x)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = pearsonr(x, y, alternative=alternative)
        sr = spearmanr(x, y, alternative=alternative)
    out.update(
        pearson_r=float(pr.statistic),
        pearson_p=float(pr.pvalue),
        spearman_r=float(sr.statistic),
        spearman_p=float(sr.pvalue),
    )
    return out


def bh_fdr(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaN p-values stay NaN and do not count."""
    from scipy.stats import false_discovery_control

    p = np.asarray(pvalues, dtype=np.float64)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def gene_fold_metrics(frame: pd.DataFrame, gene: str) -> dict[str, float]:
    """AUC (up vs rest), Pearson and Spearman of one gene on the rows of ``frame`` that have
    a target (slide level)."""
    from sklearn.metrics import roc_auc_score

    true = frame[f"{gene}_log2fc_true"].to_numpy(np.float64)
    keep = np.isfinite(true)
    sub = frame[keep]
    up = (sub[f"{gene}_class_true"] == "up").to_numpy()
    auc = (
        float(roc_auc_score(up, sub[f"{gene}_up_prob"].to_numpy()))
        if 0 < up.sum() < len(up)
        else math.nan
    )
    corr = correlation(sub[f"{gene}_log2fc_pred"].to_numpy(), true[keep])
    return {
        "auc_up": auc,
        "pearson_r": corr["pearson_r"],
        "spearman_r": corr["spearman_r"],
        "n": int(keep.sum()),
        "n_up": int(up.sum()),
    }


def sample_level(frame: pd.DataFrame, gene: str) -> pd.DataFrame:
    """Rows with a target of ``gene``, averaged per ``sample_id`` (slides sharing a target)."""
    cols = [f"{gene}_log2fc_pred", f"{gene}_log2fc_true", f"{gene}_up_prob"]
    sub = frame[np.isfinite(frame[f"{gene}_log2fc_true"].to_numpy(np.float64))]
    key = "sample_id" if "sample_id" in sub else "slide_id"
    grouped = sub.groupby(key, sort=True)
    out = grouped[cols].mean()
    out[f"{gene}_class_true"] = grouped[f"{gene}_class_true"].first()
    return out


def compute_metrics(
    predictions: pd.DataFrame, genes: Sequence[str], tumour: bool, alpha: float = 0.05
) -> dict[str, Any]:
    """All metrics of a cross-validation run (the content of ``metrics.json``).

    Args:
        predictions: out-of-fold predictions (``predictions.csv`` columns).
        genes: the genes.
        tumour: whether the tumour task was trained.
        alpha: FDR level for significant genes.

    Returns:
        ``{"folds", "slides", "patients", "tumour": {metric: {mean, sd, n, folds}, "pooled":
        {...}}, "genes": {gene: {...}}, "fdr": {...}, "significant_genes": [...]}``.
    """
    from sklearn.metrics import roc_auc_score

    folds = sorted(predictions["fold"].unique().tolist()) if len(predictions) else []
    out: dict[str, Any] = {
        "folds": len(folds),
        "slides": len(predictions),
        "patients": int(predictions["patient_id"].nunique()) if len(predictions) else 0,
    }
    by_fold = {k: predictions[predictions["fold"] == k] for k in folds}
    if tumour:
        per = [binary_metrics(f["tumour_true"], f["tumour_prob"]) for f in by_fold.values()]
        out["tumour"] = {m: summarise([p[m] for p in per]) for m in ("auc", "accuracy", "f1")}
        out["tumour"]["pooled"] = binary_metrics(
            predictions["tumour_true"], predictions["tumour_prob"]
        )
    gene_out: dict[str, Any] = {}
    for gene in genes:
        per = [gene_fold_metrics(f, gene) for f in by_fold.values()]
        entry: dict[str, Any] = {
            m: summarise([p[m] for p in per]) for m in ("auc_up", "pearson_r", "spearman_r")
        }
        samples = sample_level(predictions, gene)
        pooled = correlation(
            samples[f"{gene}_log2fc_pred"].to_numpy(), samples[f"{gene}_log2fc_true"].to_numpy()
        )
        up = (samples[f"{gene}_class_true"] == "up").to_numpy()
        pooled["auc_up"] = (
            float(roc_auc_score(up, samples[f"{gene}_up_prob"].to_numpy()))
            if 0 < up.sum() < len(up)
            else math.nan
        )
        pooled["n_up"] = int(up.sum())
        entry["pooled"] = pooled
        gene_out[gene] = entry
    for stat in ("pearson", "spearman"):
        q = bh_fdr([gene_out[g]["pooled"][f"{stat}_p"] for g in genes])
        for g, value in zip(genes, q, strict=True):
            gene_out[g]["pooled"][f"{stat}_q"] = float(value)
    significant = []
    for g in genes:
        q = gene_out[g]["pooled"]["pearson_q"]
        gene_out[g]["significant"] = bool(math.isfinite(q) and q < alpha)
        if gene_out[g]["significant"]:
            significant.append(g)
    if genes:
        out["genes"] = gene_out
        out["fdr"] = {
            "method": "benjamini-hochberg",
            "alpha": alpha,
            "test": "one-sided (positive) Pearson correlation of predicted vs true log2FC over "
            "samples, pooled out-of-fold predictions; q-values across genes",
        }
        out["significant_genes"] = sorted(
            significant, key=lambda g: gene_out[g]["pooled"]["pearson_q"]
        )
        aucs = [gene_out[g]["auc_up"]["mean"] for g in genes]
        out["mean_gene_auc_up"] = summarise(aucs)["mean"]
    return out


__all__ = [
    "bh_fdr",
    "binary_metrics",
    "compute_metrics",
    "correlation",
    "gene_fold_metrics",
    "jsonable",
    "sample_level",
    "summarise",
]
