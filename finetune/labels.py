"""Slide labels: tumour vs normal, and per-gene log2 fold change against normal tissue.

Two sources, which combine:

* **A labels CSV** (any cohort): one row per slide with ``slide_id``, ``patient_id`` and
  optionally ``tumour`` (1/0, true/false, tumour/normal), ``sample_id`` (the expression column
  of the slide), ``site`` (the tissue source site, for ``--cv.group site`` and the within-site
  AUC) and ``<GENE>_log2fc`` columns (ready-made regression targets). Without a CSV the slides
  of the feature store are the rows and TCGA barcodes give patient, site and tumour status
  (:mod:`histcode.finetune.barcodes`).
* **An expression matrix** (TSV/CSV, genes × samples, TPM or raw counts): the first column
  names the gene, the others are samples (TCGA sample barcodes such as ``TCGA-S1-0001-01A``,
  or slide ids). For each gene ``g`` and tumour sample ``s``::

      log2FC[s, g] = log2((x[s, g] + pseudocount) / (mean over normal samples n of x[n, g]
                                                       + pseudocount))

  with counts first scaled to counts per million (CPM) by each sample's library size (the
  column sum over all genes of the matrix). The normal mean is over every normal sample of the
  matrix (TCGA sample types 10–19, or slides labelled normal), whether or not it has a slide:
  HistCode's fold change of each tumour against normal tissue. ``|log2FC| ≥ threshold`` gives
  the classes up / down, the rest are unchanged.

Normal slides have tumour label 0 and no differential-expression target (masked).

Every problem with the inputs — ids that do not match, genes missing from the matrix, NaN,
negative or non-numeric values, no normal samples, duplicate ids — raises a ``ValueError``
naming the offending rows, columns or ids and saying how to fix it.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.finetune.barcodes import SAMPLE_TYPES, is_tcga, parse_barcode
from histcode.finetune.expression import UNITS, cpm, read_expression, to_linear
from histcode.finetune.tables import at_lines, preview, read_table
from histcode.slide import is_safe_slide_id

log = logging.getLogger(__name__)

#: Classes of a gene's differential expression, by their integer code in :attr:`Labels.classes`.
CLASS_NAMES = {-1: "down", 0: "unchanged", 1: "up"}
#: Column-name aliases accepted in a labels CSV (lower case) → canonical name.
_ALIASES = {
    "slide_id": ("slide_id", "slide", "slide_name", "slide_barcode", "id"),
    "patient_id": ("patient_id", "patient", "case_id", "case", "case_submitter_id"),
    "tumour": (
        "tumour",
        "tumor",
        "is_tumour",
        "is_tumor",
        "label",
        "tumour_label",
        "tissue",
        "sample_type",
    ),
    "sample_id": ("sample_id", "sample", "sample_barcode"),
    "site": ("site", "site_id", "tss", "tissue_source_site"),
}
_TRUE = {"1", "1.0", "true", "yes", "tumour", "tumor", "cancer", "t"}
_FALSE = {"0", "0.0", "false", "no", "normal", "n"}
LOG2FC_SUFFIX = "_log2fc"


_at_lines = at_lines


# -- gene lists ---------------------------------------------------------------------------------


def read_gene_list(path: Path | str) -> list[str]:
    """Genes from a text file: one symbol per line; ``#`` starts a comment; blank lines skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file names no gene, or a gene twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"gene list {path} does not exist; pass a text file, one gene a line"
        )
    return _parse_gene_lines(path.read_text(encoding="utf-8").splitlines(), str(path))


def default_genes() -> list[str]:
    """The driver and immune genes shipped with histcode (``finetune/data/driver_genes.txt``)."""
    text = resources.files("histcode.finetune").joinpath("data/driver_genes.txt").read_text("utf-8")
    return _parse_gene_lines(text.splitlines(), "driver_genes.txt")


def _parse_gene_lines(lines: Sequence[str], source: str) -> list[str]:
    genes = [line.split("#")[0].strip() for line in lines]
    genes = [g for g in genes if g]
    if not genes:
        raise ValueError(f"{source} names no gene; write one gene symbol a line")
    dupes = sorted({g for g in genes if genes.count(g) > 1})
    if dupes:
        raise ValueError(
            f"{source} names genes more than once: {preview(dupes)}; remove the repeats"
        )
    return genes


