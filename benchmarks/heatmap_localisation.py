"""How well the maps find tumour and lymphocytes: AUROC against the synthetic truth masks.

Runs ``histcode demo`` (synth → tile → pretrain → embed → finetune with per-fold models →
heatmaps), which scores each tumour slide's maps with the model of the fold in which that
slide was a *test* slide (the model never saw it): tile attention and tumour contribution vs
the true tumour mask, and each lymphocyte gene's log2FC map vs the true lymphocyte mask; the
same for the naive baseline (random encoder, mean pooling, linear model). Prints one JSON line
with the means over tumour slides. Goal: ≥ 0.85 each.

    python -m benchmarks.heatmap_localisation [--patients 30] [--steps 2000] [--epochs 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.spec import Benchmark, fmt

GOAL = 0.85


def run(
    work: Path,
    difficulty: str = "easy",
    patients: int = 30,
    steps: int = 2000,
    epochs: int = 100,
    aggregator: str = "abmil",
    seed: int = 0,
) -> dict:
    """Run the demo into ``work`` (resuming it if it is there) and return the figures."""
    from histcode.cli import run_captured

    start = time.perf_counter()
    argv = [
        "demo", "--out", str(work), "--difficulty", difficulty, "--patients", str(patients),
        "--pretrain_steps", str(steps), "--epochs", str(epochs), "--aggregator", aggregator,
        "--seed", str(seed),
    ]  # fmt: skip
    code, result = run_captured(argv)
    if code != 0 or result is None:
        raise RuntimeError(f"histcode {' '.join(argv)} exited {code}")
    arms = result["results"]
    pipeline, naive = arms["simclr"]["localisation"], arms["naive"]["localisation"]
    return {
        "benchmark": "heatmap_localisation",
        "difficulty": difficulty,
        "aggregator": aggregator,
        "patients": patients,
        "pretrain_steps": steps,
        "finetune_epochs": epochs,
        "tumour_auc_cv": arms["simclr"]["tumour_auc"],
        "attention_vs_tumour_mask": pipeline.get("attention_vs_tumour_mask"),
        "tumour_contribution_vs_tumour_mask": pipeline.get("tumour_vs_tumour_mask"),
        "lymphocyte_genes_vs_lymphocyte_mask": pipeline.get("lymphocyte_genes_vs_lymphocyte_mask"),
        "naive_baseline": naive,
        "goal": GOAL,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/localisation"))
    parser.add_argument("--difficulty", default="easy", choices=["easy", "hard"])
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--steps", type=int, default=2000, help="pretraining steps (the demo's)")
    parser.add_argument("--epochs", type=int, default=100, help="most finetuning epochs")
    parser.add_argument("--aggregator", default="abmil")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    print(
        json.dumps(run(a.work, a.difficulty, a.patients, a.steps, a.epochs, a.aggregator, a.seed))
    )


# -- report --------------------------------------------------------------------------------


def summary(r: dict[str, Any]) -> str:
    """Attention and gene maps against the truth masks."""
    return (
        f"- **heatmap_localisation** ({r.get('difficulty')}): attention vs tumour mask "
        f"AUROC {fmt(r.get('attention_vs_tumour_mask'))}, lymphocyte genes vs lymphocyte "
        f"mask {fmt(r.get('lymphocyte_genes_vs_lymphocyte_mask'))} (goal ≥ {r.get('goal')})."
    )


SPEC = Benchmark(
    name="heatmap_localisation",
    what="attention and gene maps vs the synthetic truth masks",
    quick=None,
    order=90,
    goals=(
        f"AUROC ≥ {GOAL} of the attention map against the tumour mask and of the lymphocyte "
        "genes' maps against the lymphocyte mask",
    ),
    summary=summary,
)


if __name__ == "__main__":
    main()
