"""Reading the TSV/CSV tables of a cohort — the labels CSV into canonical columns — and ids in
error messages.

Shared by :mod:`histcode.finetune.labels`, :mod:`histcode.finetune.expression` (expression
matrices, GDC sample sheets) and :mod:`histcode.finetune.cohort`. Tables are read
as strings (numbers are parsed by whoever knows the column); leading ``#`` lines — GDC's
``# gene-model: GENCODE v36``, histcode's ``# units: tpm`` — are kept apart as comments.
"""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd

from histcode.barcodes import is_tcga, parse_barcode
from histcode.errors import preview
from histcode.slide import is_safe_slide_id

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
#: Suffix of the ready-made regression targets of a labels CSV (``TP53_log2fc``).
LOG2FC_SUFFIX = "_log2fc"


def at_lines(values: pd.Series, line: pd.Series) -> list[str]:
    """``"x (line 4)"`` for each value, for error messages.

    Args:
        values: a selection of a table's column (its index says which rows).
        line: the file line of every row of the table.
    """
    return [f"{v} (line {n})" for v, n in zip(values, line[values.index], strict=True)]


def _open(path: Path) -> TextIO:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", newline="")


def leading_comments(path: Path) -> list[str]:
    """The lines starting with ``#`` before the header (without the ``#``), stripped."""
    comments = []
    with _open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            comments.append(line[1:].strip())
    return comments


def _separator(path: Path, skip: int) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".tsv", ".txt", ".tab")):
        return "\t"
    if name.endswith(".csv"):
        return ","
    with _open(path) as f:
        for _ in range(skip):
            f.readline()
        head = f.readline()
    return "\t" if head.count("\t") >= head.count(",") else ","


def _header(path: Path, sep: str, skip: int) -> list[str]:
    with _open(path) as f:
        for _ in range(skip):
            f.readline()
        return [c.strip() for c in next(csv.reader(f, delimiter=sep), [])]


def read_table(path: Path | str, what: str) -> pd.DataFrame:
    """Read a TSV/CSV as strings, refusing duplicate column names and unreadable files.

    Leading ``#`` lines are skipped; they are in ``frame.attrs["comments"]``. The file line of
    row ``i`` is ``frame.attrs["first_line"] + i``.

    Args:
        path: the file (``.gz`` is read compressed).
        what: what the file is, for messages (``expression matrix``).

    Raises:
        FileNotFoundError, IsADirectoryError: no such file, or a folder.
        ValueError: empty, duplicate columns, not UTF-8, or rows with more fields than the
            header; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; pass the file itself")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    sep = "\t"
    try:
        comments = leading_comments(path)
        skip = len(comments)
        sep = _separator(path, skip)
        header = _header(path, sep, skip)
        if not header or not any(header):
            raise ValueError(f"{what} {path} is empty; it needs a header row")
        dupes = sorted({c for c in header if header.count(c) > 1})
        if dupes:
            raise ValueError(
                f"{what} {path} has duplicate columns {preview(dupes)}; each column must be unique"
            )
        frame = pd.read_csv(
            path, sep=sep, dtype=str, keep_default_na=False, na_values=[], skiprows=skip
        )
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as "
            "a CSV or TSV file in UTF-8"
        ) from None
    except pd.errors.ParserError as err:
        raise ValueError(
            f"{what} {path} is not a well-formed {'TSV' if sep == chr(9) else 'CSV'} table "
            f"({err}); every row needs as many fields as the header"
        ) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    frame.attrs["comments"] = comments
    frame.attrs["first_line"] = skip + 2
    return frame


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees
    a half-written file, and an earlier file stays whole until the new one is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# -- the labels CSV -----------------------------------------------------------------------------


def read_label_table(path: Path | str, keep: Sequence[str] = ()) -> pd.DataFrame:
    """Read a labels CSV into canonical columns.

    Accepted columns (case-insensitive; aliases in brackets): ``slide_id`` (slide, id) required;
    ``patient_id`` (patient, case_id) required unless the slide ids are TCGA barcodes;
    ``tumour`` (tumor, label, tissue, sample_type) as 1/0, true/false, tumour/normal or a
    TCGA sample type code (01–09 tumour, 10–19 normal); ``sample_id``
    (the slide's expression column); ``site`` (site_id, tss, tissue_source_site: the tissue
    source site; empty cells of TCGA slides are read from the barcode, characters 6–7);
    ``<GENE>_log2fc`` numeric targets. Other columns are ignored unless named in ``keep``.

    Args:
        path: the CSV/TSV.
        keep: further columns to keep as text (stripped; ``""`` where empty or ``NA``), under
            the names given here, e.g. the categorical tasks ``["subtype", "msi"]``.

    Returns:
        A frame with ``slide_id``, ``patient_id``, ``tumour`` (float 1/0/NaN), ``sample_id``
        (str or ``""``), ``site`` (str, ``""`` when unknown) and any ``<GENE>_log2fc`` (float)
        columns, one row per slide.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no slide column, duplicate or empty slide ids, missing patient ids,
            unreadable tumour labels or non-numeric log2FC; names the rows. A ``keep`` column
            the file lacks; names the columns it has.
    """
    path = Path(path)
    raw = read_table(path, "labels file")
    lower = {c.lower(): c for c in raw.columns}
    absent = [k for k in keep if k.lower() not in lower]
    if absent:
        raise ValueError(
            f"labels file {path} has no column {', '.join(map(repr, absent))} (asked for by "
            f"--data.classes); its columns: {preview(raw.columns, 12)}. Name a column it has, "
            "or add the column."
        )
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
        shown = at_lines(out["slide_id"][unsafe].map(repr), line)
        raise ValueError(
            f"labels file {path}: slide ids that are not slide file names: {preview(shown)}. "
            "A slide id is a slide file's name without extension (no '/', '\\', and not "
            "starting with '.'); fix those rows."
        )
    dupes = out["slide_id"].duplicated(keep=False)
    if dupes.any():
        shown = at_lines(out["slide_id"][dupes], line)
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
            shown = at_lines(out["slide_id"][still], line)
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
            shown = at_lines(out["slide_id"][bad] + "=" + given, line)
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
                shown = at_lines(out["slide_id"][bad], line)
                raise ValueError(
                    f"labels file {path}: column {col!r} must hold finite numbers (empty for "
                    f"no target); bad values for {preview(shown, 6)}"
                )
            out[f"{gene}{LOG2FC_SUFFIX}"] = values.to_numpy(np.float64)
    for k in keep:
        text = raw[lower[k.lower()]].str.strip()
        out[k] = text.mask(text.str.lower().isin({"na", "nan", "none", "null"}), "").to_numpy()
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


__all__ = [
    "LOG2FC_SUFFIX",
    "at_lines",
    "leading_comments",
    "preview",
    "read_label_table",
    "read_table",
    "table_from_slide_ids",
    "write_atomic",
]