def resolve_genes(
    available: Sequence[str],
    genes: Sequence[str] | None = None,
    source: str = "the expression matrix",
    asked: str = "the gene list",
) -> list[str]:
    """Which genes to model.

    Args:
        available: genes that have data (rows of the matrix, or ``<GENE>_log2fc`` columns).
        genes: the genes asked for; ``None`` means the default driver list, of which only the
            available genes are kept.
        source: where ``available`` comes from, for messages.
        asked: where ``genes`` come from (an option or a file), for messages.

    Returns:
        The genes, in the order asked for.

    Raises:
        ValueError: an asked-for gene is missing (lists them with close matches), or none of
            the default genes is available.
    """
    have = set(available)
    if genes is None:
        chosen = [g for g in default_genes() if g in have]
        if not chosen:
            raise ValueError(
                f"none of the {len(default_genes())} default driver genes is in {source} (it has "
                f"{preview(sorted(have))}). Gene rows must be HGNC symbols such as TP53; pass "
                "your genes with --data.genes or --data.genes_file."
            )
        log.info("%d of the default driver genes are in %s", len(chosen), source)
        return chosen
    genes = list(genes)
    if not genes:
        raise ValueError("the gene list is empty; name at least one gene or leave it unset")
    dupes = sorted({g for g in genes if genes.count(g) > 1})
    if dupes:
        raise ValueError(f"genes asked for more than once: {preview(dupes)}")
    missing = [g for g in genes if g not in have]
    if missing:
        hints = []
        for g in missing[:8]:
            close = difflib.get_close_matches(g, have, n=2, cutoff=0.6)
            hints.append(f"{g} (did you mean {' or '.join(close)}?)" if close else g)
        raise ValueError(
            f"{len(missing)} gene(s) are not in {source}: {', '.join(hints)}"
            f"{' …' if len(missing) > 8 else ''}. Remove them from {asked}, or use a matrix that "
            "has them."
        )
    return genes


# -- reading tables -----------------------------------------------------------------------------


def read_label_table(path: Path | str) -> pd.DataFrame:
    """Read a labels CSV into canonical columns.

    Accepted columns (case-insensitive; aliases in brackets): ``slide_id`` (slide, id) required;
    ``patient_id`` (patient, case_id) required unless the slide ids are TCGA barcodes;
    ``tumour`` (tumor, label, tissue, sample_type) as 1/0, true/false, tumour/normal or a
    TCGA sample type code (01–09 tumour, 10–19 normal); ``sample_id``
    (the slide's expression column); ``site`` (site_id, tss, tissue_source_site: the tissue
    source site; empty cells of TCGA slides are read from the barcode, characters 6–7);
    ``<GENE>_log2fc`` numeric targets. Other columns are ignored.

    Returns:
        A frame with ``slide_id``, ``patient_id``, ``tumour`` (float 1/0/NaN), ``sample_id``
        (str or ``""``), ``site`` (str, ``""`` when unknown) and any ``<GENE>_log2fc`` (float)
        columns, one row per slide.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no slide column, duplicate or empty slide ids, missing patient ids,
            unreadable tumour labels or non-numeric log2FC; names the rows.
    """
    path = Path(path)
    raw = read_table(path, "labels file")
    by_lower = {c.lower(): c for c in raw.columns}
    found = {}
    for canon, aliases in _ALIASES.items():
        found[canon] = next((by_lower[a] for a in aliases if a in by_lower), None)
    if found["slide_id"] is None:
        raise ValueError(
            f"labels file {path} has no slide column (columns: {preview(raw.columns)}); name "
            "one 'slide_id' (the slide file's stem)"
        )
    out = pd.DataFrame({"slide_id": raw[found["slide_id"]].str.strip()})
    line = pd.Series(np.arange(len(raw)) + raw.attrs["first_line"], index=raw.index)
    empty = out["slide_id"] == ""
    if empty.any():
        raise ValueError(f"labels file {path}: empty slide_id on lines {preview(line[empty])}")
    unsafe = ~out["slide_id"].map(is_safe_slide_id)
    if unsafe.any():
        shown = _at_lines(out["slide_id"][unsafe].map(repr), line)
        raise ValueError(
            f"labels file {path}: slide ids that are not slide file names: {preview(shown)}. "
            "A slide id is a slide file's name without extension (no '/', '\\', and not "
            "starting with '.'); fix those rows."
        )
    dupes = out["slide_id"].duplicated(keep=False)
    if dupes.any():
        shown = _at_lines(out["slide_id"][dupes], line)
        raise ValueError(
            f"labels file {path} lists slides more than once: {preview(shown)}; keep one row "
            "per slide"
        )
    if found["patient_id"] is not None:
        out["patient_id"] = raw[found["patient_id"]].str.strip()
    else:
        out["patient_id"] = ""
    missing = out["patient_id"] == ""
    if missing.any():
        fill = [parse_barcode(s).patient if is_tcga(s) else "" for s in out["slide_id"][missing]]
        out.loc[missing, "patient_id"] = fill
        still = out["patient_id"] == ""
        if still.any():
            shown = _at_lines(out["slide_id"][still], line)
            raise ValueError(
                f"labels file {path}: no patient id for {preview(shown)}. Add a 'patient_id' "
                "column (slides of one patient must share it so that no patient is in two "
                "folds)."
            )
    out["tumour"] = np.nan
    if found["tumour"] is not None:
        text = raw[found["tumour"]].str.strip().str.lower()
        value = pd.Series(np.nan, index=raw.index)
        value[text.isin(_TRUE)] = 1.0
        value[text.isin(_FALSE)] = 0.0
        code = pd.to_numeric(text.where(text.str.fullmatch(r"\d\d")), errors="coerce")
        value[(code >= 1) & (code <= 9)] = 1.0  # TCGA sample type codes 01-09, 10-19
        value[(code >= 10) & (code <= 19)] = 0.0
        bad = value.isna() & ~text.isin({"", "na", "nan"})
        if bad.any():
            given = raw[found["tumour"]][bad].map(repr)
            shown = _at_lines(out["slide_id"][bad] + "=" + given, line)
            raise ValueError(
                f"labels file {path}: column {found['tumour']!r} must be 1/0, true/false, "
                f"tumour/normal or a TCGA sample type (01-19); got {preview(shown, 6)}"
            )
        out["tumour"] = value.to_numpy()
    unknown = out["tumour"].isna()
    if unknown.any():  # TCGA ids say it themselves
        kinds = [parse_barcode(s).kind if is_tcga(s) else "" for s in out["slide_id"][unknown]]
        out.loc[unknown, "tumour"] = [
            1.0 if k == "tumour" else 0.0 if k == "normal" else np.nan for k in kinds
        ]
    out["sample_id"] = raw[found["sample_id"]].str.strip() if found["sample_id"] else ""
    out["site"] = raw[found["site"]].str.strip() if found["site"] else ""
    no_site = out["site"] == ""
    if no_site.any():  # TCGA ids say it themselves
        out.loc[no_site, "site"] = [
            parse_barcode(s).site if is_tcga(s) else "" for s in out["slide_id"][no_site]
        ]
    for col in raw.columns:
        if col.lower().endswith(LOG2FC_SUFFIX) and len(col) > len(LOG2FC_SUFFIX):
            gene = col[: -len(LOG2FC_SUFFIX)]
            text = raw[col].str.strip()
            values = pd.to_numeric(text.replace({"": "nan", "NA": "nan"}), errors="coerce")
            bad = values.isna() & ~text.str.lower().isin({"", "na", "nan"})
            bad |= np.isinf(values)
            if bad.any():
                shown = _at_lines(out["slide_id"][bad], line)
                raise ValueError(
                    f"labels file {path}: column {col!r} must hold finite numbers (empty for "
                    f"no target); bad values for {preview(shown, 6)}"
                )
            out[f"{gene}{LOG2FC_SUFFIX}"] = values.to_numpy(np.float64)
    return out.reset_index(drop=True)


