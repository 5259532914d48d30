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


def _run(args: list[str]) -> dict:
    """Run a histcode command in-process; return its final JSON line."""
    from histcode.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(args)
    if code not in (0, 1):
        raise RuntimeError(f"histcode {' '.join(args)} exited {code}")
    return json.loads(buffer.getvalue().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/localisation"))
    parser.add_argument("--difficulty", default="easy", choices=["easy", "hard"])
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--steps", type=int, default=150, help="pretraining steps")
    parser.add_argument("--epochs", type=int, default=30, help="finetuning epochs per fold")
    parser.add_argument("--aggregator", default="abmil")
    args = parser.parse_args()

    from histcode.registry import Registry

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    reg = str(w / "registry")
    start = time.perf_counter()
    cohort = w / f"cohort-{args.difficulty}"
    _run(
        [
            "synth",
            "--out",
            str(cohort),
            "--patients",
            str(args.patients),
            "--difficulty",
            args.difficulty,
            "--progress",
            "false",
        ]
    )
    tiles, features = w / "tiles.zarr", w / "features.zarr"
    _run(
        [
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
        ]
    )
    enc = _run(
        [
            "pretrain",
            "--config",
            str(CONFIGS / "pretrain/simclr.yaml"),
            "--config",
            str(CONFIGS / "pretrain/cpu_smoke.yaml"),
            "--data.tiles",
            str(tiles),
            "--name",
            "loc-encoder",
            "--registry",
            reg,
            "--out",
            str(w / "pretrain"),
            "--trainer.max_steps",
            str(args.steps),
            "--resume",
            "false",
        ]
    )
    _run(
        [
            "embed",
            "--encoder",
            enc["ref"],
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
        ]
    )
    run = w / "finetune"
    ft = _run(
        [
            "finetune",
            "--config",
            str(CONFIGS / "finetune/deg.yaml"),
            "--config",
            str(CONFIGS / "finetune/cpu_smoke.yaml"),
            "--features",
            str(features),
            "--expression",
            str(cohort / "expression.tsv"),
            "--name",
            "loc-deg",
            "--registry",
            reg,
            "--out",
            str(run),
            "--model.aggregator",
            args.aggregator,
            "--trainer.max_epochs",
            str(args.epochs),
            "--cv.register",
            "folds",
        ]
    )
    model_of_fold = {
        int(c.extra["fold"]): c.ref
        for c in Registry(reg).list("loc-deg")
        if c.ref in ft["registered"]
    }
    with open(run / "predictions.csv") as f:
        test_fold = {r["slide_id"]: int(r["fold"]) for r in csv.DictReader(f)}
    with open(cohort / "cohort.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["sample_type"] == "tumour"]
    scores: dict[str, list[float]] = {}
    for r in rows:
        sid = r["slide_id"]
        maps = _run(
            [
                "heatmap",
                "--model",
                model_of_fold[test_fold[sid]],
                "--registry",
                reg,
                "--features",
                str(features),
                "--slide",
                str(cohort / r["path"]),
                "--out",
                str(w / "maps"),
                "--truth",
                str(cohort / "truth" / f"{sid}.npz"),
                "--genes",
                "MYC",
            ]
        )
        for key, value in (maps["localisation_auroc"] or {}).items():
            if value is not None:
                scores.setdefault(key, []).append(value)
    lymph = [v for k, vs in scores.items() if "lymphocyte_mask" in k for v in vs]
    print(
        json.dumps(
            {
                "benchmark": "heatmap_localisation",
                "difficulty": args.difficulty,
                "aggregator": args.aggregator,
                "pretrain_steps": args.steps,
                "finetune_epochs": args.epochs,
                "tumour_slides": len(rows),
                "tumour_auc_cv": ft["tumour_auc"],
                "significant_genes": ft["significant"],
                "mean_auroc": {k: round(statistics.mean(v), 3) for k, v in sorted(scores.items())},
                "attention_vs_tumour_mask": round(
                    statistics.mean(scores["attention_vs_tumour_mask"]), 3
                )
                if "attention_vs_tumour_mask" in scores
                else None,
                "lymphocyte_genes_vs_lymphocyte_mask": round(statistics.mean(lymph), 3)
                if lymph
                else None,
                "goal": 0.85,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
