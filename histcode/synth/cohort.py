"""A synthetic TCGA-style cohort: patients, slides, expression matrix and ground truth.

Every patient has a tumour slide (sample type ``01``); some also a normal slide (``11``).
Patients come from a few tissue source sites, each with its own stain; by default sites are
not confounded with the label (each site has tumour and normal samples). ``normal_sites=k``
takes normal slides only from the first ``k`` sites, as TCGA's normals come from some sites
more than others: a model can then score "tumour" by the site's stain, which the
within-site tumour AUC of ``histcode finetune`` exposes. Slides are scanned at
40x or 20x, mostly as Aperio SVS, some as generic TIFF. The expression matrix has driver
genes that follow the slide's tumour burden or lymphocyte content, and genes that are noise.

Layout of ``out``::

    slides/<slide_id>.svs|.tiff   the slides
    truth/<slide_id>.npz          SlideTruth masks
    expression.tsv                genes × samples (TPM-like), sample = first 16 chars of id
    genes.json                    each gene's role and direction (ground truth)
    cohort.csv                    one row per slide (ids, scan settings, true fractions)
    cohort.json                   the parameters; a rerun with the same ones resumes
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from histcode import __version__
from histcode.errors import NotFoundError
from histcode.synth.cells import Morphology
from histcode.synth.scan import write_slide
from histcode.synth.stain import site_stain
from histcode.synth.tissue import LayoutParams, SlideTruth, make_layout

#: Bump when the generator's output changes, so that a rerun does not mix old and new slides.
GENERATOR_VERSION = 1

#: Second character of the TCGA tissue source site code of site ``i`` (``S1``, ``S2``, …).
SITE_CHARS = "123456789ABCDEFGHJKLMNPQRSTUVWXYZ"

#: Driver genes: (name, role, direction, log2 fold change at the reference fraction).
GENES: tuple[tuple[str, str, str, float], ...] = (
    ("MYC", "tumour", "up", 2.0),
    ("ERBB2", "tumour", "up", 1.6),
    ("CCND1", "tumour", "up", 1.8),
    ("EGFR", "tumour", "up", 1.4),
    ("MKI67", "tumour", "up", 2.2),
    ("CDKN2A", "tumour", "down", -1.8),
    ("PTEN", "tumour", "down", -1.4),
    ("SMAD4", "tumour", "down", -1.6),
    ("PTPRC", "lymphocyte", "up", 2.0),
    ("CD3E", "lymphocyte", "up", 2.2),
    ("CD8A", "lymphocyte", "up", 1.8),
    ("GZMB", "lymphocyte", "up", 1.6),
    ("KRAS", "noise", "none", 0.0),
    ("PIK3CA", "noise", "none", 0.0),
    ("BRAF", "noise", "none", 0.0),
    ("TP53", "noise", "none", 0.0),
    ("APC", "noise", "none", 0.0),
    ("CTNNB1", "noise", "none", 0.0),
    ("IDH1", "noise", "none", 0.0),
    ("ARID1A", "noise", "none", 0.0),
)

#: Tumour fraction (of tissue) of tumour slides, and the fraction at which a tumour gene has
#: its nominal log2 fold change, per difficulty.
TUMOUR_FRACTION = {"easy": (0.3, 0.6), "hard": (0.02, 0.06)}
TUMOUR_REFERENCE = {"easy": 0.45, "hard": 0.04}
LYMPHOCYTE_FRACTION = (0.01, 0.2)
LYMPHOCYTE_REFERENCE = 0.1
#: sd of log2 expression around the model (biological + technical noise).
EXPRESSION_NOISE = 0.25
#: Stain cast strength of sites, and slide-to-slide jitter within a site.
SITE_STRENGTH = {"easy": 0.2, "hard": 1.0}
SLIDE_JITTER = {"easy": 0.03, "hard": 0.08}

CSV_COLUMNS = (
    "slide_id",
    "patient_id",
    "sample_type",
    "site",
    "mpp",
    "objective_power",
    "format",
    "path",
    "tumour_fraction",
    "lymphocyte_fraction",
)


def make_barcode(site: int, patient: int, sample_type: Literal["tumour", "normal"]) -> str:
    """A TCGA-style slide barcode, e.g. ``TCGA-S1-0001-01A-01-TS1``.

    Args:
        site: 0-based site index (→ tissue source site ``S1``, ``S2``, …).
        patient: patient number, 1–9999.
        sample_type: ``tumour`` (``01``) or ``normal`` (``11``).
    """
    code = "01" if sample_type == "tumour" else "11"
    return f"TCGA-S{SITE_CHARS[site]}-{patient:04d}-{code}A-01-TS1"


@dataclass(frozen=True)
class SlidePlan:
    """Everything needed to write one slide of the cohort.

    Attributes:
        slide_id: TCGA-style barcode (the file stem).
        patient_id: first 12 characters of the barcode.
        sample_type: ``tumour`` or ``normal``.
        site: tissue source site code (``S1``…).
        site_index: 0-based site index.
        mpp: level-0 µm/px.
        objective_power: scan magnification (40 or 20).
        fmt: ``svs`` or ``tiff``.
        background: glass colour, ``white`` or ``grey``.
        seed: the slide's random seed.
        layout: what the tissue layout holds.
    """

    slide_id: str
    patient_id: str
    sample_type: Literal["tumour", "normal"]
    site: str
    site_index: int
    mpp: float
    objective_power: int
    fmt: Literal["svs", "tiff"]
    background: Literal["white", "grey"]
    seed: int
    layout: LayoutParams

    @property
    def file_name(self) -> str:
        return f"{self.slide_id}.{self.fmt}"

    @property
    def sample_id(self) -> str:
        """The sample barcode (first 16 characters), the expression matrix's column."""
        return self.slide_id[:16]


