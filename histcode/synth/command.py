"""``histcode synth``: write a synthetic cohort."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from histcode.commandkit import CommandResult, run_function


def synth(
    out: Path,
    patients: int = 12,
    seed: int = 0,
    difficulty: Literal["easy", "hard"] = "hard",
    slide_mm: tuple[float, float] = (4.0, 3.0),
    normal_fraction: float = 0.5,
    sites: int = 3,
    normal_sites: int | None = None,
    progress: bool = True,
    workers: int = 0,
) -> CommandResult:
    """Write a synthetic TCGA-style cohort: H&E-like pyramidal slides (Aperio SVS at 40x and
    20x, some generic TIFF), an expression matrix of driver genes, and ground-truth masks.

    Rerunning with the same options on the same folder skips the slides already written.

    Args:
        out: Output folder (slides/, truth/, expression.tsv, genes.json, cohort.csv).
        patients: Number of patients; each has a tumour slide.
        seed: Random seed of everything.
        difficulty: 'easy' (large tumour regions, obvious morphology, mild stain variation)
            or 'hard' (small tumour foci of 2-6 % of the tissue, subtle morphology, strong
            per-site colour casts).
        slide_mm: Width and height of each slide in mm, e.g. [4.0, 3.0].
        normal_fraction: Fraction of patients that also have a normal slide (at least 2).
        sites: Number of tissue source sites, each with its own stain.
        normal_sites: Normal slides only from the first N sites (site confounding, as in
            TCGA: a site's stain then tells normal from tumour, a shortcut that
            'histcode finetune' exposes with its within-site tumour AUC); unset: every site.
        progress: Show a progress bar on stderr.
        workers: Processes writing slides in parallel; 0 = one per CPU core (at most 8).
    """
    from histcode.synth.cohort import describe, make_cohort

    cohort = make_cohort(
        out,
        patients=patients,
        seed=seed,
        difficulty=difficulty,
        slide_mm=slide_mm,
        normal_fraction=normal_fraction,
        sites=sites,
        normal_sites=normal_sites,
        progress=progress,
        workers=workers,
    )
    written = set(cohort.written)
    details = {
        "slides": [
            {**row, "status": "written" if row["slide_id"] in written else "skipped"}
            for row in cohort.slides
        ],
        "genes": cohort.genes,
    }
    return CommandResult(out_dir=Path(out), result=describe(cohort), details=details)


def main(argv: Sequence[str], prog: str = "histcode synth") -> int:
    """Entry point of ``histcode synth``."""
    return run_function(synth, argv, prog, "synth")
