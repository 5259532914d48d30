"""Metrics of out-of-fold predictions: per fold, mean ± sd over folds, and FDR-tested genes.

* Tumour: ROC AUC, accuracy and F1 (at probability 0.5) per test fold; and the AUC
  **within tissue source sites** (``tumour.within_site_auc``, :func:`within_site_auc`): TCGA
  models learn a site's stain and scanner signature, and normals come from some sites more
  than others, so a site shortcut can pass for tumour detection overall while ranking
  tumour and normal slides of one site no better than chance.
* Each gene, per test fold: AUC of up vs the rest (``<GENE>_up_prob``, on the tumour slides
  with a target), and Pearson and Spearman correlation of predicted and true log2FC on
  **one value per patient** (the mean prediction and the mean truth of the patient's slides
  in that fold; patients never cross folds).
* Significance (``genes.<GENE>.test``): per test fold, a one-sided test of a positive
  Pearson (and Spearman) correlation over the fold's patients; the folds' p-values combined
  by Stouffer's method weighted by √(patients in the fold), with the folds' z-scores taken
  as correlated ``1 / folds`` (each fold's model learnt from the others' targets;
  :func:`combine_folds`); Benjamini–Hochberg FDR over **all** genes tested
  (``scipy.stats.false_discovery_control``). A gene is significant when its Pearson q-value
  is below ``alpha``. See :func:`fold_combined_test` for why.
* Mean gene AUC (``gene_auc_up``, ``mean_gene_auc_up``) averages only the genes whose AUC is
  defined in every test fold; the others are listed in ``gene_auc_up.left_out`` with the
  number of folds their AUC rests on.
* Each categorical task (``--data.classes``, e.g. subtype), per test fold and over the slides
  with a class: one-vs-rest ROC AUC of each class (``<task>_prob_<class>``), their mean (the
  macro AUC, over the classes present in the fold) and accuracy of the most probable class
  (``categories.<task>``; :func:`categorical_metrics`).
* ``genes.<GENE>.pooled`` keeps descriptive figures of the pooled out-of-fold predictions
  (one value per expression sample); it has no p-values: folds' models have their own
  offsets and scales, so a pooled correlation is not a test of any one model.

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

from histcode.siteconfounding import site_confounding


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


def gene_rank_loss(pred: np.ndarray, true: np.ndarray) -> float | None:
    """One minus the mean over genes of the Spearman correlation of predicted and true log2
    fold changes across slides (0: every gene ranked perfectly, 1: no better than chance); the
    validation metric ``val/genes_rank`` (``cv.genes_metric rank``).

    A gene head that fits noise makes predictions that swing wider and wider: its squared
    error rises and, summed with the other genes', pulls the chosen epoch early, while its
    rank correlation stays near 0 at any amplitude. Ranking is also what the gene figures
    report (held-out Spearman and Pearson per gene).

    Args:
        pred: (S, G) predicted log2 fold changes.
        true: (S, G) targets, NaN where a slide has none (normal slides).

    Returns:
        The loss, or None when no gene has 3 slides with targets and varying predictions
        and targets (a gene without them is left out of the mean).
    """
    return rank_loss(gene_spearman(pred, true))


def rank_loss(rhos: np.ndarray) -> float | None:
    """One minus the mean of the genes' correlations ``rhos`` (G,), NaN left out; None when
    none is finite."""
    rhos = np.asarray(rhos, dtype=np.float64)
    rhos = rhos[np.isfinite(rhos)]
    return 1.0 - float(np.mean(rhos)) if len(rhos) else None


def gene_spearman(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Each gene's Spearman correlation of predicted and true log2 fold changes across slides.

    Args:
        pred: (S, G) predicted log2 fold changes.
        true: (S, G) targets, NaN where a slide has none.

    Returns:
        (G,) correlations, NaN for a gene with fewer than 3 slides with targets or constant
        predictions or targets.
    """
    from scipy.stats import spearmanr

    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    out = np.full(true.shape[1], np.nan)
    for g in range(true.shape[1]):
        known = np.isfinite(true[:, g]) & np.isfinite(pred[:, g])
        x, y = pred[known, g], true[known, g]
        if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            out[g] = float(spearmanr(x, y).statistic)
    return out