@dataclass
class Cohort:
    """A written synthetic cohort.

    Attributes:
        out: its folder.
        params: the parameters it was made with (also in ``cohort.json``).
        slides: one dict per slide, the rows of ``cohort.csv``.
        genes: each gene's role, direction and effect (``genes.json``).
        written: ids of the slides written by this call.
        skipped: ids of the slides found already written (resumed).
    """

    out: Path
    params: dict[str, Any]
    slides: list[dict[str, Any]]
    genes: dict[str, dict[str, Any]]
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def expression_path(self) -> Path:
        return self.out / "expression.tsv"

    def slide_path(self, slide_id: str) -> Path:
        """Absolute path of a slide's file."""
        for row in self.slides:
            if row["slide_id"] == slide_id:
                return self.out / row["path"]
        raise NotFoundError(f"no slide {slide_id!r} in the cohort at {self.out}")

    def truth(self, slide_id: str) -> SlideTruth:
        """The ground-truth masks of a slide."""
        return SlideTruth.load(self.out / "truth" / f"{slide_id}.npz")


# -- planning ------------------------------------------------------------------------------


def _check_params(
    patients: int,
    difficulty: str,
    slide_mm: tuple[float, float],
    normal_fraction: float,
    sites: int,
    normal_sites: int | None = None,
) -> None:
    if not 2 <= patients <= 9999:
        raise ValueError(f"patients={patients}: give 2 to 9999 patients (default 12)")
    if difficulty not in ("easy", "hard"):
        raise ValueError(f"difficulty={difficulty!r}: choose 'easy' or 'hard'")
    if len(slide_mm) != 2 or not all(0.5 <= s <= 100.0 for s in slide_mm):
        raise ValueError(f"slide_mm={slide_mm}: give (width, height) in mm, each 0.5–100")
    if not 0.0 <= normal_fraction <= 1.0:
        raise ValueError(f"normal_fraction={normal_fraction} must be in [0, 1]")
    if not 1 <= sites <= len(SITE_CHARS):
        raise ValueError(f"sites={sites}: give 1 to {len(SITE_CHARS)} tissue source sites")
    if normal_sites is not None:
        if not 1 <= normal_sites <= sites:
            raise ValueError(
                f"normal_sites={normal_sites}: give 1 to sites={sites} (normal slides come from "
                "the first normal_sites sites), or leave it unset for normals from every site"
            )
        eligible = sum(p % sites < normal_sites for p in range(patients))
        if eligible < 2:
            raise ValueError(
                f"normal_sites={normal_sites}: the first {normal_sites} of {sites} sites hold "
                f"{eligible} of {patients} patients, and the cohort needs ≥ 2 normal slides; "
                "give more patients or a larger normal_sites"
            )