def table_from_slide_ids(slide_ids: Sequence[str]) -> pd.DataFrame:
    """A labels table from TCGA slide ids alone: patient, site and tumour status from the
    barcode.

    Raises:
        ValueError: some ids are not TCGA barcodes, or are controls (sample types 20–29);
            names them and says to pass a labels CSV.
    """
    not_tcga = [s for s in slide_ids if not is_tcga(s)]
    if not_tcga:
        raise ValueError(
            f"slide ids are not TCGA barcodes, so patient and tumour status cannot be read from "
            f"them: {preview(not_tcga)}. Pass --labels a CSV with slide_id, patient_id and "
            "tumour columns."
        )
    parsed = [parse_barcode(s) for s in slide_ids]
    controls = [b.barcode for b in parsed if b.kind == "control"]
    if controls:
        raise ValueError(
            f"slides with TCGA control sample types (20–29) are neither tumour nor normal: "
            f"{preview(controls)}. Pass --labels a CSV listing the slides to use."
        )
    return pd.DataFrame(
        {
            "slide_id": list(slide_ids),
            "patient_id": [b.patient for b in parsed],
            "tumour": [1.0 if b.is_tumour else 0.0 for b in parsed],
            "sample_id": "",
            "site": [b.site for b in parsed],
        }
    )


# -- expression → targets -----------------------------------------------------------------------


@dataclass(frozen=True)
class SampleMatch:
    """How a slide found its expression column, or why it found none.

    Attributes:
        column: the expression column, or ``None``.
        how: the rule that matched (``sample_id given``, ``slide id``, ``same sample``,
            ``sample without vial``, ``diagnostic slide (vial Z): the only … sample``) or why
            none did (``no expression sample …``, ``ambiguous: …``).
        candidates: the columns that made the match ambiguous.
    """

    column: str | None
    how: str
    candidates: tuple[str, ...] = ()