MIN_PATIENTS = 3
"""Fewest patients in a fold for its correlation test to count (a p-value needs 3 pairs)."""


def bh_fdr(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) over **every** entry of ``pvalues``.

    An undefined (NaN) p-value counts as 1: it was tested and showed nothing, so it still
    counts among the hypotheses (dropping it would make the correction milder than it is).

    Args:
        pvalues: (m,) p-values, NaN where undefined.

    Returns:
        (m,) q-values, each in [0, 1].
    """
    from scipy.stats import false_discovery_control

    p = np.asarray(pvalues, dtype=np.float64)
    if not len(p):
        return p.copy()
    return false_discovery_control(np.where(np.isfinite(p), p, 1.0), method="bh")


def combine_folds(
    pvalues: Sequence[float], patients: Sequence[int], folds: int | None = None
) -> dict[str, float]:
    """Stouffer's combination of one-sided per-fold p-values, weighted by √patients, with the
    folds' z-scores correlated as cross-validation makes them.

    Plain Stouffer (``scipy.stats.combine_pvalues``) assumes independent folds. Out-of-fold
    tests are not: each fold's model learnt its direction from the other folds' targets, so
    under the null two folds' z-scores are positively correlated (the sign a noise gene's
    chance correlation gives one fold's model is the sign the next fold's test rewards).
    Simulated k-fold CV of a model on noise targets (``tests/finetune/test_finetune_metrics
    .py``): correlation ≈ 0.3-0.4 at 3 folds, ≈ 0.2 at 5; plain Stouffer then calls 10-12 %
    of noise genes significant at 0.05 and 3 % at 0.01. The combination here takes the
    correlation between two folds to be ``1 / folds`` (the share of the cohort each fold
    tests; the training-set overlap correction of Nadeau & Bengio, Mach Learn 2003), so the
    combined z is ``Σ wᵢzᵢ / √(Σ wᵢ² + ρ Σ_{i≠j} wᵢwⱼ)``: 3-5 % at 0.05 and ≤ 1 % at 0.01 in
    the same simulations. Folds whose p-value is NaN (fewer than :data:`MIN_PATIENTS`
    patients, a constant prediction or truth) are skipped: they hold no evidence either way.
    With no usable fold the combined p-value is 1. p-values of exactly 0 or 1 (r = ±1) are
    moved to the nearest representable value inside (0, 1) so that their z-scores stay
    finite.

    Args:
        pvalues: (folds,) one-sided p-values of the folds.
        patients: (folds,) patients in each fold's test.
        folds: the number of cross-validation folds the models came from (ρ = 1 / folds);
            None: ``len(pvalues)``. ``1`` or less: independent folds (plain Stouffer).

    Returns:
        ``{"z", "p", "folds_used", "rho"}``: the combined z (NaN with no usable fold), its
        one-sided p-value, the number of folds combined and the correlation assumed.
    """
    from scipy.stats import norm

    p = np.asarray(pvalues, dtype=np.float64)
    n = np.asarray(patients, dtype=np.float64)
    k = len(p) if folds is None else int(folds)
    rho = 1.0 / k if k > 1 else 0.0
    ok = np.isfinite(p) & (n >= MIN_PATIENTS)
    if not ok.any():
        return {"z": math.nan, "p": 1.0, "folds_used": 0, "rho": rho}
    tiny = np.finfo(np.float64).tiny
    z = norm.isf(np.clip(p[ok], tiny, np.nextafter(1.0, 0.0)))
    w = np.sqrt(n[ok])
    combined = float(w @ z / np.sqrt(w @ w + rho * (w.sum() ** 2 - w @ w)))
    return {"z": combined, "p": float(norm.sf(combined)), "folds_used": int(ok.sum()), "rho": rho}


def patient_level(frame: pd.DataFrame, gene: str) -> pd.DataFrame:
    """Rows of ``frame`` with a target of ``gene``, averaged per ``patient_id``.

    Args:
        frame: ``predictions.csv`` rows (one fold's, for the per-fold tests).
        gene: the gene.

    Returns:
        One row per patient (index ``patient_id``): the means of ``<GENE>_log2fc_pred``,
        ``<GENE>_log2fc_true`` and ``<GENE>_up_prob`` over the patient's slides.

    Raises:
        ValueError: ``frame`` has no ``patient_id`` column.
    """
    if "patient_id" not in frame:
        raise ValueError(
            "predictions have no patient_id column; the per-patient tests need it. Write "
            "predictions.csv with slide_id, patient_id, fold, … as histcode finetune writes it"
        )
    cols = [f"{gene}_log2fc_pred", f"{gene}_log2fc_true", f"{gene}_up_prob"]
    sub = frame[np.isfinite(frame[f"{gene}_log2fc_true"].to_numpy(np.float64))]
    return sub.groupby("patient_id", sort=True)[cols].mean()


def gene_fold_metrics(frame: pd.DataFrame, gene: str) -> dict[str, float]:
    """Metrics of one gene on one test fold's rows ``frame``.

    AUC (up vs rest) is over the slides with a target; Pearson and Spearman correlations and
    their one-sided (positive) p-values are over patients (:func:`patient_level`).

    Returns:
        ``auc_up``, ``pearson_r``, ``pearson_p``, ``spearman_r``, ``spearman_p`` (NaN when
        undefined), ``n`` (slides with a target), ``n_up`` and ``patients``.
    """
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
    per_patient = patient_level(frame, gene)
    corr = correlation(
        per_patient[f"{gene}_log2fc_pred"].to_numpy(),
        per_patient[f"{gene}_log2fc_true"].to_numpy(),
    )
    return {
        "auc_up": auc,
        "pearson_r": corr["pearson_r"],
        "pearson_p": corr["pearson_p"],
        "spearman_r": corr["spearman_r"],
        "spearman_p": corr["spearman_p"],
        "n": int(keep.sum()),
        "n_up": int(up.sum()),
        "patients": corr["n"],
    }


def fold_combined_test(per_fold: Sequence[dict[str, float]]) -> dict[str, Any]:
    """The significance test of one gene from its per-fold metrics (:func:`gene_fold_metrics`).

    The hypothesis is directional — a model's predicted log2FC rises with the true log2FC —
    so each fold gets a one-sided test (``alternative="greater"``): a fold whose correlation
    is negative is evidence *against*, not for. Stouffer's method keeps that sign (a fold's
    z is negative when its r is), unlike Fisher's, which can only add evidence; weighting
    each fold by √patients makes the combination close to one test over all patients with
    every fold's model keeping its own offset and scale. Testing per fold is what makes the
    test honest: pooled out-of-fold predictions mix models with different offsets, which
    alone can produce a pooled correlation no fold shows. The folds' tests are not
    independent, though (each model learnt from the other folds' targets), and the
    combination allows for it (:func:`combine_folds`, correlation ``1 / folds``).

    Returns:
        ``patients`` (per fold), ``folds_used``, ``fold_correlation`` (the correlation of
        the folds' z-scores assumed), and for ``pearson`` and ``spearman``:
        ``<stat>_p_folds`` (per fold), ``<stat>_z`` and ``<stat>_p`` (combined).
    """
    patients = [int(f["patients"]) for f in per_fold]
    out: dict[str, Any] = {"patients": patients}
    for stat in ("pearson", "spearman"):
        ps = [f[f"{stat}_p"] for f in per_fold]
        combined = combine_folds(ps, patients)
        out[f"{stat}_p_folds"] = ps
        out[f"{stat}_z"] = combined["z"]
        out[f"{stat}_p"] = combined["p"]
        if stat == "pearson":
            out["folds_used"] = combined["folds_used"]
            out["fold_correlation"] = combined["rho"]
    return out


def sample_level(frame: pd.DataFrame, gene: str) -> pd.DataFrame:
    """Rows with a target of ``gene``, averaged per ``sample_id`` (slides sharing a target)."""
    cols = [f"{gene}_log2fc_pred", f"{gene}_log2fc_true", f"{gene}_up_prob"]
    sub = frame[np.isfinite(frame[f"{gene}_log2fc_true"].to_numpy(np.float64))]
    key = "sample_id" if "sample_id" in sub else "slide_id"
    grouped = sub.groupby(key, sort=True)
    out = grouped[cols].mean()
    out[f"{gene}_class_true"] = grouped[f"{gene}_class_true"].first()
    return out


def significance_label(genes: int) -> str:
    """Short name of the significance test, for tables (``metrics.json`` ``fdr.label``)."""
    return (
        "per-fold one-sided Pearson on patient means, Stouffer-combined (weights √patients, "
        "folds correlated 1/k), "
        f"BH over all {genes} genes"
    )


def gene_auc_summary(gene_out: dict[str, dict[str, Any]], folds: int) -> dict[str, Any]:
    """Mean AUC (up vs rest) over the genes whose AUC is defined in every test fold.

    A gene whose "up" class is missing from some test folds has an AUC resting on fewer
    folds (and fewer patients); averaging it with genes defined in all folds would mix
    estimates of different precision, so it is left out and listed with its fold count.

    Args:
        gene_out: per gene, its ``metrics.json`` entry (with ``auc_up`` from :func:`summarise`).
        folds: the number of test folds.

    Returns:
        ``{"mean", "sd", "genes", "left_out", "folds", "rule"}``: mean and sd over the genes
        kept, the genes kept, ``left_out`` as ``{gene: folds its AUC is defined in}``.
    """
    kept = [g for g, m in gene_out.items() if folds and m["auc_up"]["n"] == folds]
    values = [gene_out[g]["auc_up"]["mean"] for g in kept]
    return {
        "mean": float(np.mean(values)) if values else math.nan,
        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
        "genes": kept,
        "left_out": {g: m["auc_up"]["n"] for g, m in gene_out.items() if g not in kept},
        "folds": folds,
        "rule": "mean over genes whose AUC (up vs rest) is defined in every test fold; "
        "left_out: the others, with the number of folds their AUC is defined in",
    }


def prediction_sites(predictions: pd.DataFrame) -> pd.Series | None:
    """The tissue source site of each row of ``predictions``.

    The ``site`` column where it is filled in; else, when every ``slide_id`` is a TCGA
    barcode, characters 6–7 of it; else ``None`` (no site known).
    """
    from histcode.barcodes import is_tcga, parse_barcode

    if "slide_id" not in predictions or not len(predictions):
        return None
    if "site" in predictions:
        site = predictions["site"].fillna("").astype(str).str.strip()
        if (site != "").all():
            return site
    ids = predictions["slide_id"].astype(str)
    if all(is_tcga(s) for s in ids):
        return pd.Series([parse_barcode(s).site for s in ids], index=predictions.index)
    return None


WITHIN_SITE_RULE = (
    "stratified AUC: per site with tumour and normal slides, the ROC AUC of tumour_prob over "
    "its slides; summary = mean of the site AUCs weighted by tumour x normal slide pairs, "
    "which is the share of within-site tumour-normal pairs ranked correctly (ties count "
    "half); sites with one class are listed, not used"
)


def within_site_auc(predictions: pd.DataFrame) -> dict[str, Any]:
    """Tumour AUC within tissue source sites, on out-of-fold predictions.

    For each site that has both tumour and normal slides among ``predictions``, the ROC AUC
    (``sklearn.metrics.roc_auc_score``) of ``tumour_prob`` over that site's slides. The
    summary ``auc`` is a *stratified* AUC: the mean of the site AUCs weighted by each site's
    number of tumour × normal pairs, i.e. the probability that a tumour slide scores above
    a normal slide **of the same site** (concordant pairs counted within sites only, as a
    stratified concordance index counts them). Why pairs rather than slides: a site's AUC
    rests on its pairs, so a site of 40 tumours and 1 normal (40 pairs) says less than one
    of 10 and 10 (100 pairs), while a slide-weighted mean would trust it twice as much; and
    the pooled-pairs reading is the question of the overall AUC, asked only of the pairs a
    site signature cannot separate. The unweighted mean over sites is reported next to it.

    A site shortcut shows as an overall AUC near 1 with a within-site AUC near 0.5.

    Which models the predictions come from: out-of-fold predictions of one site come from
    the fold model(s) that held its slides out. With patient-grouped folds a site's patients
    are spread over folds, so a site's AUC compares predictions of possibly *different* fold
    models, each with its own offset (``per_site[site]["folds"]`` lists them); with
    ``--cv.group site`` every site is in one test fold, so its predictions all come from one
    model, which never saw the site.

    Args:
        predictions: out-of-fold predictions with ``slide_id``, ``fold``, ``tumour_true``,
            ``tumour_prob`` and a ``site`` column (or TCGA slide ids, whose characters 6–7
            are the site; :func:`prediction_sites`).

    Returns:
        ``{"auc", "unweighted_mean", "sites", "slides", "pairs", "per_site", "one_class_sites",
        "rule"}``: ``auc`` the stratified AUC (NaN without a site with both classes),
        ``sites`` the number of sites with both classes, ``slides`` and ``pairs`` theirs;
        ``per_site`` maps each such site to ``{"auc", "tumour", "normal", "folds"}``;
        ``one_class_sites`` maps the other sites to their tumour and normal counts. Without
        site information: ``{"auc": NaN, "sites": 0, "available": False, "reason": …}``.
    """
    from sklearn.metrics import roc_auc_score

    sites = prediction_sites(predictions)
    if sites is None:
        return {
            "auc": math.nan,
            "sites": 0,
            "available": False,
            "reason": "no site known: slide ids are not TCGA barcodes and the labels CSV has "
            "no 'site' column",
            "rule": WITHIN_SITE_RULE,
        }
    y = predictions["tumour_true"].to_numpy(np.float64)
    p = predictions["tumour_prob"].to_numpy(np.float64)
    keep = np.isfinite(y) & np.isfinite(p)
    frame = pd.DataFrame(
        {
            "site": sites.to_numpy()[keep],
            "fold": predictions["fold"].to_numpy()[keep],
            "y": y[keep],
            "p": p[keep],
        }
    )
    per_site: dict[str, dict[str, Any]] = {}
    one_class: dict[str, dict[str, int]] = {}
    for site, part in frame.groupby("site", sort=True):
        n_t, n_n = int((part["y"] == 1).sum()), int((part["y"] == 0).sum())
        if n_t and n_n:
            per_site[str(site)] = {
                "auc": float(roc_auc_score(part["y"].astype(int), part["p"])),
                "tumour": n_t,
                "normal": n_n,
                "folds": sorted(int(k) for k in part["fold"].unique()),
            }
        else:
            one_class[str(site)] = {"tumour": n_t, "normal": n_n}
    pairs = np.array([v["tumour"] * v["normal"] for v in per_site.values()], dtype=np.float64)
    aucs = np.array([v["auc"] for v in per_site.values()], dtype=np.float64)
    return {
        "auc": float((aucs * pairs).sum() / pairs.sum()) if len(aucs) else math.nan,
        "unweighted_mean": float(aucs.mean()) if len(aucs) else math.nan,
        "sites": len(per_site),
        "slides": int(sum(v["tumour"] + v["normal"] for v in per_site.values())),
        "pairs": int(pairs.sum()),
        "per_site": per_site,
        "one_class_sites": one_class,
        "rule": WITHIN_SITE_RULE,
    }


def _fold_class_metrics(frame: pd.DataFrame, task: str, classes: Sequence[str]) -> dict[str, Any]:
    """Per-class one-vs-rest AUC, macro AUC and accuracy of one fold's slides with a class."""
    from sklearn.metrics import roc_auc_score

    true = frame[f"{task}_true"].fillna("").astype(str)
    frame, true = frame[true != ""], true[true != ""]
    probs = frame[[f"{task}_prob_{c}" for c in classes]].to_numpy(np.float64)
    per_class = {}
    for c, name in enumerate(classes):
        y = (true == name).to_numpy()
        per_class[name] = float(roc_auc_score(y, probs[:, c])) if 0 < y.sum() < len(y) else math.nan
    defined = [v for v in per_class.values() if math.isfinite(v)]
    predicted = np.asarray(classes, dtype=object)[probs.argmax(1)] if len(probs) else []
    return {
        "per_class": per_class,
        "macro_auc": float(np.mean(defined)) if defined else math.nan,
        "accuracy": float(np.mean(predicted == true.to_numpy())) if len(true) else math.nan,
        "slides": len(true),
    }


def categorical_metrics(
    predictions: pd.DataFrame, task: str, classes: Sequence[str]
) -> dict[str, Any]:
    """Metrics of a categorical task (``metrics.json`` ``categories.<task>``).

    Args:
        predictions: out-of-fold predictions with ``<task>_prob_<class>`` and ``<task>_true``.
        task: the task (a labels-CSV column).
        classes: its class names.

    Returns:
        ``{"classes", "macro_auc", "accuracy", "auc": {class: …}}`` (each :func:`summarise`
        over folds; a class absent from a fold's test slides, or the only one there, has no
        AUC in that fold), ``"slides"`` with a class, ``"pooled"`` (the same figures on all
        out-of-fold predictions together, descriptive).
    """
    folds = sorted(predictions["fold"].unique().tolist()) if len(predictions) else []
    per = [_fold_class_metrics(predictions[predictions["fold"] == k], task, classes) for k in folds]
    pooled = _fold_class_metrics(predictions, task, classes) if len(predictions) else {}
    return {
        "classes": list(classes),
        "macro_auc": summarise([p["macro_auc"] for p in per]),
        "accuracy": summarise([p["accuracy"] for p in per]),
        "auc": {c: summarise([p["per_class"][c] for p in per]) for c in classes},
        "slides": int(sum(p["slides"] for p in per)),
        "pooled": pooled,
        "method": "per test fold: one-vs-rest ROC AUC of each class over the slides with a "
        "class; macro AUC = mean over the classes with a defined AUC; accuracy of the most "
        "probable class",
    }


def compute_metrics(
    predictions: pd.DataFrame,
    genes: Sequence[str],
    tumour: bool,
    alpha: float = 0.05,
    group: str | None = None,
    categories: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """All metrics of a cross-validation run (the content of ``metrics.json``).

    Args:
        predictions: out-of-fold predictions (``predictions.csv`` columns).
        genes: the genes.
        tumour: whether the tumour task was trained.
        alpha: FDR level for significant genes.
        group: what the folds were grouped by (``patient`` or ``site``), recorded as
            ``cv_group``; ``None`` leaves it out.
        categories: categorical task → class names; each gives ``categories.<task>``
            (:func:`categorical_metrics`).

    Returns:
        ``{"folds", "slides", "patients", ["cv_group"], "tumour": {metric: {mean, sd, n,
        folds}, "pooled": {...}, "within_site_auc": {...}}, "genes": {gene: {...}}, "fdr":
        {...}, "significant_genes": [...],
        "gene_auc_up": {...}, "mean_gene_auc_up"}``. Per gene: ``auc_up``, ``pearson_r``,
        ``spearman_r`` (:func:`summarise` over folds), ``test`` (:func:`fold_combined_test`
        plus ``pearson_q`` and ``spearman_q``), ``significant``, ``in_mean_gene_auc`` and
        ``pooled`` (descriptive: r and AUC of pooled predictions, no p-values).
    """
    from sklearn.metrics import roc_auc_score

    folds = sorted(predictions["fold"].unique().tolist()) if len(predictions) else []
    out: dict[str, Any] = {
        "folds": len(folds),
        "slides": len(predictions),
        "patients": int(predictions["patient_id"].nunique()) if len(predictions) else 0,
    }
    if group is not None:
        out["cv_group"] = group
    by_fold = {k: predictions[predictions["fold"] == k] for k in folds}
    if tumour:
        per = [binary_metrics(f["tumour_true"], f["tumour_prob"]) for f in by_fold.values()]
        out["tumour"] = {m: summarise([p[m] for p in per]) for m in ("auc", "accuracy", "f1")}
        out["tumour"]["pooled"] = binary_metrics(
            predictions["tumour_true"], predictions["tumour_prob"]
        )
        out["tumour"]["within_site_auc"] = within_site_auc(predictions)
        sites = prediction_sites(predictions)
        if sites is not None:
            out["tumour"]["site_confounding"] = site_confounding(
                sites.tolist(), predictions["tumour_true"].to_numpy(np.float64)
            )
    if categories:
        out["categories"] = {
            task: categorical_metrics(predictions, task, classes)
            for task, classes in categories.items()
        }
    gene_out: dict[str, Any] = {}
    for gene in genes:
        per = [gene_fold_metrics(f, gene) for f in by_fold.values()]
        entry: dict[str, Any] = {
            m: summarise([p[m] for p in per]) for m in ("auc_up", "pearson_r", "spearman_r")
        }
        entry["test"] = fold_combined_test(per)
        samples = sample_level(predictions, gene)
        corr = correlation(
            samples[f"{gene}_log2fc_pred"].to_numpy(), samples[f"{gene}_log2fc_true"].to_numpy()
        )
        up = (samples[f"{gene}_class_true"] == "up").to_numpy()
        entry["pooled"] = {
            "pearson_r": corr["pearson_r"],
            "spearman_r": corr["spearman_r"],
            "n": corr["n"],
            "auc_up": (
                float(roc_auc_score(up, samples[f"{gene}_up_prob"].to_numpy()))
                if 0 < up.sum() < len(up)
                else math.nan
            ),
            "n_up": int(up.sum()),
        }
        gene_out[gene] = entry
    for stat in ("pearson", "spearman"):
        q = bh_fdr([gene_out[g]["test"][f"{stat}_p"] for g in genes])
        for g, value in zip(genes, q, strict=True):
            gene_out[g]["test"][f"{stat}_q"] = float(value)
    significant = []
    for g in genes:
        q = gene_out[g]["test"]["pearson_q"]
        gene_out[g]["significant"] = bool(q < alpha)
        if gene_out[g]["significant"]:
            significant.append(g)
    if genes:
        auc = gene_auc_summary(gene_out, len(folds))
        for g in genes:
            gene_out[g]["in_mean_gene_auc"] = g in auc["genes"]
        out["genes"] = gene_out
        out["fdr"] = {
            "method": "benjamini-hochberg",
            "alpha": alpha,
            "genes_tested": len(genes),
            "label": significance_label(len(genes)),
            "test": "per test fold, one-sided (positive) Pearson correlation of predicted vs "
            "true log2FC over patients (a patient's slides averaged); folds combined by "
            "Stouffer's method weighted by sqrt(patients) with the folds' z-scores taken as "
            "correlated 1/k (k folds: each fold's model learnt from the others' targets), "
            "folds with fewer than "
            f"{MIN_PATIENTS} patients or a constant value skipped, p = 1 with no usable "
            "fold; Benjamini-Hochberg q-values over all genes tested",
        }
        out["significant_genes"] = sorted(
            significant, key=lambda g: gene_out[g]["test"]["pearson_q"]
        )
        out["gene_auc_up"] = auc
        out["mean_gene_auc_up"] = auc["mean"]
    return out


__all__ = [
    "MIN_PATIENTS",
    "bh_fdr",
    "binary_metrics",
    "categorical_metrics",
    "combine_folds",
    "compute_metrics",
    "correlation",
    "fold_combined_test",
    "gene_auc_summary",
    "gene_fold_metrics",
    "gene_rank_loss",
    "gene_spearman",
    "jsonable",
    "patient_level",
    "prediction_sites",
    "rank_loss",
    "sample_level",
    "significance_label",
    "summarise",
    "within_site_auc",
]