def plan_cohort(
    patients: int = 12,
    seed: int = 0,
    difficulty: Literal["easy", "hard"] = "hard",
    slide_mm: tuple[float, float] = (4.0, 3.0),
    normal_fraction: float = 0.5,
    sites: int = 3,
    normal_sites: int | None = None,
) -> list[SlidePlan]:
    """The slides of a cohort, without writing anything (see :func:`make_cohort`).

    Returns:
        One plan per slide, patient by patient (tumour slide first).
    """
    _check_params(patients, difficulty, slide_mm, normal_fraction, sites, normal_sites)
    rng = np.random.default_rng([seed, 0xC0407])
    site_of = [p % sites for p in range(patients)]
    # normal slides spread over sites: take patients round by round (one per site per round)
    order = np.concatenate(
        [rng.permutation(np.arange(r, min(r + sites, patients))) for r in range(0, patients, sites)]
    )
    n_normal = min(patients, max(2, round(normal_fraction * patients)))
    if normal_sites is not None:  # same draws; normals only from patients of the first sites
        order = order[[site_of[p] < normal_sites for p in order]]
        n_normal = min(len(order), n_normal)
    has_normal = set(order[:n_normal].tolist())
    pairs = [
        (p, t)
        for p in range(patients)
        for t in (("tumour", "normal") if p in has_normal else ("tumour",))
    ]
    n = len(pairs)
    at_40x = set(rng.permutation(n)[: max(1, round(n / 3))].tolist())
    as_tiff = set(rng.permutation(n)[: max(1, round(n / 6))].tolist())
    on_grey = set(rng.permutation(n)[: round(n / 4)].tolist())
    lo, hi = TUMOUR_FRACTION[difficulty]
    plans = []
    for i, (p, sample_type) in enumerate(pairs):
        sid = make_barcode(site_of[p], p + 1, sample_type)
        tumour = sample_type == "tumour"
        slide_seed = int(np.random.SeedSequence([seed, p, int(tumour)]).generate_state(1)[0])
        layout = LayoutParams(
            width_um=slide_mm[0] * 1000.0,
            height_um=slide_mm[1] * 1000.0,
            tumour_fraction=float(rng.uniform(lo, hi)) if tumour else 0.0,
            tumour_pattern="regions" if difficulty == "easy" else "foci",
            lymphocyte_fraction=float(rng.uniform(*LYMPHOCYTE_FRACTION)),
            necrosis=bool(tumour and difficulty == "easy" and rng.random() < 0.5),
        )
        plans.append(
            SlidePlan(
                slide_id=sid,
                patient_id=sid[:12],
                sample_type=sample_type,
                site=f"S{SITE_CHARS[site_of[p]]}",
                site_index=site_of[p],
                mpp=0.25 if i in at_40x else 0.5,
                objective_power=40 if i in at_40x else 20,
                fmt="tiff" if i in as_tiff else "svs",
                background="grey" if i in on_grey else "white",
                seed=slide_seed,
                layout=layout,
            )
        )
    return plans


def expression_matrix(
    samples: list[str], tumour: np.ndarray, lymphocyte: np.ndarray, difficulty: str, seed: int
) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """TPM-like expression of the driver genes.

    ``log2 TPM = baseline + effect · fraction / reference + noise``: tumour genes follow the
    slide's tumour fraction, lymphocyte genes its lymphocyte fraction, noise genes nothing.
    Normal samples (fraction 0) sit at baseline, so a tumour sample's log2 fold change against
    the mean of the normals grows with its fraction.

    Args:
        samples: (S,) sample barcodes.
        tumour: (S,) tumour fraction of each sample's tissue.
        lymphocyte: (S,) lymphocyte fraction.
        difficulty: ``easy`` or ``hard`` (sets the reference tumour fraction).
        seed: random seed.

    Returns:
        (G, S) TPM values (genes in :data:`GENES` order) and each gene's ground truth.
    """
    rng = np.random.default_rng([seed, 0xE4B2])
    ref = TUMOUR_REFERENCE[difficulty]
    values = np.empty((len(GENES), len(samples)))
    truth: dict[str, dict[str, Any]] = {}
    for g, (name, role, direction, effect) in enumerate(GENES):
        baseline = rng.uniform(2.0, 9.0)
        log2 = baseline + rng.normal(0, EXPRESSION_NOISE, len(samples))
        if role == "tumour":
            log2 += effect * tumour / ref
            reference = ref
        elif role == "lymphocyte":
            log2 += effect * lymphocyte / LYMPHOCYTE_REFERENCE
            reference = LYMPHOCYTE_REFERENCE
        else:
            reference = None
        values[g] = np.round(2.0**log2, 3)
        truth[name] = {
            "role": role,
            "direction": direction,
            "log2fc_at_reference": effect,
            "reference_fraction": reference,
            "baseline_log2_tpm": round(float(baseline), 4),
        }
    return values, truth


