"""Metrics against hand-computed references."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from histcode.finetune.metrics import (
    bh_fdr,
    binary_metrics,
    compute_metrics,
    correlation,
    jsonable,
    summarise,
)


def test_bh_by_hand() -> None:
    p = [0.01, 0.04, 0.03, 0.20, float("nan")]
    # sorted 0.01, 0.03, 0.04, 0.20 → p·m/rank = 0.04, 0.06, 0.0533, 0.20 → monotone from the top
    expected = [0.04, 0.0533333, 0.0533333, 0.20, float("nan")]
    np.testing.assert_allclose(bh_fdr(p), expected, rtol=1e-5)


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
