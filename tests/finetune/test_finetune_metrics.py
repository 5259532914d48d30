"""Metrics against hand-computed references."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from histcode.finetune.metrics import (
    bh_fdr,
    binary_metrics,
    combine_folds,
    compute_metrics,
    correlation,
    jsonable,
    summarise,
    within_site_auc,
)


def test_bh_by_hand_counts_undefined_as_one() -> None:
    p = [0.01, 0.04, 0.03, 0.20, float("nan")]
    # NaN counts as 1 and m = 5: sorted 0.01, 0.03, 0.04, 0.20, 1 → p·m/rank = 0.05, 0.075,
    # 0.0667, 0.25, 1 → monotone from the top
    expected = [0.05, 0.0666667, 0.0666667, 0.25, 1.0]
    np.testing.assert_allclose(bh_fdr(p), expected, rtol=1e-5)
    # one small p among undefined genes is not significant once they count
    q = bh_fdr([0.01, *[float("nan")] * 9])
    np.testing.assert_allclose(q, [0.1, *[1.0] * 9])


def test_summarise_and_json() -> None:
    s = summarise([0.8, 1.0, float("nan")])
    assert s["mean"] == 0.9 and math.isclose(s["sd"], math.sqrt(0.02)) and s["n"] == 2
    assert jsonable({"a": float("nan"), "b": np.float32(1.5), "c": [np.int64(2)]}) == {
        "a": None,
        "b": 1.5,
        "c": [2],
    }


def test_binary_metrics() -> None:
    m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]))
    assert m["auc"] == 1.0 and m["accuracy"] == 0.75 and math.isclose(m["f1"], 0.8)
    assert math.isnan(binary_metrics(np.array([1, 1]), np.array([0.2, 0.9]))["auc"])


def test_correlation_one_sided() -> None:
    x = np.arange(10.0)
    up, down = correlation(x, x + np.sin(x)), correlation(x, -x)
    assert up["pearson_r"] > 0.9 and up["pearson_p"] < 1e-3
    assert down["pearson_r"] < -0.99 and down["pearson_p"] > 0.99  # wrong sign: not significant
    assert math.isnan(correlation(np.ones(5), x[:5])["pearson_r"])


def test_compute_metrics_samples_count_once() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for fold in range(3):
        for i in range(12):
            true = rng.normal()
            for copy in range(2):  # two slides of one sample share the target
                rows.append(
                    {
                        "slide_id": f"s{fold}-{i}-{copy}",
                        "patient_id": f"p{fold}-{i}",
                        "sample_id": f"x{fold}-{i}",
                        "fold": fold,
                        "tumour_prob": rng.random(),
                        "tumour_true": float(i % 2),
                        "G_log2fc_pred": true + rng.normal(0, 0.1),
                        "G_log2fc_true": true,
                        "G_up_prob": float(true > 1),
                        "G_class_true": "up" if true >= 1 else "unchanged",
                    }
                )
    metrics = compute_metrics(pd.DataFrame(rows), ["G"], tumour=True)
    assert metrics["folds"] == 3 and metrics["slides"] == 72
    assert metrics["genes"]["G"]["pooled"]["n"] == 36  # samples, not slides
    assert metrics["significant_genes"] == ["G"]
    assert len(metrics["tumour"]["auc"]["folds"]) == 3


def _gene_rows(
    fold: int, patient: str, true: float, pred: float, slides: int = 1, gene: str = "G"
) -> list[dict]:
    """``slides`` rows of one patient (each its own expression sample) with one gene."""
    return [
        {
            "slide_id": f"{patient}-{k}",
            "patient_id": patient,
            "sample_id": f"{patient}-{k}",
            "fold": fold,
            f"{gene}_log2fc_pred": pred,
            f"{gene}_log2fc_true": true,
            f"{gene}_up_prob": 0.5,
            f"{gene}_class_true": "up" if true >= 1 else "unchanged",
        }
        for k in range(slides)
    ]


def test_fold_offsets_alone_are_not_significant() -> None:
    """Every fold's model has its own offset, no fold ranks its patients: the pooled
    correlation is large and "significant", the per-fold combined test is not."""
    from scipy.stats import pearsonr

    rng = np.random.default_rng(1)
    rows = []
    for fold in range(4):
        true, pred = 3.0 * fold + rng.normal(0, 1, 10), 3.0 * fold + rng.normal(0, 1, 10)
        for i in range(10):
            rows += _gene_rows(fold, f"p{fold}-{i}", float(true[i]), float(pred[i]))
    frame = pd.DataFrame(rows)
    pooled = pearsonr(frame["G_log2fc_pred"], frame["G_log2fc_true"], alternative="greater")
    assert pooled.statistic > 0.8 and pooled.pvalue < 1e-10  # what the pooled test saw

    metrics = compute_metrics(frame, ["G"], tumour=False)
    gene = metrics["genes"]["G"]
    assert metrics["significant_genes"] == [] and not gene["significant"]
    assert gene["test"]["pearson_p"] > 0.05 and gene["test"]["folds_used"] == 4
    assert gene["test"]["patients"] == [10, 10, 10, 10]
    # per-fold r next to the test, equal to the per-fold one-sided Pearson on patients
    for fold, r, p in zip(
        range(4), gene["pearson_r"]["folds"], gene["test"]["pearson_p_folds"], strict=True
    ):
        part = frame[frame["fold"] == fold]
        ref = pearsonr(part["G_log2fc_pred"], part["G_log2fc_true"], alternative="greater")
        assert math.isclose(r, ref.statistic) and math.isclose(p, ref.pvalue)
    assert abs(gene["pearson_r"]["mean"]) < 0.3 and gene["pearson_r"]["sd"] > 0

    # positive control: the same offsets with signal within every fold is significant
    rows = []
    for fold in range(4):
        true = 3.0 * fold + rng.normal(0, 1, 10)
        for i in range(10):
            rows += _gene_rows(fold, f"p{fold}-{i}", float(true[i]), true[i] + rng.normal(0, 0.5))
    assert compute_metrics(pd.DataFrame(rows), ["G"], tumour=False)["significant_genes"] == ["G"]


def test_one_patient_with_many_samples_counts_once() -> None:
    """One patient's 30 samples track their own truth; patients do not. The patient is one
    value, so nothing is significant and the test says how many patients it rests on."""
    rng = np.random.default_rng(0)
    rows = []
    for fold in range(3):
        true, pred = rng.normal(0, 1, 6), rng.normal(0, 1, 6)
        for i in range(6):
            rows += _gene_rows(fold, f"p{fold}-{i}", float(true[i]), float(pred[i]))
    many = np.linspace(-3, 3, 30)
    for k, t in enumerate(many):  # within-patient variation, predicted well
        rows += _gene_rows(0, "big", float(t), float(t + rng.normal(0, 0.2)))
        rows[-1]["slide_id"] = rows[-1]["sample_id"] = f"big-{k}"
    frame = pd.DataFrame(rows)
    metrics = compute_metrics(frame, ["G"], tumour=False)
    gene = metrics["genes"]["G"]
    assert gene["pooled"]["n"] == 48  # samples, as pooled figures count them
    assert not gene["significant"] and metrics["significant_genes"] == []
    assert gene["test"]["patients"] == [7, 6, 6]  # the big patient counts once
    # the fold with the big patient is tested on the patients' mean values
    part = frame[frame["fold"] == 0].groupby("patient_id")[["G_log2fc_pred", "G_log2fc_true"]]
    means = part.mean()
    r = np.corrcoef(means["G_log2fc_pred"], means["G_log2fc_true"])[0, 1]
    assert math.isclose(gene["pearson_r"]["folds"][0], r)


def test_undefined_gene_counts_as_one_in_bh() -> None:
    """Genes without a usable fold (constant predictions, or < 3 patients per fold) get p = 1
    and count in BH over all genes: one modest gene alone is significant, among them not."""
    rng = np.random.default_rng(13)
    genes = ["A", "B", "C", "D", "E"]
    rows = []
    for fold in range(3):
        for i in range(6):
            row: dict = {"slide_id": f"p{fold}-{i}", "patient_id": f"p{fold}-{i}", "fold": fold}
            true = rng.normal(0, 1)
            for g in genes:
                row[f"{g}_log2fc_true"] = true
                row[f"{g}_log2fc_pred"] = 0.0 if g != "A" else true + rng.normal(0, 1.0)
                row[f"{g}_up_prob"] = 0.5
                row[f"{g}_class_true"] = "unchanged"
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame.loc[frame["fold"] > 0, "E_log2fc_true"] = np.nan  # E: 6 patients in one fold only
    frame.loc[frame["patient_id"].isin(["p0-0", "p0-1", "p0-2", "p0-3"]), "E_log2fc_true"] = np.nan
    alone = compute_metrics(frame, ["A"], tumour=False)
    assert alone["significant_genes"] == ["A"]
    metrics = compute_metrics(frame, genes, tumour=False)
    assert metrics["significant_genes"] == []

    p_a = alone["genes"]["A"]["test"]["pearson_p"]
    assert 0.01 < p_a < 0.05
    for g in ("B", "C", "D", "E"):
        test = metrics["genes"][g]["test"]
        assert test["folds_used"] == 0 and test["pearson_p"] == 1.0 and test["pearson_q"] == 1.0
    assert metrics["genes"]["E"]["test"]["patients"] == [2, 0, 0]
    assert math.isclose(metrics["genes"]["A"]["test"]["pearson_q"], 5 * p_a)
    assert metrics["fdr"]["genes_tested"] == 5 and "all 5 genes" in metrics["fdr"]["label"]


def test_combine_folds_stouffer_weighted_one_sided_and_correlated() -> None:
    from scipy.stats import combine_pvalues, norm

    # independent folds (folds=1): scipy's weighted Stouffer
    out = combine_folds([0.01, 0.2, float("nan"), 0.03], [9, 16, 2, 4], folds=1)
    ref = combine_pvalues([0.01, 0.2, 0.03], method="stouffer", weights=[3.0, 4.0, 2.0])
    assert out["folds_used"] == 3 and math.isclose(out["p"], ref.pvalue) and out["rho"] == 0
    # 4 folds: their z-scores correlated 1/4, the combined z smaller by the variance it adds
    out = combine_folds([0.01, 0.2, float("nan"), 0.03], [9, 16, 2, 4])
    w, z = np.array([3.0, 4.0, 2.0]), norm.isf([0.01, 0.2, 0.03])
    expected = w @ z / np.sqrt(w @ w + 0.25 * (w.sum() ** 2 - w @ w))
    assert out["rho"] == 0.25 and math.isclose(out["z"], expected) and out["p"] > ref.pvalue
    none = combine_folds([float("nan"), 0.001], [5, 2])  # fold 2 has too few patients
    assert none["p"] == 1.0 and none["folds_used"] == 0 and math.isnan(none["z"])
    # a fold against the hypothesis pulls the combination down (Fisher would ignore it)
    assert combine_folds([0.01, 0.999], [10, 10])["p"] > 0.3
    assert math.isfinite(combine_folds([0.0, 0.5], [5, 5])["z"])  # r = 1 in a fold


def test_combined_test_holds_its_level_on_noise_targets_under_cross_validation() -> None:
    """Noise targets, a ridge model per fold trained on the other folds: each fold's
    one-sided p-value is uniform, but the folds' tests are positively correlated (the
    direction one fold's model learnt from the others' noise is what the next fold's test
    rewards). Plain Stouffer then calls ~10 % significant at 0.05; the combination with the
    folds correlated 1/k stays at the level."""
    from scipy.stats import pearsonr
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(0)
    plain, corrected = [], []
    for _ in range(600):
        x, y = rng.normal(size=(30, 3)), rng.normal(size=30)
        ps, ns = [], []
        for train, test in KFold(3, shuffle=True, random_state=int(rng.integers(1 << 30))).split(x):
            pred = Ridge(alpha=1.0).fit(x[train], y[train]).predict(x[test])
            ps.append(pearsonr(pred, y[test], alternative="greater").pvalue)
            ns.append(len(test))
        plain.append(combine_folds(ps, ns, folds=1)["p"])
        corrected.append(combine_folds(ps, ns)["p"])
    assert np.mean(np.array(plain) < 0.05) > 0.08  # what the correction is for
    assert np.mean(np.array(corrected) < 0.05) <= 0.06
    assert np.mean(np.array(corrected) < 0.01) <= 0.015


def test_mean_gene_auc_leaves_out_genes_missing_folds() -> None:
    """U's "up" class exists in one of five folds: its AUC rests on that fold, is reported
    with its fold count and is left out of the mean gene AUC."""
    rows = []
    for fold in range(5):
        for i in range(6):
            row: dict = {"slide_id": f"p{fold}-{i}", "patient_id": f"p{fold}-{i}", "fold": fold}
            for g in ("D", "U"):
                is_up = i < 2 if g == "D" or fold == 0 else False
                row[f"{g}_log2fc_true"] = 2.0 if is_up else 0.1 * i
                row[f"{g}_log2fc_pred"] = 0.1 * i
                row[f"{g}_class_true"] = "up" if is_up else "unchanged"
                # D ranks its up slides perfectly; U does not (AUC 0 in its one fold)
                row[f"{g}_up_prob"] = (0.9 if is_up else 0.1) if g == "D" else 0.1 * i
            rows.append(row)
    metrics = compute_metrics(pd.DataFrame(rows), ["D", "U"], tumour=False)
    assert metrics["genes"]["U"]["auc_up"]["n"] == 1 and metrics["genes"]["D"]["auc_up"]["n"] == 5
    assert metrics["genes"]["U"]["auc_up"]["mean"] == 0.0
    assert metrics["mean_gene_auc_up"] == 1.0  # D only (the old mean over both was 0.5)
    summary = metrics["gene_auc_up"]
    assert summary["genes"] == ["D"] and summary["left_out"] == {"U": 1}
    assert summary["folds"] == 5
    assert not metrics["genes"]["U"]["in_mean_gene_auc"]
    assert metrics["genes"]["D"]["in_mean_gene_auc"]


def _site_table(rows: list[tuple[str, int, float]], fold_of=lambda i: i % 3) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["site", "tumour_true", "tumour_prob"])
    frame["slide_id"] = [f"s{i}" for i in range(len(frame))]
    frame["patient_id"] = frame["slide_id"]
    frame["fold"] = [fold_of(i) for i in range(len(frame))]
    return frame


def test_within_site_auc_exposes_a_site_shortcut() -> None:
    """Tumours from sites A and B, normals from C plus some from A. A model that learned
    "site C = normal" ranks C's normals below every tumour (overall AUC ≈ 1), but within A
    its scores are random: within-site AUC ≈ 0.5."""
    rng = np.random.default_rng(0)
    rows = [("A", 1, p) for p in rng.uniform(0.5, 1.0, 200)]
    rows += [("B", 1, p) for p in rng.uniform(0.5, 1.0, 200)]
    rows += [("C", 0, p) for p in rng.uniform(0.0, 0.1, 400)]
    rows += [("A", 0, p) for p in rng.uniform(0.5, 1.0, 40)]  # same scores as A's tumours
    frame = _site_table(rows)
    m = compute_metrics(frame, [], tumour=True, group="patient")
    assert m["tumour"]["auc"]["mean"] > 0.95 and m["tumour"]["pooled"]["auc"] > 0.95
    within = m["tumour"]["within_site_auc"]
    assert abs(within["auc"] - 0.5) < 0.1, within["auc"]
    assert within["sites"] == 1 and set(within["per_site"]) == {"A"}
    assert within["per_site"]["A"]["tumour"] == 200 and within["per_site"]["A"]["normal"] == 40
    assert within["per_site"]["A"]["folds"] == [0, 1, 2]  # patient-grouped: several models
    one_class = within["one_class_sites"]
    assert one_class == {"B": {"tumour": 200, "normal": 0}, "C": {"tumour": 0, "normal": 400}}
    assert m["cv_group"] == "patient"
    # a model that sees tumour, not site, keeps its AUC within the site
    honest = frame.assign(tumour_prob=frame["tumour_true"] * 0.5 + rng.uniform(0, 0.4, len(frame)))
    assert within_site_auc(honest)["auc"] == 1.0


def test_within_site_auc_weights_sites_by_pairs() -> None:
    # site X: 2 tumours above 1 normal (AUC 1, 2 pairs); site Y: 2 + 2 interleaved (AUC 0.5,
    # 4 pairs); site Z: tumours only
    rows = [("X", 1, 0.9), ("X", 1, 0.8), ("X", 0, 0.1)]
    rows += [("Y", 1, 0.9), ("Y", 0, 0.8), ("Y", 1, 0.3), ("Y", 0, 0.4)]
    rows += [("Z", 1, 0.5)]
    w = within_site_auc(_site_table(rows, fold_of=lambda i: 0 if i < 3 else 1))
    assert w["per_site"]["X"]["auc"] == 1.0 and w["per_site"]["Y"]["auc"] == 0.5
    assert math.isclose(w["auc"], (2 * 1.0 + 4 * 0.5) / 6)  # share of within-site pairs
    assert math.isclose(w["unweighted_mean"], 0.75)
    assert (w["sites"], w["slides"], w["pairs"]) == (2, 7, 6)
    assert w["per_site"]["X"]["folds"] == [0] and w["one_class_sites"] == {
        "Z": {"tumour": 1, "normal": 0}
    }


def test_within_site_auc_reads_tcga_barcodes_or_says_why_not() -> None:
    rows = [("", 1, 0.9), ("", 0, 0.2), ("", 1, 0.7), ("", 0, 0.8)]
    frame = _site_table(rows)
    frame["slide_id"] = [
        "TCGA-AA-0001-01A-01-TS1",
        "TCGA-AA-0001-11A-01-TS1",
        "TCGA-BB-0002-01A-01-TS1",
        "TCGA-BB-0002-11A-01-TS1",
    ]
    w = within_site_auc(frame)  # empty site column: the barcodes' characters 6-7
    assert set(w["per_site"]) == {"AA", "BB"} and w["auc"] == 0.5
    plain = within_site_auc(_site_table(rows).drop(columns="site"))
    assert plain["available"] is False and "'site' column" in plain["reason"]
    assert math.isnan(plain["auc"]) and plain["sites"] == 0


def test_metrics_record_site_confounding_where_sites_are_known() -> None:
    rows = [("A", 1, 0.9), ("A", 0, 0.2), ("B", 1, 0.7), ("B", 0, 0.3)]
    m = compute_metrics(_site_table(rows), [], tumour=True, group="patient")
    assert m["tumour"]["site_confounding"]["site_only_auc"] == 0.5
    plain = compute_metrics(_site_table(rows).drop(columns="site"), [], tumour=True)
    assert "site_confounding" not in plain["tumour"]