# -- writing -------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_plan(
    out: str, plan: SlidePlan, difficulty: str, sites: int, seed: int
) -> tuple[str, float]:
    """Write one slide and its truth (runs in a worker process)."""
    start = time.perf_counter()
    root = Path(out)
    layout = make_layout(plan.layout, plan.seed)
    stain = site_stain(plan.site_index, sites, seed, SITE_STRENGTH[difficulty]).jittered(
        np.random.default_rng([plan.seed, 0x5A1]), SLIDE_JITTER[difficulty]
    )
    truth = write_slide(
        root / "slides" / plan.file_name,
        layout,
        mpp=plan.mpp,
        morphology=Morphology.preset(difficulty),  # type: ignore[arg-type]
        stain=stain,
        fmt=plan.fmt,
        objective_power=plan.objective_power,
        background=plan.background,
        seed=plan.seed,
    )
    truth.save(root / "truth" / f"{plan.slide_id}.npz")
    return plan.slide_id, time.perf_counter() - start


def _is_written(out: Path, plan: SlidePlan) -> bool:
    return (out / "slides" / plan.file_name).is_file() and (
        out / "truth" / f"{plan.slide_id}.npz"
    ).is_file()


def _claim_folder(out: Path, params: dict[str, Any]) -> None:
    """Record the parameters in cohort.json, refusing a folder made with other ones."""
    path = out / "cohort.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get("parameters")
        except (json.JSONDecodeError, AttributeError):
            old = None
        if old != params:
            diff = {
                k: (old.get(k) if isinstance(old, dict) else None, v)
                for k, v in params.items()
                if not isinstance(old, dict) or old.get(k) != v
            }
            raise FileExistsError(
                f"{out} holds a synthetic cohort made with other parameters "
                f"(was → now: {diff}); write to another --out folder or delete this one"
            )
        return
    _write_atomic(
        path,
        json.dumps(
            {"parameters": params, "complete": False, "histcode_version": __version__}, indent=2
        )
        + "\n",
    )


