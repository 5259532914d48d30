"""build a TCGA cohort table and a clean expression matrix from downloaded slides and RNA-seq.

``histcode cohort --slides SLIDES --expression SOURCE [--sample_sheet SHEET] --out COHORT``

``SOURCE`` is any of: a GDC "STAR - Counts" download folder (with its GDC sample sheet, given
or found in the folder), a cBioPortal ``data_mrna_seq_v2_rsem.txt``, a UCSC Xena matrix
(log2 values: ``--units log2tpm``; Ensembl rows need ``--gene_map``), or our own genes ×
samples TSV (:mod:`histcode.finetune.expression`), or an AnnData ``.h5ad`` of samples × genes
(:mod:`histcode.finetune.h5ad`, extra ``histcode[anndata]``). Slides are found under ``SLIDES`` by
extension (GDC's ``<UUID>/<barcode>.<UUID>.svs`` layout included); their id is the file stem.

``COHORT`` receives:

* ``cohort.csv`` — one row per slide: ``slide_id``, ``file``, ``slide_type`` (DX1, TS1…),
  ``patient_id``, ``sample`` (the slide's sample barcode), ``sample_type`` and its name,
  ``tumour`` (1/0), ``site`` (tissue source site, barcode characters 6–7), ``sample_id`` (the
  expression column it matched, empty when none), ``match`` (the rule that matched, or why
  none did), ``slides_of_sample`` and ``aggregation`` (slides of one sample share its targets;
  gene metrics average their predictions per sample), ``gene_targets``. It is a labels CSV:
  ``histcode finetune --labels COHORT/cohort.csv --expression COHORT/expression.tsv``.
* ``samples.csv`` — one row per expression sample: type, site, its slides, and its ``role``
  (tumour with slides, tumour without slide, **normal reference**, or normal left out of the
  reference because of its type).
* ``expression.tsv`` — genes (symbols) × samples, linear (``# units: tpm`` line: TPM, RSEM,
  FPKM or CPM as the ``# unit_detail:`` line says), tumour samples and the reference normals.
* ``cohort.json`` — the summary: slides per patient, tumour/normal counts, unmatched slides
  and samples, units, what was dropped or collapsed, and the finetune command to run next.

Nothing is written until every input has been read and checked; each file is replaced
atomically, so an error never leaves a half-written cohort.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from histcode.barcodes import SAMPLE_TYPES, SLIDE_KINDS, parse_barcode, slide_kind
from histcode.commandkit import EXIT_OK, EXIT_PARTIAL, CommandResult
from histcode.finetune.expression import (
    DUPLICATE_RULE,
    GDC_COLUMNS,
    UNITS,
    cpm,
    find_sample_sheet,
    log_scale_reason,
    read_expression,
    read_gdc_download,
    read_gene_map,
    to_linear,
)
from histcode.finetune.foldchange import column_kinds, match_slides, reference_columns
from histcode.finetune.tables import preview, table_from_slide_ids, write_atomic
from histcode.slide import SLIDE_EXTENSIONS, slide_id

log = logging.getLogger(__name__)

AGGREGATION = (
    "slides of one expression sample share its targets; gene metrics average their "
    "predictions per sample"
)


def find_slides(paths: Sequence[Path | str]) -> dict[str, Path]:
    """Slide files under ``paths`` (folders searched recursively by extension), by slide id.

    Raises:
        FileNotFoundError: a path does not exist, or no slide is found.
        ValueError: two files give one slide id (names both).
    """
    found: dict[str, Path] = {}
    clashes = []
    for given in map(Path, paths):
        if not given.exists():
            raise FileNotFoundError(f"slides: {given} does not exist")
        files = (
            sorted(p for p in given.rglob("*") if p.suffix.lower() in SLIDE_EXTENSIONS)
            if given.is_dir()
            else [given]
        )
        for f in files:
            sid = slide_id(f)
            if sid in found and found[sid] != f:
                if f.suffix.lower() == ".dcm" and found[sid].parent == f.parent:
                    continue  # the levels of one DICOM slide
                clashes.append(f"{sid}: {found[sid]} and {f}")
            found.setdefault(sid, f)
    if clashes:
        raise ValueError(
            f"several files give one slide id (the file name without extension): "
            f"{preview(clashes, 3)}; keep one copy of each slide"
        )
    if not found:
        raise FileNotFoundError(
            f"no slide under {preview(paths, 3)} (extensions {', '.join(SLIDE_EXTENSIONS)})"
        )
    return found


def load_source(
    expression: Path,
    sample_sheet: Path | None = None,
    units: str = "auto",
    log_offset: float = 1.0,
    gdc_column: str = "tpm_unstranded",
    gene_map: Path | None = None,
) -> pd.DataFrame:
    """Any expression source of the module docstring as a linear genes × samples matrix.

    Returns:
        Symbols × samples, linear; ``attrs``: ``layout``, ``units`` (``tpm``: a normalised
        linear unit), ``unit_detail``, ``notes``, ``source``.

    Raises:
        FileNotFoundError, ValueError: unreadable or log-scale input, or units that do not
            fit; the message names the file and the fix.
    """
    expression = Path(expression)
    if expression.is_dir():
        sheet = sample_sheet or find_sample_sheet(expression)
        if sheet is None:
            raise FileNotFoundError(
                f"{expression} is a folder, read as a GDC download: pass its sample sheet with "
                "--sample_sheet (gdc_sample_sheet.<date>.tsv, downloaded from the cart)"
            )
        if units not in ("auto", "tpm", "counts"):
            raise ValueError(
                f"--units {units} does not apply to a GDC download: its files are linear; the "
                f"column read (--gdc_column, one of {', '.join(GDC_COLUMNS)}) sets the units"
            )
        matrix = read_gdc_download(expression, sheet, gdc_column)
        matrix.attrs["source"] = f"{expression} (GDC STAR - Counts, sample sheet {sheet})"
        return matrix
    if sample_sheet is not None:
        raise ValueError(
            f"--sample_sheet is for a GDC download folder; {expression} is a file. Pass the "
            "download folder as --expression"
        )
    mapping = read_gene_map(gene_map) if gene_map is not None else None
    raw = read_expression(expression, mapping)
    layout, notes = raw.attrs["layout"], list(raw.attrs["notes"])
    source = f"expression matrix {expression}"
    chosen = units
    if units == "auto":
        if raw.attrs.get("units") in UNITS:  # "# units:" line, AnnData uns
            chosen = raw.attrs["units"]
        elif layout == "cbioportal" or log_scale_reason(raw):
            chosen = "tpm"  # RSEM is linear; log-looking input is refused by to_linear
        else:
            finite = raw.to_numpy()[np.isfinite(raw.to_numpy())]
            chosen = "counts" if np.array_equal(finite, np.round(finite)) else "tpm"
    linear = to_linear(raw, chosen, source, log_offset, option="--")
    if chosen == "counts":
        linear = cpm(linear, source)
        detail = "CPM of counts over gene rows"
    elif chosen == "log2tpm":
        detail = f"2^v - {log_offset:g} of log2(x + {log_offset:g}) values"
    else:
        detail = {"cbioportal": "RSEM (cBioPortal, linear)"}.get(
            layout, "as given (linear: TPM, FPKM or RSEM)"
        )
    if units == "auto":
        detail += f"; units {chosen!r} chosen by --units auto"
    matrix = linear.copy()
    matrix.attrs = {
        "layout": layout,
        "units": "tpm",
        "unit_detail": detail,
        "notes": notes,
        "source": f"{expression} ({layout})",
    }
    return matrix


@dataclass
class Cohort:
    """The tables :func:`build_cohort` makes.

    Attributes:
        slides: one row per slide (``cohort.csv``).
        samples: one row per expression sample (``samples.csv``).
        matrix: the clean genes × samples matrix (tumour samples and reference normals).
        summary: counts and lists (``cohort.json``).
    """

    slides: pd.DataFrame
    samples: pd.DataFrame
    matrix: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def build_cohort(
    slides: dict[str, Path], matrix: pd.DataFrame, normal_types: Sequence[int] = (11,)
) -> Cohort:
    """Match slides with expression samples, choose the normal reference, count.

    Args:
        slides: slide id → file (:func:`find_slides`); ids must be TCGA barcodes.
        matrix: linear genes × samples (:func:`load_source`).
        normal_types: TCGA sample types of the reference normals (default 11).

    Raises:
        ValueError: slide ids that are not TCGA barcodes or are controls (names them).
    """
    ids = sorted(slides)
    table = table_from_slide_ids(ids)
    columns = [str(c) for c in matrix.columns]
    matches = match_slides(ids, columns)
    tumour = dict(zip(ids, table["tumour"], strict=True))
    kinds = column_kinds(columns, {s: m.column for s, m in matches.items()}, tumour)
    reference, left_out = reference_columns(columns, kinds, normal_types)
    ref_set = set(reference)
    per_sample = Counter(m.column for m in matches.values() if m.column)
    rows = []
    for sid, t, site, patient in zip(
        ids, table["tumour"], table["site"], table["patient_id"], strict=True
    ):
        b, m = parse_barcode(sid), matches[sid]
        n = per_sample.get(m.column, 0) if m.column else 0
        if t != 1:
            targets = "no: normal tissue"
        elif m.column is None:
            targets = f"no: {m.how}"
        else:
            targets = "yes"
        code = slide_kind(sid)
        rows.append(
            {
                "slide_id": sid,
                "file": str(slides[sid]),
                "slide_type": f"{code} {SLIDE_KINDS.get(code[:2], '')}".strip() if code else "",
                "patient_id": patient,
                "sample": b.sample,
                "sample_type": f"{b.sample_type:02d}",
                "sample_type_name": b.sample_type_name,
                "tumour": int(t),
                "site": site,
                "sample_id": m.column or "",
                "match": m.how,
                "slides_of_sample": n,
                "aggregation": (f"per sample: mean of {n} slides" if n > 1 else "per slide")
                if m.column
                else "",
                "gene_targets": targets,
            }
        )
    slide_frame = pd.DataFrame(rows)
    slides_of: dict[str, list[str]] = {}
    for sid, m in matches.items():
        if m.column:
            slides_of.setdefault(m.column, []).append(sid)
    sample_rows, keep = [], []
    for c in columns:
        kind = kinds.get(c, "")
        entry: dict[str, Any] = {"sample_id": c, "kind": kind}
        try:
            b = parse_barcode(c)
            entry |= {
                "patient_id": b.patient,
                "sample_type": f"{b.sample_type:02d}",
                "sample_type_name": b.sample_type_name,
                "site": b.site,
            }
        except ValueError:
            entry |= {"patient_id": "", "sample_type": "", "sample_type_name": "", "site": ""}
        has = slides_of.get(c, [])
        if c in ref_set:
            role = "normal reference"
        elif kind == "normal":
            role = (
                f"left out of the reference: type {entry['sample_type']} "
                f"({entry['sample_type_name']}); --normal_types adds it"
            )
        elif kind == "tumour":
            role = "tumour with slides" if has else "tumour without slide"
        else:
            role = "unused: not a tumour or normal TCGA sample"
        entry |= {"role": role, "slides": len(has), "slide_ids": ";".join(sorted(has))}
        files = matrix.attrs.get("files", {}).get(c)
        if files is not None:
            entry["files"] = ";".join(files)
        sample_rows.append(entry)
        if c in ref_set or kind == "tumour":
            keep.append(c)
    sample_frame = pd.DataFrame(sample_rows)
    clean = matrix[keep].copy()
    clean.attrs = dict(matrix.attrs)
    unmatched = {r["slide_id"]: r["match"] for r in rows if not r["sample_id"] and r["tumour"] == 1}
    ambiguous = [r["slide_id"] for r in rows if r["match"].startswith("ambiguous")]
    per_patient = Counter(Counter(table["patient_id"]).values())
    summary = {
        "slides": len(ids),
        "patients": int(table["patient_id"].nunique()),
        "slides_per_patient": {str(k): per_patient[k] for k in sorted(per_patient)},
        "slide_types": dict(Counter(r["slide_type"].split(" ")[0][:2] or "?" for r in rows)),
        "sites": int(table["site"].nunique()),
        "tumour_slides": int((table["tumour"] == 1).sum()),
        "normal_slides": int((table["tumour"] == 0).sum()),
        "tumour_slides_with_targets": int((slide_frame["gene_targets"] == "yes").sum()),
        "tumour_slides_without_sample": unmatched,
        "ambiguous_slides": ambiguous,
        "normal_slides_without_sample": [
            r["slide_id"] for r in rows if not r["sample_id"] and r["tumour"] == 0
        ],
        "samples_with_several_slides": {c: n for c, n in per_sample.items() if n > 1},
        "aggregation": AGGREGATION,
        "expression_samples": len(columns),
        "tumour_samples": int(sum(kinds.get(c) == "tumour" for c in columns)),
        "tumour_samples_without_slide": [
            c for c in columns if kinds.get(c) == "tumour" and c not in slides_of
        ],
        "normal_types": [int(t) for t in normal_types],
        "normal_reference": reference,
        "normals_left_out": left_out,
        "genes": int(clean.shape[0]),
        "units": clean.attrs.get("units", "tpm"),
        "unit_detail": clean.attrs.get("unit_detail", ""),
        "source": clean.attrs.get("source", ""),
        "duplicate_rule": DUPLICATE_RULE,
        "notes": list(clean.attrs.get("notes", [])),
    }
    if not reference:
        summary["notes"].append(
            "no normal sample of types "
            f"{', '.join(f'{t:02d} ({SAMPLE_TYPES.get(t, t)})' for t in normal_types)}: the "
            "genes task has no reference (tumour task only)"
        )
    return Cohort(slide_frame, sample_frame, clean, summary)


def _matrix_text(matrix: pd.DataFrame) -> str:
    lines = [
        f"# units: {matrix.attrs.get('units', 'tpm')}",
        f"# unit_detail: {matrix.attrs.get('unit_detail', '')}",
        f"# source: {matrix.attrs.get('source', '')}",
        f"# genes: HGNC symbols; {DUPLICATE_RULE}",
    ]
    body = matrix.reset_index().rename(columns={matrix.index.name or "index": "gene"})
    body = body.rename(columns={body.columns[0]: "gene"})
    return "\n".join(lines) + "\n" + body.to_csv(sep="\t", index=False, float_format="%.7g")


def write_cohort(out: Path, made: Cohort) -> list[Path]:
    """Write ``expression.tsv``, ``samples.csv``, ``cohort.csv`` and ``cohort.json``."""
    out.mkdir(parents=True, exist_ok=True)
    return [
        write_atomic(out / "expression.tsv", _matrix_text(made.matrix)),
        write_atomic(out / "samples.csv", made.samples.to_csv(index=False)),
        write_atomic(out / "cohort.csv", made.slides.to_csv(index=False)),
        write_atomic(out / "cohort.json", json.dumps(made.summary, indent=2) + "\n"),
    ]


def finetune_command(out: Path, made: Cohort) -> str:
    """The ``histcode finetune`` line that uses this cohort."""
    parts = [
        "histcode finetune --config configs/finetune/deg.yaml --features FEATURES.zarr",
        f"--labels {out / 'cohort.csv'} --expression {out / 'expression.tsv'} --name NAME",
    ]
    if made.summary["normal_types"] != [11]:
        parts.append("--data.normal_types " + " ".join(map(str, made.summary["normal_types"])))
    if made.summary["tumour_slides_without_sample"]:
        parts.append("--data.strict_ids false")
    return " ".join(parts)


def cohort(
    slides: list[Path],
    expression: Path,
    out: Path,
    sample_sheet: Path | None = None,
    units: Literal["auto", "tpm", "counts", "log2tpm"] = "auto",
    log_offset: float = 1.0,
    gdc_column: Literal[
        "tpm_unstranded",
        "fpkm_unstranded",
        "fpkm_uq_unstranded",
        "unstranded",
        "stranded_first",
        "stranded_second",
    ] = "tpm_unstranded",
    gene_map: Path | None = None,
    normal_types: list[int] | None = None,
) -> CommandResult:
    """Build a TCGA cohort table (slides ↔ expression samples) and a clean expression matrix.

    Args:
        slides: slide files or folders (searched recursively, GDC's UUID folders included).
        expression: a GDC STAR-Counts download folder, a cBioPortal
            data_mrna_seq_v2_rsem.txt, a UCSC Xena matrix, or a genes × samples TSV.
        out: output folder (cohort.csv, samples.csv, expression.tsv, cohort.json).
        sample_sheet: the GDC sample sheet of a download folder (default: the one
            gdc_sample_sheet*.tsv in the folder or beside it).
        units: of a matrix file: auto (GDC and cBioPortal are linear; a matrix that looks
            log-transformed is refused; whole numbers are counts, else TPM), tpm (linear,
            used as is), counts (scaled to CPM over gene rows) or log2tpm (log2(x +
            log_offset), e.g. Xena: un-logged).
        log_offset: for log2tpm: 1 for log2(x + 1), 0.001 for Xena's log2(x + 0.001).
        gdc_column: the column of the GDC STAR-Counts files (tpm_unstranded; counts columns
            are scaled to CPM).
        gene_map: Ensembl id → symbol for a Xena Ensembl_ID matrix: the Xena probemap
            downloaded beside it, or any GDC STAR-Counts file.
        normal_types: TCGA sample types of the normal reference (default 11, solid tissue
            normal; 10 blood, 12 buccal, 13 EBV cell line, 14 bone marrow only when listed).
    """
    types = [11] if normal_types is None else list(normal_types)
    found = find_slides(slides)
    matrix = load_source(expression, sample_sheet, units, log_offset, gdc_column, gene_map)
    made = build_cohort(found, matrix, types)
    files = write_cohort(out, made)
    s = made.summary
    next_command = finetune_command(out, made)
    s["finetune"] = next_command
    write_atomic(out / "cohort.json", json.dumps(s, indent=2) + "\n")
    log.info(
        "cohort: %d slides of %d patients, %d tumour slides with targets, %d reference "
        "normals; next: %s",
        s["slides"],
        s["patients"],
        s["tumour_slides_with_targets"],
        len(s["normal_reference"]),
        next_command,
    )
    for note in s["notes"]:
        log.info("cohort: %s", note)
    if s["ambiguous_slides"]:
        log.warning(
            "%d slide(s) match several expression samples; set their sample_id in %s: %s",
            len(s["ambiguous_slides"]),
            out / "cohort.csv",
            preview(s["ambiguous_slides"]),
        )
    result = {
        "out": str(out),
        "slides": s["slides"],
        "patients": s["patients"],
        "tumour_slides": s["tumour_slides"],
        "normal_slides": s["normal_slides"],
        "tumour_slides_with_targets": s["tumour_slides_with_targets"],
        "tumour_slides_without_sample": len(s["tumour_slides_without_sample"]),
        "ambiguous_slides": len(s["ambiguous_slides"]),
        "reference_normals": len(s["normal_reference"]),
        "normals_left_out": len(s["normals_left_out"]),
        "genes": s["genes"],
        "units": s["unit_detail"],
        "finetune": next_command,
    }
    return CommandResult(
        out_dir=out,
        result=result,
        details={"files": [str(f) for f in files], "cohort": s},
        exit_code=EXIT_PARTIAL if s["ambiguous_slides"] else EXIT_OK,
    )


def main(argv: Sequence[str], prog: str = "histcode cohort") -> int:
    """``histcode cohort``."""
    from histcode.commandkit import run_function

    return run_function(cohort, argv, prog, "cohort")


__all__ = ["Cohort", "build_cohort", "cohort", "find_slides", "load_source", "write_cohort"]