def match_slides(
    slide_ids: Sequence[str], columns: Sequence[str], explicit: Mapping[str, str] | None = None
) -> dict[str, SampleMatch]:
    """Map each slide to its expression column, saying how (see :func:`match_samples`).

    A slide matches the column equal to its ``sample_id`` (when given), else the column equal
    to the slide id, else by TCGA sample: the column of the same 16-character sample
    (``TCGA-XX-XXXX-01A``), else a 15-character column without vial (``TCGA-XX-XXXX-01``). A
    diagnostic slide's vial is the placeholder ``Z`` (``TCGA-XX-XXXX-01Z-00-DX1``): it matches
    the one column of its patient and sample type, whatever its vial; with several (``01A`` and
    ``01B``) the match is ambiguous and ``candidates`` lists them. Upper or lower case does not
    matter.

    Returns:
        slide id → :class:`SampleMatch`.
    """
    explicit = dict(explicit or {})
    cols = set(columns)
    by_sample: dict[str, list[str]] = {}
    by_sample15: dict[str, list[str]] = {}
    for c in columns:
        if is_tcga(c):
            b = parse_barcode(c)
            if b.vial:
                by_sample.setdefault(b.sample, []).append(c)
            by_sample15.setdefault(b.sample_no_vial, []).append(c)
    out: dict[str, SampleMatch] = {}
    for sid in slide_ids:
        given = explicit.get(sid, "")
        if given:
            how = "sample_id given" if given in cols else f"sample_id {given} is not a column"
            out[sid] = SampleMatch(given if given in cols else None, how)
            continue
        if sid in cols:
            out[sid] = SampleMatch(sid, "slide id")
            continue
        if not is_tcga(sid):
            out[sid] = SampleMatch(None, "not a TCGA barcode and not a column")
            continue
        b = parse_barcode(sid)
        vial = b.rna_vial  # "" for a diagnostic slide's placeholder Z
        hits = by_sample.get(b.sample, []) if vial else []
        how = "same sample"
        if not hits:
            same_type = by_sample15.get(b.sample_no_vial, [])
            # a column without vial matches any vial; one with another vial does not
            hits = [c for c in same_type if not vial or parse_barcode(c).vial in ("", vial)]
            if vial:
                how = "sample without vial"
            elif b.vial == "Z":
                how = (
                    f"diagnostic slide (vial Z): the only {b.sample_type:02d} sample of the patient"
                )
            else:
                how = f"the only {b.sample_type:02d} sample of the patient"
        if len(hits) == 1:
            out[sid] = SampleMatch(hits[0], how)
        elif hits:
            out[sid] = SampleMatch(
                None,
                f"ambiguous: {', '.join(sorted(hits))}; set sample_id to one of them",
                tuple(sorted(hits)),
            )
        else:
            out[sid] = SampleMatch(
                None,
                f"no expression sample {b.sample_no_vial}{vial or ''}"
                f"{'' if vial else ' (any vial)'}",
            )
    return out


