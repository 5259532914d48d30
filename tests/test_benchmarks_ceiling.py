"""The ceiling benchmark's pieces on generated data: the patient-grouped probe, the slide
ceiling, feature statistics, mask labels and the report (fast)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import ceiling  # noqa: E402
from benchmarks import run as runner  # noqa: E402


def _tiles(
    patients: int = 12, per_patient: int = 80, signal: float = 2.0, dim: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiles whose first feature carries the label (plus noise); patient of each tile."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{i:02d}" for i in range(patients)], per_patient)
    y = (rng.random(len(groups)) < 0.3).astype(int)
    x = rng.normal(size=(len(groups), dim))
    x[:, 0] += signal * y
    return x, y, groups


def test_probe_finds_a_known_tile_signal_and_not_shuffled_labels() -> None:
    x, y, groups = _tiles()
    found = ceiling.tile_probe(x, y, groups, folds=3)
    assert found.auc > 0.85 and len(found.auc_per_fold) == 3
    assert np.isfinite(found.oof).all()
    shuffled = np.random.default_rng(1).permutation(y)
    chance = ceiling.tile_probe(x, shuffled, groups, folds=3)
    assert 0.4 < chance.auc < 0.6
    weak = ceiling.tile_probe(*_tiles(signal=0.5), folds=3)
    assert chance.auc < weak.auc < found.auc  # the AUC follows the signal's strength


def test_probe_is_patient_grouped() -> None:
    """A feature that names the patient predicts a per-patient label only if a patient's tiles
    leak into training; with grouped folds the probe is at chance."""
    rng = np.random.default_rng(0)
    patients, per = 12, 50
    groups = np.repeat(np.arange(patients), per)
    y = np.repeat(rng.permutation([0, 1] * (patients // 2)), per)
    x = np.eye(patients)[groups] + rng.normal(scale=0.01, size=(len(groups), patients))
    assert ceiling.tile_probe(x, y, groups.astype(str), folds=3).auc < 0.65


def test_probe_scores_every_tile_with_the_fold_that_held_its_patient_out() -> None:
    x, y, groups = _tiles()
    found = ceiling.tile_probe(x, y, groups, 3, 0.1, x_score=x, groups_score=groups)
    assert found.scores is not None and np.isfinite(found.scores).all()
    np.testing.assert_allclose(found.scores, found.oof)  # same tiles, same held-out models
    with pytest.raises(ValueError, match="no labelled tile"):
        ceiling.tile_probe(x, y, groups, 3, x_score=x[:2], groups_score=np.array(["X", "Y"]))
    with pytest.raises(ValueError, match="both classes"):
        ceiling.tile_probe(x, np.zeros_like(y), groups)
    with pytest.raises(ValueError, match="more --patients"):
        ceiling.tile_probe(x[:80], y[:80], groups[:80], folds=3)


def test_top_mean_scores_a_slide_by_its_highest_tiles() -> None:
    scores = np.array([0.1, 0.2, 0.9, 0.1, 0.1, 0.1, 0.5])
    slide_of = np.array([0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(ceiling.top_mean(scores, slide_of, 3, 0.02)[:2], [0.9, 0.5])
    assert np.isnan(ceiling.top_mean(scores, slide_of, 3, 0.02)[2])  # a slide with no tiles
    np.testing.assert_allclose(ceiling.top_mean(scores, slide_of, 2, 1.0), [0.4, 0.2])


def test_feature_stats_tell_a_collapsed_embedding_from_a_spread_one() -> None:
    rng = np.random.default_rng(0)
    spread = ceiling.feature_stats(rng.normal(size=(2000, 32)))
    assert spread["effective_rank"] > 28 and spread["dead_dims"] == 0
    assert abs(spread["mean_cosine"]) < 0.05
    constant = ceiling.feature_stats(np.ones((500, 32)) + rng.normal(scale=1e-7, size=(500, 32)))
    assert constant["mean_cosine"] > 0.999 and constant["sd_max"] < 1e-6
    line = ceiling.feature_stats(np.outer(rng.normal(size=500), rng.normal(size=32)))
    assert line["effective_rank"] < 1.5


def test_mask_labels_positive_negative_and_border() -> None:
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True  # tumour in the top-left corner
    coords = np.array([[0, 0], [4, 4], [2, 0]])  # level-0 px, one mask px per level-0 px
    labels = ceiling._mask_labels(mask, coords, side=2, scale=1.0)
    assert labels.tolist() == [1, 0, 0]
    labels = ceiling._mask_labels(mask, np.array([[1, 1]]), side=2, scale=1.0)
    assert labels.tolist() == [-1]  # tumour under the tile, centre (2, 2) outside it


def _result() -> dict[str, Any]:
    def stat(mean: float, sd: float | None = 0.02) -> dict[str, Any]:
        return {"mean": mean, "sd": sd, "n": 3, "values": [mean] * 3}

    simclr = {"status": "ok", "features": {"dim": 64}}
    return {
        "benchmark": "ceiling",
        "context_um": 64.0,
        "cohorts": {"hard": {"patients": 20, "slides": 30, "normal_slides": 10}},
        "tiles_per_slide": 600,
        "probe": "logistic",
        "simclr_recipe": {"optimizer": "adamw", "lr": 0.002, "batch_size": 32, "steps": 1000},
        "seeds": [0, 1, 2],
        "cells": [
            {
                "difficulty": "hard",
                "mpp": 1.0,
                "seed": 0,
                "encoders": {"simclr": simclr, "tiny_random": {"status": "failed", "error": "X"}},
            }
        ],
        "rows": [
            {
                "difficulty": "hard",
                "mpp": 1.0,
                "encoder": "simclr",
                "seeds": 3,
                "tumour_tile_auc": stat(0.45),
                "tumour_slide_auc": stat(0.55),
                "lymphocyte_tile_auc": stat(0.42),
                "lymphocyte_slide_r": stat(0.1),
                "effective_rank": stat(1.3, 0.1),
                "final_loss": stat(4.15, 0.001),
                "chance_loss": 4.1431,
            }
        ],
    }


def test_report_renders_the_ceiling_table_and_flags_collapse() -> None:
    entry = {"status": "ok", "result": _result(), "command": "python -m benchmarks.ceiling"}
    md = "\n".join(runner.ceiling_section(entry))
    assert "| hard | 1 (64) | simclr | 3 | 0.45 ± 0.02 | 0.55 ± 0.02 | 0.42 ± 0.02 |" in md
    assert "| 1.3 ± 0.1 / 64 | 4.15 ± 0.00 (4.14) |" in md
    assert "failed: X" in md
    assert "final loss 4.15 = 1.00 × ln(2B−1) (at chance" in md
    assert "no encoder's tiles rank slides above 0.55" in md and "not the aggregator" in md
    report = {"machine": {}, "results": {"ceiling": entry}}
    assert "## Ceiling: what the tile features can separate" in runner.render_markdown(report)
    assert "ceiling" in runner.NAMES


def test_summarise_gives_mean_and_sd_over_seeds_and_counts_a_merged_duplicate_once() -> None:
    def cell(seed: int, auc: float, steps: int = 300) -> dict[str, Any]:
        entry = {
            "status": "ok",
            "tumour": {"tile_auc": auc},
            "pretrain": {"steps": steps, "final_loss": 4.1, "chance_loss": 4.14},
        }
        return {"difficulty": "hard", "mpp": 1.0, "seed": seed, "encoders": {"simclr": entry}}

    cells = [cell(0, 0.6), cell(1, 0.8), cell(1, 0.1), cell(0, 0.5, steps=1000)]
    rows = {r["steps"]: r for r in ceiling.summarise(cells)}
    assert rows[300]["seeds"] == 2 and rows[300]["tumour_tile_auc"]["mean"] == 0.7
    assert rows[300]["tumour_tile_auc"]["sd"] == round(float(np.std([0.6, 0.8], ddof=1)), 4)
    assert rows[1000]["seeds"] == 1 and rows[1000]["tumour_tile_auc"]["sd"] is None
