"""Expression → targets: which expression column is a slide's, and each tumour sample's log2
fold change against the mean of the normal reference samples.

For each gene ``g`` and tumour sample ``s``::

    log2FC[s, g] = log2((x[s, g] + pseudocount) / (mean over normal samples n of x[n, g]
                                                     + pseudocount))

with counts first scaled to counts per million (CPM) by each sample's library size. The
reference is every normal sample of the matrix of the chosen types (solid tissue normal, 11,
by default), whether or not it has a slide. ``|log2FC| ≥ threshold`` gives the classes up /
down, the rest are unchanged. Reading the matrices themselves is
:mod:`histcode.finetune.expression`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from histcode.barcodes import SAMPLE_TYPES, is_tcga, parse_barcode
from histcode.finetune.expression import UNITS, cpm, to_linear
from histcode.finetune.tables import preview

#: Classes of a gene's differential expression, by their integer code in ``Labels.classes``.
CLASS_NAMES = {-1: "down", 0: "unchanged", 1: "up"}


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


def column_kinds(
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


def reference_columns(
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


__all__ = [
    "CLASS_NAMES",
    "SampleMatch",
    "classify",
    "column_kinds",
    "expression_log2fc",
    "match_samples",
    "match_slides",
    "reference_columns",
]