def match_samples(
    slide_ids: Sequence[str], columns: Sequence[str], explicit: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """Map each slide to its expression column (rules: :func:`match_slides`).

    Returns:
        slide id → column, or None when no column matches.

    Raises:
        ValueError: a given ``sample_id`` is not a column, or a slide matches several columns
            (two aliquots of one sample, or a diagnostic slide of a patient with two samples of
            its type); names them.
    """
    matches = match_slides(slide_ids, columns, explicit)
    explicit = dict(explicit or {})
    unknown = [
        f"{sid} → {explicit[sid]}"
        for sid, m in matches.items()
        if explicit.get(sid) and m.column is None
    ]
    ambiguous = [f"{sid} → {', '.join(m.candidates)}" for sid, m in matches.items() if m.candidates]
    if unknown:
        raise ValueError(
            f"sample_id of these slides is not a column of the expression matrix: "
            f"{preview(unknown)}; fix the sample_id column or the matrix"
        )
    if ambiguous:
        raise ValueError(
            f"slides match several expression columns (aliquots of one sample, or a diagnostic "
            f"slide whose patient has several samples of its type): {preview(ambiguous, 5)}. "
            "Keep one column per sample, or set sample_id per slide in the labels CSV."
        )
    return {sid: m.column for sid, m in matches.items()}


def _check_values(values: pd.DataFrame, source: str) -> None:
    """Refuse NaN and negative values in the part of the matrix that is used."""
    arr = values.to_numpy()
    for what, bad, fix in (
        (
            "missing or infinite (NaN/empty/inf)",
            ~np.isfinite(arr),
            "fill them, or drop those genes or samples",
        ),
        (
            "negative",
            arr < 0,
            "TPM and counts are ≥ 0; pass linear (not log-transformed) expression",
        ),
    ):
        if bad.any():
            rows, cols = np.nonzero(bad)
            cells = [
                f"{values.index[r]}/{values.columns[c]}" for r, c in zip(rows, cols, strict=True)
            ]
            genes = sorted({values.index[r] for r in rows})
            raise ValueError(
                f"{source} has {bad.sum()} {what} value(s) (gene/sample): {preview(cells, 6)}; "
                f"genes {preview(genes, 6)}. {fix[0].upper()}{fix[1:]}."
            )


def expression_log2fc(
    expression: pd.DataFrame,
    genes: Sequence[str],
    tumour_samples: Sequence[str],
    normal_samples: Sequence[str],
    units: str = "tpm",
    pseudocount: float = 1.0,
    source: str = "expression matrix",
    log_offset: float = 1.0,
) -> pd.DataFrame:
    """Log2 fold change of each tumour sample against the mean of the normal samples.

    Args:
        expression: genes × samples (:func:`read_expression`).
        genes: the genes (rows) to compute.
        tumour_samples: columns of tumour samples, one row of the result each.
        normal_samples: columns of normal samples, averaged as the reference.
        units: ``tpm`` (used as is; also FPKM, RSEM or any normalised linear unit),
            ``counts`` (scaled to CPM by each sample's sum over the gene rows; count-summary
            rows such as ``N_unmapped`` are left out) or ``log2tpm`` (``log2(x + log_offset)``,
            un-logged first). ``tpm`` and ``counts`` are refused when the whole matrix looks
            log-transformed (:func:`histcode.finetune.expression.to_linear`).
        pseudocount: added to tumour and normal-mean values before the ratio.
        source: for messages.
        log_offset: see ``units``.

    Returns:
        Tumour samples × genes, float64.

    Raises:
        ValueError: no normal samples, unknown units, a negative pseudocount, log-looking
            values given as linear, or NaN / negative values in the used rows and columns
            (named).
    """
    if units not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}; got {units!r}")
    if not pseudocount >= 0:
        raise ValueError(f"pseudocount must be ≥ 0 (e.g. 1.0), got {pseudocount!r}")
    if not len(normal_samples):
        raise ValueError(
            f"{source} has no normal samples (TCGA sample types 10–19, or slides labelled normal) "
            f"among its {expression.shape[1]} columns ({preview(expression.columns, 5)}): fold "
            "change against normal tissue needs at least one. Add normal samples, or give "
            "ready-made targets as <GENE>_log2fc columns of the labels CSV."
        )
    used = list(dict.fromkeys([*tumour_samples, *normal_samples]))
    linear = to_linear(expression, units, source, log_offset)
    if units == "counts":
        _check_values(linear[used], source)
        scaled = cpm(linear[used], source).loc[list(genes)]
    else:
        scaled = linear.loc[list(genes), used]
        _check_values(scaled, source)
    normal_mean = scaled[list(normal_samples)].mean(axis=1)
    tumour = scaled[list(tumour_samples)]
    if pseudocount == 0 and ((tumour == 0).to_numpy().any() or (normal_mean == 0).any()):
        raise ValueError(
            f"{source}: zero expression with pseudocount 0 gives an infinite fold change; use "
            "a pseudocount > 0 (e.g. 1.0)"
        )
    ratio = (tumour + pseudocount).div(normal_mean + pseudocount, axis=0)
    return np.log2(ratio).T.astype(np.float64)


def classify(log2fc: np.ndarray, threshold: float) -> np.ndarray:
    """Classes of log2 fold changes: 1 up (≥ threshold), -1 down (≤ -threshold), 0 unchanged.

    NaN (no target) gives 0; use the target mask to tell them apart.
    """
    if not threshold > 0:
        raise ValueError(
            f"threshold must be a positive log2 fold change (e.g. 1.0), got {threshold}"
        )
    out = np.zeros(np.shape(log2fc), np.int8)
    with np.errstate(invalid="ignore"):
        out[np.asarray(log2fc) >= threshold] = 1
        out[np.asarray(log2fc) <= -threshold] = -1
    return out


# -- Labels -------------------------------------------------------------------------------------