def make_cohort(
    out: Path | str,
    patients: int = 12,
    seed: int = 0,
    difficulty: Literal["easy", "hard"] = "hard",
    slide_mm: tuple[float, float] = (4.0, 3.0),
    normal_fraction: float = 0.5,
    sites: int = 3,
    normal_sites: int | None = None,
    progress: bool = True,
    workers: int = 0,
    on_slide: Callable[[str, str], None] | None = None,
) -> Cohort:
    """Write a synthetic TCGA-style cohort: H&E-like pyramidal slides (Aperio SVS at 40x and
    20x, some generic TIFF), an expression matrix of driver genes, and ground-truth masks.

    Rerunning with the same parameters on the same folder skips the slides already written;
    a folder made with other parameters is refused. ``histcode synth`` is this function
    (:mod:`histcode.synth.command`).

    Args:
        out: Output folder (slides/, truth/, expression.tsv, genes.json, cohort.csv).
        patients: Number of patients; each has a tumour slide.
        seed: Random seed of everything.
        difficulty: 'easy' (large tumour regions, obvious morphology, mild stain variation)
            or 'hard' (small tumour foci of 2-6 % of the tissue, subtle morphology, strong
            per-site colour casts).
        slide_mm: Width and height of each slide in mm, as a list: ``--slide_mm "[4.0, 3.0]"``.
        normal_fraction: Fraction of patients that also have a normal slide (at least 2).
        sites: Number of tissue source sites, each with its own stain.
        normal_sites: Normal slides only from the first N sites (site confounding, as in
            TCGA: a site's stain then tells normal from tumour, a shortcut that
            'histcode finetune' exposes with its within-site tumour AUC); as many normals as
            without it (normal_fraction), at most the patients of those sites; unset: every
            site. Recorded in cohort.json only when set, so cohorts made without it keep
            their parameters.
        progress: Show a progress bar on stderr.
        workers: Processes writing slides in parallel; 0 = one per CPU core (at most 8).
        on_slide: called with (slide_id, ``written`` | ``skipped``) after each slide (not an
            option of ``histcode synth``).

    Returns:
        The cohort.

    Raises:
        ValueError: unusable parameters.
        FileExistsError: ``out`` holds a cohort made with other parameters.
    """
    from tqdm import tqdm

    out = Path(out)
    slide_mm = (float(slide_mm[0]), float(slide_mm[1]))
    plans = plan_cohort(patients, seed, difficulty, slide_mm, normal_fraction, sites, normal_sites)
    params = {
        "patients": patients,
        "seed": seed,
        "difficulty": difficulty,
        "slide_mm": list(slide_mm),
        "normal_fraction": normal_fraction,
        "sites": sites,
        "generator": GENERATOR_VERSION,
    }
    if normal_sites is not None:
        params["normal_sites"] = normal_sites
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _claim_folder(out, params)
    (out / "slides").mkdir(exist_ok=True)
    (out / "truth").mkdir(exist_ok=True)

    todo = [p for p in plans if not _is_written(out, p)]
    skipped = [p.slide_id for p in plans if _is_written(out, p)]
    written: list[str] = []
    bar = tqdm(
        total=len(plans),
        desc="synth",
        unit="slide",
        disable=not progress,
        file=sys.stderr,
        initial=len(skipped),
    )
    for sid in skipped:
        if on_slide:
            on_slide(sid, "skipped")
    n_workers = workers or min(8, os.cpu_count() or 1)
    n_workers = max(1, min(n_workers, len(todo)))
    # 40x slides first, so that the long ones do not finish last
    todo.sort(key=lambda p: p.mpp)
    try:
        if n_workers == 1:
            for plan in todo:
                sid, _ = _write_plan(str(out), plan, difficulty, sites, seed)
                written.append(sid)
                bar.update()
                if on_slide:
                    on_slide(sid, "written")
        elif todo:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
                futures = [
                    pool.submit(_write_plan, str(out), p, difficulty, sites, seed) for p in todo
                ]
                for future in as_completed(futures):
                    sid, _ = future.result()
                    written.append(sid)
                    bar.update()
                    if on_slide:
                        on_slide(sid, "written")
    finally:
        bar.close()

    # tables: true fractions from the truth masks, expression from the fractions
    rows = []
    for plan in plans:
        truth = SlideTruth.load(out / "truth" / f"{plan.slide_id}.npz")
        rows.append(
            {
                "slide_id": plan.slide_id,
                "patient_id": plan.patient_id,
                "sample_type": plan.sample_type,
                "site": plan.site,
                "mpp": plan.mpp,
                "objective_power": plan.objective_power,
                "format": plan.fmt,
                "path": f"slides/{plan.file_name}",
                "tumour_fraction": round(truth.tumour_fraction, 5),
                "lymphocyte_fraction": round(truth.lymphocyte_fraction, 5),
            }
        )
    samples = [p.sample_id for p in plans]
    values, genes = expression_matrix(
        samples,
        np.array([r["tumour_fraction"] for r in rows]),
        np.array([r["lymphocyte_fraction"] for r in rows]),
        difficulty,
        seed,
    )
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(["gene", *samples])
    for (name, *_), row in zip(GENES, values, strict=True):
        writer.writerow([name, *(f"{v:.3f}" for v in row)])
    _write_atomic(out / "expression.tsv", buf.getvalue())
    _write_atomic(out / "genes.json", json.dumps(genes, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "cohort.csv", buf.getvalue())
    _write_atomic(
        out / "cohort.json",
        json.dumps(
            {
                "parameters": params,
                "complete": True,
                "histcode_version": __version__,
                "slides": [
                    {
                        "slide_id": p.slide_id,
                        "seed": p.seed,
                        "background": p.background,
                        "layout": asdict(p.layout),
                    }
                    for p in plans
                ],
            },
            indent=2,
        )
        + "\n",
    )
    return Cohort(out, params, rows, genes, written, skipped)


def describe(cohort: Cohort) -> dict[str, Any]:
    """Main figures of a cohort (for the CLI's result line)."""
    rows = cohort.slides
    tumour = [r for r in rows if r["sample_type"] == "tumour"]
    return {
        "path": str(cohort.out),
        "slides": len(rows),
        "patients": len({r["patient_id"] for r in rows}),
        "tumour_slides": len(tumour),
        "normal_slides": len(rows) - len(tumour),
        "sites": sorted({r["site"] for r in rows}),
        "sites_with_normals": sorted({r["site"] for r in rows if r["sample_type"] == "normal"}),
        "at_40x": sum(r["objective_power"] == 40 for r in rows),
        "tiff": sum(r["format"] == "tiff" for r in rows),
        "genes": len(cohort.genes),
        "mean_tumour_fraction": round(float(np.mean([r["tumour_fraction"] for r in tumour])), 4)
        if tumour
        else 0.0,
        "difficulty": cohort.params["difficulty"],
        "written": len(cohort.written),
        "skipped": len(cohort.skipped),
    }


def read_gene_roles(path: Path) -> dict[str, str]:
    """Each gene's role from a cohort's ``genes.json`` (as :func:`make_cohort` writes it,
    ``{gene: {"role": …}}``, or another generator's ``{gene: role}``); empty when the file
    does not exist (a cohort of your own)."""
    if not path.is_file():
        return {}
    return {
        g: str(v["role"] if isinstance(v, dict) else v)
        for g, v in json.loads(path.read_text()).items()
    }
