"""How well the maps find tumour and lymphocytes: AUROC against the synthetic truth masks.

Runs the pipeline on a synthetic cohort through the CLI (synth → tile → pretrain → embed →
finetune with per-fold models → heatmap), then scores each tumour slide's maps with the model
of the fold in which that slide was a *test* slide (the model never saw it):
tile attention and tumour contribution vs the true tumour mask, and each lymphocyte gene's
log2FC map vs the true lymphocyte mask. Prints one JSON line with the mean over slides.
Goal (issue 7): ≥ 0.85 each.

    python -m benchmarks.heatmap_localisation [--difficulty easy] [--steps 150] [--epochs 30]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import statistics
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _histcode(*args: str) -> dict:
    """Run a histcode command in-process; return its final JSON line."""
    from histcode.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(list(args))
    if code not in (0, 1):
        raise RuntimeError(f"histcode {' '.join(args)} exited {code}")
    return json.loads(buffer.getvalue().strip().splitlines()[-1])


def _mean(values: list[float]) -> float | None:
    return round(statistics.mean(values), 3) if values else None


def run(
    work: Path,
    difficulty: str = "easy",
    patients: int = 12,
    steps: int = 150,
    epochs: int = 30,
    aggregator: str = "abmil",
) -> dict:
    """The whole measurement (see the module docstring); returns the result."""
    from histcode.registry import Registry

    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    reg = str(work / "registry")
    cohort = work / f"cohort-{difficulty}"
    tiles, features, run_dir = work / "tiles.zarr", work / "features.zarr", work / "finetune"
    pretrain_cfg = [
        f"--config={CONFIGS / 'pretrain/simclr.yaml'}",
        f"--config={CONFIGS / 'pretrain/cpu_smoke.yaml'}",
    ]
    finetune_cfg = [
        f"--config={CONFIGS / 'finetune/deg.yaml'}",
        f"--config={CONFIGS / 'finetune/cpu_smoke.yaml'}",
    ]

    _histcode(
        "synth",
        "--out",
        str(cohort),
        "--patients",
        str(patients),
        "--difficulty",
        difficulty,
        "--progress",
        "false",
    )
    _histcode(
        "tile",
        "--slides",
        str(cohort / "slides"),
        "--out",
        str(tiles),
        "--mpp",
        "1.0",
        "--tile_size",
        "64",
        "--progress",
        "false",
        "--overwrite",
        "true",
    )
    encoder = _histcode(
        "pretrain",
        *pretrain_cfg,
        "--data.tiles",
        str(tiles),
        "--name",
        "loc-encoder",
        "--registry",
        reg,
        "--out",
        str(work / "pretrain"),
        "--trainer.max_steps",
        str(steps),
        "--resume",
        "false",
    )
    _histcode(
        "embed",
        "--encoder",
        encoder["ref"],
        "--registry",
        reg,
        "--tiles",
        str(tiles),
        "--out",
        str(features),
        "--workers",
        "1",
        "--progress",
        "false",
        "--overwrite",
        "true",
    )
    finetuned = _histcode(
        "finetune",
        *finetune_cfg,
        "--features",
        str(features),
        "--expression",
        str(cohort / "expression.tsv"),
        "--name",
        "loc-deg",
        "--registry",
        reg,
        "--out",
        str(run_dir),
        "--model.aggregator",
        aggregator,
        "--trainer.max_epochs",
        str(epochs),
        "--cv.register",
        "folds",
    )

    model_of_fold = {
        int(card.extra["fold"]): card.ref
        for card in Registry(reg).list("loc-deg")
        if card.ref in finetuned["registered"]
    }
    with open(run_dir / "predictions.csv") as f:
        test_fold = {row["slide_id"]: int(row["fold"]) for row in csv.DictReader(f)}
    with open(cohort / "cohort.csv") as f:
        tumour_rows = [row for row in csv.DictReader(f) if row["sample_type"] == "tumour"]
    scores: dict[str, list[float]] = {}
    for row in tumour_rows:
        sid = row["slide_id"]
        maps = _histcode(
            "heatmap",
            "--model",
            model_of_fold[test_fold[sid]],
            "--registry",
            reg,
            "--features",
            str(features),
            "--slide",
            str(cohort / row["path"]),
            "--out",
            str(work / "maps"),
            "--truth",
            str(cohort / "truth" / f"{sid}.npz"),
            "--genes",
            "MYC",
        )
        for key, value in (maps["localisation_auroc"] or {}).items():
            if value is not None:
                scores.setdefault(key, []).append(value)
    lymph = [v for key, values in scores.items() if "lymphocyte_mask" in key for v in values]
    return {
        "benchmark": "heatmap_localisation",
        "difficulty": difficulty,
        "aggregator": aggregator,
        "patients": patients,
        "pretrain_steps": steps,
        "finetune_epochs": epochs,
        "tumour_slides": len(tumour_rows),
        "tumour_auc_cv": finetuned["tumour_auc"],
        "significant_genes": finetuned["significant"],
        "mean_auroc": {key: _mean(values) for key, values in sorted(scores.items())},
        "attention_vs_tumour_mask": _mean(scores.get("attention_vs_tumour_mask", [])),
        "lymphocyte_genes_vs_lymphocyte_mask": _mean(lymph),
        "goal": 0.85,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/localisation"))
    parser.add_argument("--difficulty", default="easy", choices=["easy", "hard"])
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--steps", type=int, default=150, help="pretraining steps")
    parser.add_argument("--epochs", type=int, default=30, help="finetuning epochs per fold")
    parser.add_argument("--aggregator", default="abmil")
    a = parser.parse_args()
    print(json.dumps(run(a.work, a.difficulty, a.patients, a.steps, a.epochs, a.aggregator)))


if __name__ == "__main__":
    main()