@dataclass
class Labels:
    """Targets of a cohort's slides, aligned by row.

    Attributes:
        slide_ids: (n,) slide ids (feature-store group names).
        patient_ids: (n,) patient of each slide; folds never split a patient.
        sample_ids: (n,) the expression sample (or slide) whose targets each slide carries;
            slides of one sample share targets.
        tumour: (n,) float32, 1 tumour, 0 normal, NaN unknown.
        genes: (G,) gene symbols.
        log2fc: (n, G) float32 log2 fold change against normal tissue; NaN where a slide has
            no target (normal slides, missing expression).
        threshold: ``|log2FC| ≥ threshold`` is up / down.
        warnings: what was dropped or masked while building the labels.
        sites: (n,) tissue source site of each slide (TCGA barcode characters 6–7, or the
            labels CSV's ``site`` column); ``""`` where unknown. ``None`` means unknown for
            every slide.
        reference: the normal expression samples whose mean is the reference of every fold
            change (empty without an expression matrix).
    """

    slide_ids: list[str]
    patient_ids: list[str]
    sample_ids: list[str]
    tumour: np.ndarray
    genes: list[str] = field(default_factory=list)
    log2fc: np.ndarray | None = None
    threshold: float = 1.0
    warnings: list[str] = field(default_factory=list)
    sites: list[str] | None = None
    reference: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.slide_ids)
        self.sites = [""] * n if self.sites is None else [str(s) for s in self.sites]
        if len(self.sites) != n:
            raise ValueError("sites must have one entry per slide")
        self.tumour = np.asarray(self.tumour, np.float32).reshape(n)
        if self.log2fc is None:
            self.log2fc = np.full((n, len(self.genes)), np.nan, np.float32)
        self.log2fc = np.asarray(self.log2fc, np.float32).reshape(n, len(self.genes))
        if not (len(self.patient_ids) == len(self.sample_ids) == n):
            raise ValueError("slide_ids, patient_ids and sample_ids must have one entry per slide")
        if len(set(self.slide_ids)) != n:
            dupes = sorted({s for s in self.slide_ids if self.slide_ids.count(s) > 1})
            raise ValueError(f"slides listed more than once: {preview(dupes)}")
        classify(np.zeros(1), self.threshold)  # validates the threshold

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def tumour_mask(self) -> np.ndarray:
        """(n,) bool: the slide has a tumour label."""
        return ~np.isnan(self.tumour)

    @property
    def gene_mask(self) -> np.ndarray:
        """(n, G) bool: the slide has a log2FC target for the gene."""
        return ~np.isnan(self.log2fc)

    @property
    def classes(self) -> np.ndarray:
        """(n, G) int8: 1 up, -1 down, 0 unchanged (meaningless where :attr:`gene_mask` is off)."""
        return classify(self.log2fc, self.threshold)

    def class_names(self) -> np.ndarray:
        """(n, G) object: ``up`` / ``down`` / ``unchanged``, ``""`` without target."""
        names = np.vectorize(CLASS_NAMES.get, otypes=[object])(self.classes)
        names[~self.gene_mask] = ""
        return names

    def index(self, slide_ids: Sequence[str]) -> np.ndarray:
        """Row positions of ``slide_ids``."""
        where = {s: i for i, s in enumerate(self.slide_ids)}
        missing = [s for s in slide_ids if s not in where]
        if missing:
            raise KeyError(f"slides without labels: {preview(missing)}")
        return np.array([where[s] for s in slide_ids], dtype=np.int64)

    def subset(self, rows: Sequence[int] | np.ndarray) -> Labels:
        """The labels of rows ``rows`` (positions), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return Labels(
            slide_ids=[self.slide_ids[i] for i in rows],
            patient_ids=[self.patient_ids[i] for i in rows],
            sample_ids=[self.sample_ids[i] for i in rows],
            tumour=self.tumour[rows],
            genes=list(self.genes),
            log2fc=self.log2fc[rows],
            threshold=self.threshold,
            warnings=list(self.warnings),
            sites=[self.sites[i] for i in rows],
            reference=list(self.reference),
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per slide: ids, ``site``, ``tumour``, and ``<GENE>_log2fc`` /
        ``<GENE>_class``."""
        frame = pd.DataFrame(
            {
                "slide_id": self.slide_ids,
                "patient_id": self.patient_ids,
                "sample_id": self.sample_ids,
                "site": self.sites,
                "tumour": self.tumour,
            }
        )
        names = self.class_names()
        for j, g in enumerate(self.genes):
            frame[f"{g}{LOG2FC_SUFFIX}"] = self.log2fc[:, j]
            frame[f"{g}_class"] = names[:, j]
        return frame


