"""Figures of a finetune run (seaborn, PNG, headless).

Figures are drawn on ``matplotlib.figure.Figure`` objects and saved with the Agg renderer,
without pyplot, so nothing depends on (or changes) the session's matplotlib backend.

* ``tumour_roc.png`` — ROC curve of each test fold and of the pooled out-of-fold predictions.
* ``genes_auc_up.png``, ``genes_pearson_r.png`` — genes ranked by the metric, mean ± sd over
  folds (significant genes after FDR marked).
* ``log2fc_scatter.png`` — predicted vs true log2FC of the best-ranked genes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _number(x: Any) -> float | None:
    """A finite float, or None (for NaN / None)."""
    return float(x) if x is not None and math.isfinite(x) else None


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def plot_roc(predictions: pd.DataFrame, path: Path, metrics: dict[str, Any] | None = None) -> Path:
    """ROC curves of tumour vs normal, one per fold plus the pooled curve."""
    import seaborn as sns
    from sklearn.metrics import roc_curve

    rows = []
    for fold, part in [*predictions.groupby("fold"), ("pooled", predictions)]:
        y = part["tumour_true"].to_numpy(np.float64)
        p = part["tumour_prob"].to_numpy(np.float64)
        keep = np.isfinite(y)
        if len(set(y[keep].tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(y[keep].astype(int), p[keep])
        label = "pooled" if fold == "pooled" else f"fold {fold}"
        rows += [{"fpr": a, "tpr": b, "curve": label} for a, b in zip(fpr, tpr, strict=True)]
    fig = _figure(4.8, 4.2)
    ax = fig.subplots()
    if rows:
        frame = pd.DataFrame(rows)
        palette = {c: "0.2" if c == "pooled" else None for c in frame["curve"].unique()}
        folds = [c for c in frame["curve"].unique() if c != "pooled"]
        palette.update(dict(zip(folds, sns.color_palette("muted", len(folds)), strict=True)))
        sns.lineplot(
            frame, x="fpr", y="tpr", hue="curve", palette=palette, estimator=None,
            sort=False, ax=ax, linewidth=1.2,
        )  # fmt: skip
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.8)
    title = "Tumour vs normal (test folds)"
    if metrics and "tumour" in metrics:
        mean, sd = (
            _number(metrics["tumour"]["auc"]["mean"]),
            _number(metrics["tumour"]["auc"]["sd"]),
        )
        if mean is not None:
            title += f"\nAUC {mean:.3f} ± {sd or 0.0:.3f}"
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    return _save(fig, path)


def plot_gene_ranking(
    metrics: dict[str, Any], metric: str, path: Path, top: int = 40
) -> Path | None:
    """Genes ranked by ``metric`` (``auc_up``, ``pearson_r`` or ``spearman_r``), mean ± sd over
    folds; genes significant after FDR are drawn dark, a gene whose metric is undefined in some
    folds is named with the folds it rests on. None if no gene has the metric."""
    import seaborn as sns

    genes = metrics.get("genes", {})
    folds = metrics.get("folds")
    rows = []
    for g, m in genes.items():
        mean, sd = _number(m[metric]["mean"]), _number(m[metric]["sd"])
        if mean is not None:
            defined = m[metric].get("n")
            name = g if defined == folds else f"{g} ({defined}/{folds} folds)"
            rows.append(
                {"gene": name, "mean": mean, "sd": sd or 0.0, "significant": m["significant"]}
            )
    if not rows:
        return None
    frame = pd.DataFrame(rows).sort_values("mean", ascending=False).head(top)
    fig = _figure(6.0, 1.2 + 0.22 * len(frame))
    ax = fig.subplots()
    colours = ["#2b6a99" if s else "#9ab7cc" for s in frame["significant"]]
    sns.barplot(frame, x="mean", y="gene", hue="gene", palette=colours, legend=False, ax=ax)
    ax.errorbar(
        frame["mean"], np.arange(len(frame)), xerr=frame["sd"], fmt="none", ecolor="0.2", lw=1
    )
    reference = 0.5 if metric == "auc_up" else 0.0
    ax.axvline(reference, ls="--", color="0.5", lw=0.8)
    names = {"auc_up": "AUC (up vs rest)", "pearson_r": "Pearson r", "spearman_r": "Spearman ρ"}
    ax.set(
        xlabel=f"{names.get(metric, metric)}, mean ± sd over folds",
        ylabel="",
        title="Genes ranked (dark: significant after FDR)",
    )
    return _save(fig, path)


def plot_log2fc_scatter(
    predictions: pd.DataFrame, genes: Sequence[str], metrics: dict[str, Any], path: Path
) -> Path | None:
    """Predicted vs true log2FC (pooled test folds) of up to 9 genes with the best Pearson r."""
    import seaborn as sns

    from histcode.finetune.metrics import sample_level

    def score(g: str) -> float:
        r = _number(metrics.get("genes", {}).get(g, {}).get("pooled", {}).get("pearson_r"))
        return -math.inf if r is None else r

    chosen = sorted(genes, key=score, reverse=True)[:9]
    if not chosen:
        return None
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = _figure(3.2 * cols, 3.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, g in zip(axes, chosen, strict=False):
        frame = sample_level(predictions, g).rename(columns={f"{g}_class_true": "true class"})
        sns.scatterplot(
            frame,
            x=f"{g}_log2fc_true",
            y=f"{g}_log2fc_pred",
            hue="true class",
            hue_order=["down", "unchanged", "up"],
            palette={"down": "#3b7dd8", "unchanged": "0.6", "up": "#d8553b"},
            s=18,
            ax=ax,
            legend=ax is axes[0],
        )
        entry = metrics.get("genes", {}).get(g, {})
        r = _number(entry.get("pooled", {}).get("pearson_r"))
        q = _number(entry.get("test", {}).get("pearson_q"))  # the per-fold combined test's
        text = g if r is None else f"{g}: r={r:.2f}"
        if q is not None:
            text += f", q={q:.2g}"
        ax.set(title=text, xlabel="true log2FC", ylabel="predicted log2FC")
        ax.axline((0, 0), slope=1, ls="--", color="0.6", lw=0.8)
    for ax in axes[len(chosen) :]:
        ax.set_axis_off()
    return _save(fig, path)


def plot_all(
    predictions: pd.DataFrame,
    metrics: dict[str, Any],
    genes: Sequence[str],
    tumour: bool,
    folder: Path,
) -> list[Path]:
    """Every figure of a run into ``folder``; returns the files written."""
    written: list[Path | None] = []
    if not len(predictions):
        return []
    if tumour:
        written.append(plot_roc(predictions, folder / "tumour_roc.png", metrics))
    if genes:
        written.append(plot_gene_ranking(metrics, "auc_up", folder / "genes_auc_up.png"))
        written.append(plot_gene_ranking(metrics, "pearson_r", folder / "genes_pearson_r.png"))
        written.append(
            plot_log2fc_scatter(predictions, genes, metrics, folder / "log2fc_scatter.png")
        )
    return [p for p in written if p is not None]


__all__ = ["plot_all", "plot_gene_ranking", "plot_log2fc_scatter", "plot_roc"]
