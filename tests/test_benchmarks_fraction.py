"""The tumour-fraction benchmark on generated bags: with separable tumour tiles its count
follows each slide's true fraction and the genes fitted on it follow theirs; without, the count
does not; it reads nothing of the test fold but its features (fast)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import fraction as fb  # noqa: E402
from benchmarks.spec import Benchmark  # noqa: E402


def cohort(shift: float, seed: int = 0, slides: int = 60, tiles: int = 200, dim: int = 6):
    """Tumour slides with 2–10 % of their tiles shifted along one direction, and two genes
    whose log2FC follows the true fraction (plus noise); normal slides have no gene value."""
    rng = np.random.default_rng(seed)
    y = np.tile([1, 1, 0], slides // 3)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    bags, labels, fraction = [], [], []
    for label in y:
        x = rng.normal(size=(tiles, dim)).astype(np.float32)
        t = np.zeros(tiles, dtype=np.int8)
        f = rng.uniform(0.02, 0.10) if label else 0.0
        hit = rng.choice(tiles, round(f * tiles), replace=False)
        x[hit] += shift * direction.astype(np.float32)
        t[hit] = 1
        bags.append(x)
        labels.append(t)
        fraction.append(t.mean())
    fraction = np.array(fraction)
    genes = {
        g: np.where(y == 1, effect * fraction / 0.05 + rng.normal(0, 0.1, len(y)), np.nan)
        for g, effect in (("MYC", 2.0), ("PTEN", -1.5))
    }
    folds = np.repeat(np.arange(3), len(y) // 3)
    return bags, labels, y, folds, fraction, genes


def test_separable_tumour_tiles_count_the_fraction_and_carry_the_genes() -> None:
    bags, labels, y, folds, fraction, genes = cohort(shift=5.0)
    pipeline = {g: np.where(y == 1, 0.0, np.nan) + np.random.default_rng(1).normal(size=len(y))
                for g in genes}  # fmt: skip
    got = fb.fraction_ceiling(bags, labels, y, folds, fraction, genes, pipeline)
    assert got["fraction_r"]["count"] > 0.9 and got["fraction_r"]["mean_prob"] > 0.8
    assert got["gene_r"]["true_fraction"] > 0.9 and got["gene_r"]["count"] > 0.8
    assert abs(got["gene_r"]["pipeline"]) < 0.6  # random predictions
    assert [f["tumour_slides"] for f in got["folds"]] == [14, 13, 13]


def test_without_signal_the_count_does_not_follow_the_fraction() -> None:
    bags, labels, y, folds, fraction, genes = cohort(shift=0.0)
    got = fb.fraction_ceiling(bags, labels, y, folds, fraction, genes)
    assert abs(got["fraction_r"]["count"]) < 0.5 and abs(got["gene_r"]["count"]) < 0.5
    assert got["gene_r"]["true_fraction"] > 0.9  # the genes still follow the truth
    assert "pipeline" not in got["gene_r"]


def test_test_fold_features_alone_reach_the_probe() -> None:
    """Changing a held-out slide's tile labels, fraction or genes changes nothing of its
    fold's fitted probe; only its estimate's comparison with the truth uses them."""
    bags, labels, y, folds, fraction, genes = cohort(shift=5.0)
    base = fb.fraction_ceiling(bags, labels, y, folds, fraction, genes)
    scrambled = [lab.copy() for lab in labels]
    for i in np.flatnonzero(folds == 0):
        scrambled[i] = np.random.default_rng(i).permutation(scrambled[i])
    again = fb.fraction_ceiling(bags, scrambled, y, folds, fraction, genes)
    assert again["folds"][0] == base["folds"][0]


def test_spec_and_section() -> None:
    assert isinstance(fb.SPEC, Benchmark) and fb.SPEC.name == "fraction"
    s = {"mean": 0.5, "sd": 0.1, "n": 3, "values": [0.4, 0.5, 0.6]}
    part = {k: s for k in ("mean_prob", "count")}
    genes = {**part, "true_fraction": s, "pipeline": s}
    result = {
        "arm": "simclr", "views": ["raw"], "demos": [{"demo": "/x/demo-s0"}], "seconds": 3,
        "summary": {"raw": {"fraction_r": part, "gene_r": genes}},
    }  # fmt: skip
    lines = fb.section({"result": result})
    assert any(line.startswith("| raw | 0.50 ± 0.10 |") for line in lines)