def build_labels(
    table: pd.DataFrame,
    expression: pd.DataFrame | None = None,
    genes: Sequence[str] | None = None,
    threshold: float = 1.0,
    units: str = "tpm",
    pseudocount: float = 1.0,
    strict: bool = True,
    with_genes: bool = True,
    source: str = "expression matrix",
    genes_source: str = "the gene list",
    normal_types: Sequence[int] = (11,),
    log_offset: float = 1.0,
) -> Labels:
    """Labels from a labels table and, for gene targets, an expression matrix.

    Args:
        table: from :func:`read_label_table` or :func:`table_from_slide_ids`.
        expression: from :func:`read_expression`; ``None`` uses the table's ``<GENE>_log2fc``
            columns (if any) as targets.
        genes: genes to model; ``None`` is the default driver list ∩ what the data has.
        threshold: log2FC threshold of the up / down classes.
        units: ``tpm``, ``counts`` or ``log2tpm`` (see :func:`expression_log2fc`).
        pseudocount: see :func:`expression_log2fc`.
        strict: tumour slides without an expression column are an error (``False``: a warning,
            and their gene targets are masked).
        with_genes: build gene targets (the ``genes`` task); ``False`` gives tumour labels only.
        source: name of the expression matrix, for messages.
        genes_source: where ``genes`` come from (an option or a file), for messages.
        normal_types: TCGA sample types of the normal columns that form the reference
            (default solid tissue normal, 11); normal columns of other types (10 blood, 12
            buccal, 13 EBV cell line, 14 bone marrow) are left out, with a warning. Columns
            that are not TCGA barcodes are normal when their slides are labelled normal.
        log_offset: for ``units="log2tpm"`` (see :func:`expression_log2fc`).

    Raises:
        ValueError: see the module docstring; every message names the offending ids.
    """
    slide_ids = table["slide_id"].tolist()
    tumour = table["tumour"].to_numpy(np.float64)
    samples = [s or sid for s, sid in zip(table["sample_id"], slide_ids, strict=True)]
    warnings: list[str] = []
    targets = np.zeros((len(table), 0))
    chosen: list[str] = []
    csv_genes = [c[: -len(LOG2FC_SUFFIX)] for c in table.columns if c.endswith(LOG2FC_SUFFIX)]
    reference: list[str] = []
    if with_genes and expression is not None:
        _check_recorded_units(expression, units, source)
        chosen = resolve_genes(expression.index.tolist(), genes, source, genes_source)
        explicit = {sid: s for sid, s in zip(slide_ids, table["sample_id"], strict=True) if s}
        mapping = match_samples(slide_ids, expression.columns.tolist(), explicit)
        samples = [mapping[sid] or (explicit.get(sid) or sid) for sid in slide_ids]
        kinds = _column_kinds(
            expression.columns, mapping, dict(zip(slide_ids, tumour, strict=True))
        )
        unlabelled_tumour = [
            sid for sid, t in zip(slide_ids, tumour, strict=True) if np.isnan(t) and mapping[sid]
        ]
        if unlabelled_tumour:
            raise ValueError(
                f"slides without a tumour/normal label: {preview(unlabelled_tumour)}; add a "
                "'tumour' column (1/0) to the labels CSV"
            )
        tumour_slides = [sid for sid, t in zip(slide_ids, tumour, strict=True) if t == 1]
        unmatched = [sid for sid in tumour_slides if mapping[sid] is None]
        if tumour_slides and len(unmatched) == len(tumour_slides):
            raise ValueError(
                f"no tumour slide matches a column of the {source}: slides "
                f"{preview(unmatched, 4)}; columns {preview(expression.columns, 4)}. Columns "
                "must be TCGA sample barcodes (TCGA-XX-XXXX-01A) or slide ids, or set sample_id "
                "per slide in the labels CSV."
            )
        if unmatched:
            message = (
                f"{len(unmatched)} tumour slide(s) have no column in the {source}: "
                f"{preview(unmatched)}"
            )
            if strict:
                raise ValueError(
                    f"{message}. Add their samples to the matrix, drop them from the labels, or "
                    "set --data.strict_ids false to keep them for the tumour task only."
                )
            log.warning("%s; their gene targets are masked", message)
            warnings.append(message)
        tumour_cols = sorted({mapping[s] for s in tumour_slides if mapping[s]})
        normal_cols, left_out = _reference_columns(expression.columns, kinds, normal_types)
        if left_out:
            message = (
                f"{len(left_out)} normal sample(s) of types other than "
                f"{', '.join(f'{t:02d}' for t in normal_types)} are left out of the fold-change "
                f"reference: {preview(left_out, 4)}. Pass --data.normal_types with their types "
                "to include them."
            )
            log.warning(message)
            warnings.append(message)
        reference = normal_cols
        if len(normal_cols) < 3 and normal_cols:
            message = f"only {len(normal_cols)} normal sample(s) form the fold-change reference"
            log.warning(message)
            warnings.append(message)
        fc = expression_log2fc(
            expression, chosen, tumour_cols, normal_cols, units, pseudocount, source, log_offset
        )
        targets = np.full((len(table), len(chosen)), np.nan)
        for i, sid in enumerate(slide_ids):
            if tumour[i] == 1 and mapping[sid]:
                targets[i] = fc.loc[mapping[sid]].to_numpy()
    elif with_genes and csv_genes:
        chosen = resolve_genes(
            csv_genes, genes, "the labels CSV's <GENE>_log2fc columns", genes_source
        )
        targets = table[[f"{g}{LOG2FC_SUFFIX}" for g in chosen]].to_numpy(np.float64)
        normal_with = [
            sid
            for sid, t, row in zip(slide_ids, tumour, targets, strict=True)
            if t == 0 and not np.isnan(row).all()
        ]
        if normal_with:
            message = (
                f"log2FC targets of normal slides are ignored (normal tissue has no "
                f"differential expression target): {preview(normal_with)}"
            )
            log.warning(message)
            warnings.append(message)
            targets[tumour == 0] = np.nan
    elif with_genes:
        raise ValueError(
            "the genes task needs targets: pass --expression (a genes × samples matrix) or "
            "<GENE>_log2fc columns in the labels CSV; or drop 'genes' from --data.tasks"
        )
    return Labels(
        slide_ids=slide_ids,
        patient_ids=table["patient_id"].tolist(),
        sample_ids=samples,
        tumour=tumour,
        genes=chosen,
        log2fc=targets,
        threshold=threshold,
        warnings=warnings,
        sites=table["site"].tolist() if "site" in table else None,
        reference=reference,
    )


