"""Does the synthetic cohort's difficulty setting defeat a naive method?

For an ``easy`` and a ``hard`` cohort, a naive slide classifier — a random-weight ResNet-18
(no pretraining) embeds up to 64 tissue tiles per slide (128 µm at 0.5 µm/px = 256 px, placed
from the truth tissue mask), mean pooling makes one vector per slide, and a logistic
regression predicts tumour vs normal with patient-grouped stratified cross-validation. The
easy cohort should be solved (AUC ≈ 1), the hard one not (AUC ≲ 0.75), leaving room for
pretraining and attention to show their worth.

Prints one JSON line::

    {"benchmark": "synth_difficulty", "easy": {"auc": …}, "hard": {"auc": …}, …}

Usage: ``python benchmarks/synth_difficulty.py [--patients 12] [--out DIR] [--tiles 64]``
(``--out`` keeps the cohorts, and a rerun reuses them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.spec import Benchmark, fmt

#: the naive baseline's tumour AUC
GOAL = "easy ≈ 1, hard ≲ 0.75"
TILE_UM, TILE_MPP = 128.0, 0.5


def tile_positions(
    tissue: np.ndarray, mask_mpp: float, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Top-left corners (µm) of up to ``n`` tiles centred on random tissue-mask pixels."""
    ij = np.argwhere(tissue)
    if len(ij) == 0:
        return np.zeros((0, 2))
    pick = ij[rng.choice(len(ij), size=min(n, len(ij)), replace=False)]
    centres = (pick[:, ::-1] + 0.5) * mask_mpp
    return centres - TILE_UM / 2


def read_tiles(path: Path, corners_um: np.ndarray) -> np.ndarray:
    """Tiles of TILE_UM at TILE_MPP through SlideReader, (N, 256, 256, 3) uint8."""
    from histcode.slide import SlideReader

    side = round(TILE_UM / TILE_MPP)
    out = np.empty((len(corners_um), side, side, 3), np.uint8)
    with SlideReader(path) as slide:
        size = round(TILE_UM / slide.mpp)
        factor = size // side
        for i, (x, y) in enumerate(corners_um):
            tile = slide.read_region((round(x / slide.mpp), round(y / slide.mpp)), 0, (size, size))
            if factor > 1:
                tile = tile.reshape(side, factor, side, factor, 3).mean(axis=(1, 3))
            out[i] = tile
    return out


def slide_features(cohort_dir: Path, tiles: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Mean-pooled random ResNet-18 features of each slide, (S, 512), and the slide rows."""
    import csv

    import torch
    import torchvision

    from histcode.synth.tissue import SlideTruth

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with open(cohort_dir / "cohort.csv") as f:
        rows = list(csv.DictReader(f))
    feats = []
    rng = np.random.default_rng(seed)
    for row in rows:
        truth = SlideTruth.load(cohort_dir / "truth" / f"{row['slide_id']}.npz")
        corners = tile_positions(truth.tissue, truth.mask_mpp, tiles, rng)
        x = torch.from_numpy(read_tiles(cohort_dir / row["path"], corners))
        x = (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        with torch.no_grad():
            emb = torch.cat([model(b) for b in x.split(32)])
        feats.append(emb.mean(0).numpy())
    return np.stack(feats), rows


def grouped_cv_auc(x: np.ndarray, y: np.ndarray, groups: np.ndarray, repeats: int = 5) -> dict:
    """Out-of-fold tumour AUC of a logistic regression, patient-grouped stratified CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_splits = int(min(4, len(np.unique(groups[y == 0])), len(np.unique(groups))))
    aucs = []
    for r in range(repeats):
        prob = np.zeros(len(y))
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=r)
        for train, test in cv.split(x, y, groups):
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
            model.fit(x[train], y[train])
            prob[test] = model.predict_proba(x[test])[:, 1]
        aucs.append(roc_auc_score(y, prob))
    return {
        "auc": round(float(np.mean(aucs)), 4),
        "auc_sd": round(float(np.std(aucs)), 4),
        "folds": n_splits,
        "repeats": repeats,
    }


def run(
    out: Path, patients: int, tiles: int, seed: int, slide_mm: tuple[float, float], workers: int
) -> dict:
    from histcode.synth import make_cohort

    result: dict = {
        "benchmark": "synth_difficulty",
        "patients": patients,
        "tiles_per_slide": tiles,
        "slide_mm": list(slide_mm),
        "encoder": "resnet18 random weights, mean pooling, logistic regression",
    }
    for difficulty in ("easy", "hard"):
        start = time.perf_counter()
        cohort = make_cohort(
            out / difficulty,
            patients=patients,
            seed=seed,
            difficulty=difficulty,
            slide_mm=slide_mm,
            progress=False,
            workers=workers,
        )
        made = time.perf_counter() - start
        x, rows = slide_features(out / difficulty, tiles, seed)
        y = np.array([r["sample_type"] == "tumour" for r in rows], int)
        groups = np.array([r["patient_id"] for r in rows])
        result[difficulty] = {
            **grouped_cv_auc(x, y, groups),
            "slides": len(rows),
            "normal_slides": int((y == 0).sum()),
            "mean_tumour_fraction": round(
                float(
                    np.mean(
                        [float(r["tumour_fraction"]) for r in rows if r["sample_type"] == "tumour"]
                    )
                ),
                4,
            ),
            "synth_seconds": round(made, 1),
            "embed_seconds": round(time.perf_counter() - start - made, 1),
            "written": len(cohort.written),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="keep the cohorts here (reused on rerun)")
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slide_mm", type=float, nargs=2, default=(3.0, 2.25))
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out is not None:
        result = run(
            args.out, args.patients, args.tiles, args.seed, tuple(args.slide_mm), args.workers
        )
    else:
        with tempfile.TemporaryDirectory(prefix="synth_difficulty_") as tmp:
            result = run(
                Path(tmp), args.patients, args.tiles, args.seed, tuple(args.slide_mm), args.workers
            )
    print(json.dumps(result), flush=True)
    return 0


# -- report --------------------------------------------------------------------------------


def summary(r: dict[str, Any]) -> str:
    """The naive baseline's tumour AUC on the easy and the hard cohort."""
    e, h = r.get("easy", {}), r.get("hard", {})
    return (
        f"- **synth_difficulty**: naive baseline tumour AUC easy {fmt(e.get('auc'))} ± "
        f"{fmt(e.get('auc_sd'))}, hard {fmt(h.get('auc'))} ± {fmt(h.get('auc_sd'))} "
        f"(goal: {GOAL})."
    )


SPEC = Benchmark(
    name="synth_difficulty",
    what="the naive baseline on easy vs hard synthetic cohorts",
    args=["--out", "benchmarks/out/synth_difficulty"],
    quick=None,
    order=80,
    goals=(f"the naive baseline's tumour AUC {GOAL}",),
    summary=summary,
)


if __name__ == "__main__":
    sys.exit(main())