def _check_recorded_units(expression: pd.DataFrame, units: str, source: str) -> None:
    """Refuse units that contradict a matrix's own ``# units:`` line (``histcode cohort``)."""
    recorded = expression.attrs.get("units")
    if recorded in ("tpm", "counts") and units != recorded:
        raise ValueError(
            f"{source} says its units are {recorded!r} (its '# units:' line), but "
            f"--data.units is {units!r}; pass --data.units {recorded}"
        )


def _reference_columns(
    columns: Sequence[str], kinds: Mapping[str, str], normal_types: Sequence[int]
) -> tuple[list[str], list[str]]:
    """Normal columns that form the reference, and those left out (``col (type name)``)."""
    types = {int(t) for t in normal_types}
    bad = sorted(t for t in types if not 10 <= t <= 19)
    if bad or not types:
        raise ValueError(
            f"normal_types must be TCGA normal sample types (10–19, e.g. [11]); got {sorted(types)}"
        )
    used, left_out = [], []
    for c in columns:
        if kinds.get(c) != "normal":
            continue
        if not is_tcga(c) or parse_barcode(c).sample_type in types:
            used.append(c)
        else:
            code = parse_barcode(c).sample_type
            left_out.append(f"{c} ({code:02d} {SAMPLE_TYPES.get(code, '')})".replace(" )", ")"))
    return used, left_out


def _column_kinds(
    columns: Sequence[str], mapping: Mapping[str, str | None], tumour: Mapping[str, float]
) -> dict[str, str]:
    """Tumour / normal status of expression columns: TCGA barcode, else the slides' labels."""
    kinds: dict[str, str] = {}
    for c in columns:
        if is_tcga(c):
            kinds[c] = parse_barcode(c).kind
    conflicts = []
    for sid, col in mapping.items():
        if col is None or np.isnan(tumour[sid]):
            continue
        kind = "tumour" if tumour[sid] == 1 else "normal"
        if kinds.setdefault(col, kind) != kind:
            conflicts.append(f"{sid} ({kind}) → {col} ({kinds[col]})")
    if conflicts:
        raise ValueError(
            f"slides labelled differently from their expression sample: {preview(conflicts, 5)}; "
            "fix the tumour column of the labels CSV"
        )
    return kinds


def load_labels(
    labels: Path | str | None,
    expression: Path | str | None,
    slide_ids: Sequence[str],
    genes: Sequence[str] | None = None,
    threshold: float = 1.0,
    units: str = "tpm",
    pseudocount: float = 1.0,
    strict: bool = True,
    with_genes: bool = True,
    normal_types: Sequence[int] = (11,),
    log_offset: float = 1.0,
) -> Labels:
    """Read labels from files (see :func:`build_labels`).

    Args:
        labels: a labels CSV, or ``None`` to label ``slide_ids`` from their TCGA barcodes.
        expression: an expression matrix, or ``None``.
        slide_ids: the slides with features (used when ``labels`` is ``None``).
        genes, threshold, units, pseudocount, strict, with_genes, normal_types, log_offset:
            see :func:`build_labels`.
    """
    table = read_label_table(labels) if labels is not None else table_from_slide_ids(slide_ids)
    matrix = read_expression(expression) if expression is not None and with_genes else None
    source = f"expression matrix {expression}" if expression is not None else "expression matrix"
    return build_labels(
        table,
        matrix,
        genes,
        threshold,
        units,
        pseudocount,
        strict,
        with_genes,
        source,
        normal_types=normal_types,
        log_offset=log_offset,
    )


__all__ = [
    "CLASS_NAMES",
    "LOG2FC_SUFFIX",
    "Labels",
    "SampleMatch",
    "build_labels",
    "classify",
    "default_genes",
    "expression_log2fc",
    "load_labels",
    "match_samples",
    "match_slides",
    "preview",
    "read_expression",
    "read_gene_list",
    "read_label_table",
    "resolve_genes",
    "table_from_slide_ids",
]
