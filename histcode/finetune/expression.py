"""Expression inputs as they are downloaded: matrices, GDC STAR-Counts folders, and their units.

:func:`read_expression` reads a genes × samples file and tells its layout from the header:

* ``table`` — our own matrix: the first column (or ``gene``) names genes by HGNC symbol, every
  other column is a sample (TCGA sample barcode or slide id).
* ``cbioportal`` — ``data_mrna_seq_v2_rsem.txt``: ``Hugo_Symbol``, ``Entrez_Gene_Id``, then
  15-character sample ids; RSEM values (linear). The Entrez column is dropped, rows without a
  symbol are dropped, repeated symbols are collapsed (:data:`DUPLICATE_RULE`).
* ``xena`` — UCSC Xena: the first column is ``sample`` (gene symbols, e.g. ``HiSeqV2``) or
  ``Ensembl_ID`` (versioned Ensembl ids, e.g. ``TCGA-BRCA.star_tpm.tsv``, mapped to symbols by
  a gene map: Xena's ``*.probemap`` or any GDC STAR-Counts file); values are log2(x + 1) or
  log2(x + 0.001), so they must be un-logged (units ``log2tpm``).

:func:`read_gdc_download` reads a GDC "STAR - Counts" download: one
``<file UUID>/<uuid>.rna_seq.augmented_star_gene_counts.tsv`` per aliquot, mapped to samples by
the GDC sample sheet (:func:`read_sample_sheet`, current 11-column and older 8-column forms),
with symbols from the files' own ``gene_name`` column (no network).

Whatever the layout, rows that are not genes never enter a matrix: STAR's ``N_unmapped``,
``N_multimapping``, ``N_noFeature``, ``N_ambiguous`` and HTSeq's ``__no_feature``… (which would
otherwise enter every library size), and GENCODE's ``_PAR_Y`` rows (zero twins of the
pseudo-autosomal chrX genes). What was dropped or collapsed is in ``frame.attrs["notes"]``.

**Units** (:func:`to_linear`): fold changes need linear expression. ``tpm`` (TPM, FPKM, RSEM or
any normalised linear unit) and ``counts`` (scaled to counts per million over the gene rows)
are refused when the matrix looks log-transformed (negative values, or every value below 30
with values that are not whole numbers); ``log2tpm`` un-logs ``2**v − log_offset`` (offset 1
for log2(x + 1), 0.001 for Xena's log2(x + 0.001) files) and is refused when values reach 30
(not log2 of any expression unit).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.barcodes import is_tcga, parse_barcode
from histcode.finetune.h5ad import SYMBOL_COLUMNS, UNITS_KEY, require_anndata
from histcode.finetune.tables import leading_comments, preview, read_table

log = logging.getLogger(__name__)

#: Units of an expression matrix that :func:`to_linear` knows.
UNITS = ("tpm", "counts", "log2tpm")
#: Every value below this (with non-integers) reads as log scale; log2 values never reach it.
LOG_MAX = 30.0
#: What happens to rows that share a gene symbol (cBioPortal, Xena, GDC).
DUPLICATE_RULE = (
    "rows sharing a gene symbol: the row with the highest mean expression over all samples is "
    "kept, the others are dropped"
)
#: Count-summary rows of STAR (GDC) and HTSeq: not genes, never part of a library size.
COUNT_SUMMARY_ROWS = frozenset(
    {
        "N_unmapped",
        "N_multimapping",
        "N_noFeature",
        "N_ambiguous",
        "__no_feature",
        "__ambiguous",
        "__too_low_aQual",
        "__not_aligned",
        "__alignment_not_unique",
    }
)
#: Value columns of a GDC STAR-Counts file → their units once linear.
GDC_COLUMNS = {
    "tpm_unstranded": "tpm",
    "fpkm_unstranded": "fpkm",
    "fpkm_uq_unstranded": "fpkm_uq",
    "unstranded": "counts",
    "stranded_first": "counts",
    "stranded_second": "counts",
}
GDC_HEADER = (
    "gene_id\tgene_name\tgene_type\tunstranded\tstranded_first\tstranded_second\t"
    "tpm_unstranded\tfpkm_unstranded\tfpkm_uq_unstranded"
)
_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?(_PAR_Y)?$")
_GDC_DATA_TYPE = "gene expression quantification"


def is_count_summary(gene: str) -> bool:
    """Whether a row name is a STAR/HTSeq count summary (``N_unmapped``, ``__no_feature``…)."""
    return gene in COUNT_SUMMARY_ROWS


def ensembl_key(gene_id: str) -> str:
    """``ENSG00000136997.21`` → ``ENSG00000136997`` (versions differ between releases)."""
    return gene_id.split(".")[0]


# -- units --------------------------------------------------------------------------------------


def log_scale_reason(values: pd.DataFrame) -> str | None:
    """Why ``values`` look log-transformed, or ``None`` when they look linear.

    Log scale: any negative value, or every value below :data:`LOG_MAX` with some that are not
    whole numbers (linear TPM of a whole transcriptome reaches thousands; counts are whole).
    """
    arr = values.to_numpy(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return None
    negative = finite & (arr < 0)
    if negative.any():
        r, c = np.argwhere(negative)[0]
        return (
            f"{int(negative.sum())} negative value(s), e.g. {values.index[r]}/"
            f"{values.columns[c]} = {arr[r, c]:g}"
        )
    top = np.where(finite, arr, -np.inf)
    r, c = np.unravel_index(np.argmax(top), arr.shape)
    whole = np.all(np.equal(np.round(arr[finite]), arr[finite]))
    if arr[r, c] < LOG_MAX and not whole:
        return (
            f"every value is below {LOG_MAX:g} (the largest is {values.index[r]}/"
            f"{values.columns[c]} = {arr[r, c]:g}) and values are not whole numbers"
        )
    return None


def to_linear(
    values: pd.DataFrame,
    units: str,
    source: str,
    log_offset: float = 1.0,
    option: str = "--data.",
) -> pd.DataFrame:
    """Expression on a linear scale, refusing a scale that does not match ``units``.

    Args:
        values: genes × samples.
        units: ``tpm`` or ``counts`` (used as they are; refused when they look log scale),
            or ``log2tpm`` (``log2(x + log_offset)``, un-logged here).
        source: the file, for messages.
        log_offset: what was added before the log (1 for log2(x + 1), 0.001 for Xena's
            log2(x + 0.001)).
        option: prefix of the options named in messages (``--data.`` for finetune, ``--``
            for ``histcode cohort``).

    Returns:
        Linear values (the same frame for ``tpm`` / ``counts``).

    Raises:
        ValueError: unknown units, log-looking values given as linear (names the file, the
            gene and sample, and the fix), linear-looking values given as log, or un-logged
            values below zero (wrong ``log_offset``).
    """
    if units not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}; got {units!r}")
    if units != "log2tpm":
        reason = log_scale_reason(values)
        if reason:
            raise ValueError(
                f"{source}: {reason}, so it looks log-transformed. Fold changes of log values are "
                f"wrong (TPM and counts are ≥ 0 and reach thousands). If it is log2(TPM + 1), "
                f"as UCSC Xena matrices are, pass {option}units log2tpm, which un-logs it "
                f"(add {option}log_offset 0.001 for log2(x + 0.001)); z-scores cannot be used, "
                "download the linear values instead."
            )
        return values
    if not (np.isfinite(log_offset) and log_offset > 0):
        raise ValueError(f"log_offset must be > 0 (1 for log2(x + 1)); got {log_offset!r}")
    arr = values.to_numpy(np.float64)
    finite = np.isfinite(arr)
    if finite.any() and arr[finite].max() >= LOG_MAX:
        r, c = np.unravel_index(np.argmax(np.where(finite, arr, -np.inf)), arr.shape)
        raise ValueError(
            f"{source} is not log2 scale: {values.index[r]}/{values.columns[c]} = "
            f"{arr[r, c]:g} (log2 of a million TPM is 19.9). Pass {option}units tpm (or "
            "counts) for linear values."
        )
    linear = np.exp2(values) - log_offset
    low = np.isfinite(linear.to_numpy()) & (linear.to_numpy() < -0.01 * log_offset)
    if low.any():
        r, c = np.argwhere(low)[0]
        raise ValueError(
            f"{source}: {int(low.sum())} value(s) are below log2({log_offset:g}) = "
            f"{np.log2(log_offset):.4g}, e.g. {values.index[r]}/{values.columns[c]} = "
            f"{arr[r, c]:g}, so the matrix is not log2(x + {log_offset:g}). Xena's "
            f"log2(x + 0.001) files (minimum -9.966) need {option}log_offset 0.001."
        )
    return linear.clip(lower=0.0)


def cpm(counts: pd.DataFrame, source: str) -> pd.DataFrame:
    """Counts per million over the gene rows (count-summary rows are left out of the sum).

    Raises:
        ValueError: a sample with no counts at all (names it).
    """
    genes = counts.loc[[not is_count_summary(str(g)) for g in counts.index]]
    library = genes.sum(axis=0)
    empty = library.index[~(library > 0)].tolist()
    if empty:
        raise ValueError(f"{source}: samples with no counts at all: {preview(empty)}")
    return genes / library * 1e6


def collapse_duplicates(values: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Apply :data:`DUPLICATE_RULE` to repeated index entries.

    Returns:
        The frame with unique genes (first-seen order) and the symbols that were collapsed.
    """
    repeated = values.index[values.index.duplicated(keep=False)]
    if not len(repeated):
        return values, []
    mean = values.mean(axis=1, skipna=True).fillna(-np.inf).to_numpy()
    position = np.arange(len(values))
    order = np.lexsort((position, -mean))  # highest mean first, ties by position
    keep = np.zeros(len(values), bool)
    seen: set[str] = set()
    for i in order:
        g = values.index[i]
        if g not in seen:
            seen.add(g)
            keep[i] = True
    return values[keep], sorted(set(repeated))


# -- matrices -----------------------------------------------------------------------------------


def _layout(columns: list[str], comments: list[str]) -> str:
    lower = [c.lower() for c in columns]
    if {"gene_id", "gene_name"} <= set(lower) and any(c in lower for c in GDC_COLUMNS):
        return "gdc_file"
    if any(c.lower().startswith("gene-model") for c in comments):
        return "gdc_file"
    if columns[0] == "Hugo_Symbol":
        return "cbioportal"
    if columns[0] in ("Ensembl_ID", "sample"):
        return "xena"
    return "table"


def read_expression(path: Path | str, gene_map: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Read an expression matrix, genes × samples, in any layout of the module docstring.

    A ``.h5ad`` file (AnnData, samples × genes) is read by
    :func:`read_h5ad_expression` (extra ``histcode[anndata]``).

    Values are parsed as numbers; checks of NaN, sign and scale come later, on the rows and
    columns that are used (:func:`histcode.finetune.labels.expression_log2fc`).

    Args:
        path: the file.
        gene_map: Ensembl id (without version) → symbol, for rows named by Ensembl ids
            (:func:`read_gene_map`).

    Returns:
        A float64 frame indexed by gene symbol, one column per sample; empty, ``NA`` or
        ``NaN`` cells are NaN. ``attrs``: ``layout``, ``notes`` (rows dropped or collapsed),
        ``units`` (when a ``# units: …`` line says it, as ``histcode cohort`` writes).

    Raises:
        FileNotFoundError: no such file.
        ValueError: duplicate genes (own tables) or samples, non-numeric values, no sample
            column, a single GDC file, or Ensembl ids without a gene map; names file and rows.
    """
    path = Path(path)
    if path.suffix.lower() == ".h5ad":  # AnnData, samples × genes (histcode[anndata])
        return read_h5ad_expression(path, gene_map)
    frame = read_table(path, "expression matrix")
    comments = frame.attrs["comments"]
    first_line = frame.attrs["first_line"]
    layout = _layout(list(frame.columns), comments)
    if layout == "gdc_file":
        raise ValueError(
            f"{path} is one GDC STAR-Counts file (a single sample), not a genes × samples "
            "matrix. Build the matrix from the download folder and its sample sheet: histcode "
            "cohort --slides SLIDES --expression DOWNLOAD_FOLDER --sample_sheet "
            "gdc_sample_sheet.tsv --out COHORT"
        )
    lower = [c.lower() for c in frame.columns]
    gene_col = frame.columns[lower.index("gene")] if "gene" in lower else frame.columns[0]
    drop = [gene_col]
    if layout == "cbioportal" and "Entrez_Gene_Id" in frame.columns:
        drop.append("Entrez_Gene_Id")
    if frame.shape[1] - len(drop) < 1 or frame.shape[0] == 0:
        raise ValueError(
            f"expression matrix {path} has no "
            f"{'sample columns' if frame.shape[1] - len(drop) < 1 else 'gene rows'}; expected a "
            "genes × samples table with a first column naming the gene and one column per "
            "sample"
        )
    names = frame[gene_col].str.strip()
    line = pd.Series(np.arange(len(frame)) + first_line, index=frame.index)
    notes: list[str] = []
    keep = pd.Series(True, index=frame.index)
    summary = names.map(is_count_summary)
    if summary.any():
        notes.append(
            f"dropped {int(summary.sum())} count-summary row(s) that are not genes "
            f"({preview(names[summary])}): they never enter a library size"
        )
        keep &= ~summary
    par_y = names.str.endswith("_PAR_Y")
    if par_y.any():
        notes.append(f"dropped {int(par_y.sum())} _PAR_Y row(s) (zero twins of chrX genes)")
        keep &= ~par_y
    ensembl = names[keep].str.match(_ENSEMBL_RE.pattern)
    if keep.any() and ensembl.mean() > 0.5:
        if gene_map is None:
            raise ValueError(
                f"expression matrix {path} names genes by Ensembl id ({preview(names[keep], 3)}); "
                "models use gene symbols. Map them with histcode cohort --gene_map FILE (the "
                "Xena probemap downloaded beside the matrix, e.g. "
                "gencode.v36.annotation.gtf.gene.probemap, or any GDC STAR-Counts file)."
            )
        mapped = names.map(lambda g: gene_map.get(ensembl_key(g), ""))
        unmapped = keep & (mapped == "")
        if unmapped.any():
            notes.append(
                f"dropped {int(unmapped.sum())} row(s) whose Ensembl id the gene map lacks "
                f"({preview(names[unmapped], 4)})"
            )
            keep &= ~unmapped
        names = mapped.where(keep, names)
    empty = keep & (names == "")
    if empty.any():
        if layout == "table":
            raise ValueError(
                f"expression matrix {path}: rows without a gene name on lines "
                f"{preview(line[empty])}; name each row's gene or delete it"
            )
        notes.append(f"dropped {int(empty.sum())} row(s) without a gene symbol")
        keep &= ~empty
    genes = names[keep]
    if layout == "table":
        dupes = sorted(set(genes[genes.duplicated()]))
        if dupes:
            rows = [str(n) for n in line[keep][genes.isin(dupes).to_numpy()].iloc[:8]]
            raise ValueError(
                f"expression matrix {path} names genes more than once: {preview(dupes)} (lines "
                f"{', '.join(rows)}); merge or drop the repeated rows"
            )
    raw = frame.loc[keep].drop(columns=drop)
    values = raw.apply(
        lambda col: pd.to_numeric(col.str.strip().replace({"": "nan", "NA": "nan"}), "coerce")
    )
    bad = raw.apply(lambda col: ~col.str.strip().str.lower().isin({"", "na", "nan"})) & (
        values.isna()
    )
    if bad.to_numpy().any():
        cells = [
            f"{genes.iloc[r]}/{values.columns[c]}={raw.iloc[r, c]!r} (line {line[keep].iloc[r]})"
            for r, c in zip(*np.nonzero(bad.to_numpy()), strict=True)
        ]
        raise ValueError(
            f"expression matrix {path} has non-numeric values (gene/sample=value): "
            f"{preview(cells, 6)}; expression must be numbers (TPM or counts)"
        )
    values.index = pd.Index(genes.to_numpy(), name="gene")
    values = values.astype(np.float64)
    values, collapsed = collapse_duplicates(values)
    if collapsed:
        notes.append(
            f"{len(collapsed)} repeated symbol(s) ({preview(collapsed, 5)}): {DUPLICATE_RULE}"
        )
    for note in notes:
        log.info("expression matrix %s: %s", path, note)
    values.attrs = {"layout": layout, "notes": notes, "path": str(path)}
    for comment in comments:
        key, _, value = comment.partition(":")
        if key.strip().lower() == "units" and value.strip():
            values.attrs["units"] = value.strip().split()[0]
    return values


def read_h5ad_expression(
    path: Path | str, gene_map: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Read an AnnData file of samples × genes as a genes × samples frame.

    Rows that are not genes (STAR/HTSeq count summaries, ``_PAR_Y``) are dropped, Ensembl ids
    are mapped to symbols (by a symbol column of ``var``, else ``gene_map``), repeated symbols
    are collapsed (:data:`DUPLICATE_RULE`), as for text matrices.

    Args:
        path: the ``.h5ad`` file.
        gene_map: Ensembl id (without version) → symbol, for ``var_names`` that are Ensembl
            ids when ``var`` has no symbol column.

    Returns:
        Float64 symbols × samples; ``attrs``: ``layout`` (``anndata``), ``notes``, ``path``,
        ``units`` (from ``uns['histcode_units']``, when present).

    Raises:
        FileNotFoundError: no such file.
        ImportError: ``anndata`` is not installed (names the extra).
        ValueError: no ``X``, repeated sample ids, unknown recorded units, or Ensembl ids
            without symbols; names the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expression matrix {path} does not exist")
    ad = require_anndata(f"the AnnData expression matrix {path}")
    adata = ad.read_h5ad(path)
    if adata.X is None or adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"AnnData {path} has no expression ({adata.n_obs} obs × {adata.n_vars} var, X "
            f"{'missing' if adata.X is None else 'empty'}); expected X = samples × genes"
        )
    samples = pd.Index([str(s) for s in adata.obs_names])
    if samples.has_duplicates:
        raise ValueError(
            f"AnnData {path} repeats sample ids (obs_names): "
            f"{preview(sorted(set(samples[samples.duplicated()])))}; make them unique"
        )
    units = adata.uns.get(UNITS_KEY)
    if units is not None and str(units) not in UNITS:
        raise ValueError(
            f"AnnData {path}: uns['{UNITS_KEY}'] is {units!r}; expected one of "
            f"{', '.join(UNITS)} (or no such key, to detect the units)"
        )
    x = adata.X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    try:
        values = np.asarray(x, dtype=np.float64).T
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"AnnData {path}: X is not numeric ({x.dtype}); expression must be numbers"
        ) from exc
    ids = pd.Series([str(v).strip() for v in adata.var_names])
    column = next((c for c in SYMBOL_COLUMNS if c in adata.var.columns), None)
    notes: list[str] = []
    keep = ~ids.map(is_count_summary) & ~ids.str.endswith("_PAR_Y")
    if (~keep).any():
        notes.append(
            f"dropped {int((~keep).sum())} row(s) that are not genes "
            f"({preview(ids[~keep])}): count summaries, _PAR_Y"
        )
    if column is not None:
        names = pd.Series(
            ["" if pd.isna(v) else str(v).strip() for v in adata.var[column]], dtype=object
        )
        source = f"var column {column!r}"
    else:
        names = ids.astype(object)
        source = "var_names"
        if keep.any() and names[keep].str.match(_ENSEMBL_RE.pattern).mean() > 0.5:
            if gene_map is None:
                raise ValueError(
                    f"AnnData {path} names genes by Ensembl id ({preview(ids[keep], 3)}) and var "
                    f"has no symbol column ({', '.join(SYMBOL_COLUMNS)}); models use gene "
                    "symbols. Add a var column gene_symbols, or map them with histcode cohort "
                    "--gene_map FILE (a Xena probemap or any GDC STAR-Counts file)."
                )
            names = ids.map(lambda g: gene_map.get(ensembl_key(g), ""))
            source = "gene map"
    empty = keep & (names == "")
    if empty.any():
        notes.append(
            f"dropped {int(empty.sum())} gene(s) without a symbol in the {source} "
            f"({preview(ids[empty], 4)})"
        )
        keep &= ~empty
    mask = keep.to_numpy()
    frame = pd.DataFrame(
        values[mask], index=pd.Index(names[mask].to_numpy(), name="gene"), columns=samples
    )
    frame, collapsed = collapse_duplicates(frame)
    if collapsed:
        notes.append(
            f"{len(collapsed)} repeated symbol(s) ({preview(collapsed, 5)}): {DUPLICATE_RULE}"
        )
    frame.attrs = {"layout": "anndata", "notes": notes, "path": str(path)}
    if units is not None:
        frame.attrs["units"] = str(units)
    return frame


def read_gene_map(path: Path | str) -> dict[str, str]:
    """Ensembl id (without version) → gene symbol, from a file of the download itself.

    Accepts a UCSC Xena probemap (``id``, ``gene``, ``chrom``…), a GDC STAR-Counts file
    (``gene_id``, ``gene_name``…) or any two-column table (id, symbol). ``_PAR_Y`` rows are
    skipped.

    Raises:
        ValueError: the file has none of these forms (names its columns).
    """
    path = Path(path)
    frame = read_table(path, "gene map")
    lower = {c.lower(): c for c in frame.columns}
    for id_col, name_col in (("gene_id", "gene_name"), ("id", "gene")):
        if id_col in lower and name_col in lower:
            ids, names = frame[lower[id_col]], frame[lower[name_col]]
            break
    else:
        if frame.shape[1] != 2:
            raise ValueError(
                f"gene map {path} has columns {preview(frame.columns)}; expected a Xena "
                "probemap (id, gene, …), a GDC STAR-Counts file (gene_id, gene_name, …) or "
                "two columns (Ensembl id, symbol)"
            )
        ids, names = frame.iloc[:, 0], frame.iloc[:, 1]
    out: dict[str, str] = {}
    for gid, name in zip(ids.str.strip(), names.str.strip(), strict=True):
        if gid and name and not gid.endswith("_PAR_Y") and not is_count_summary(gid):
            out.setdefault(ensembl_key(gid), name)
    if not out:
        raise ValueError(f"gene map {path} maps no Ensembl id to a symbol")
    return out


# -- GDC downloads ------------------------------------------------------------------------------


def read_sample_sheet(path: Path | str) -> pd.DataFrame:
    """Read a GDC sample sheet (current 11-column or older 8-column form).

    Rows whose ``Data Type`` is not ``Gene Expression Quantification`` (slides of the same
    cart, …) are left out. A ``Sample ID`` cell may repeat one id comma-separated; a file of
    several samples cannot give one sample's expression and is an error.

    Returns:
        ``file_id``, ``file_name``, ``case_id``, ``sample_id`` (16-character sample barcode),
        ``line`` (the sheet's line), one row per expression file; ``attrs["ignored"]``: rows
        of other data types.

    Raises:
        ValueError: columns missing, an empty or non-TCGA or multi-sample ``Sample ID``, a
            repeated file, or a ``Tissue Type`` / ``Sample Type`` that contradicts the
            barcode; names the sheet and line.
    """
    path = Path(path)
    frame = read_table(path, "GDC sample sheet")
    missing = [c for c in ("File ID", "File Name", "Sample ID") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"GDC sample sheet {path} lacks the column(s) {', '.join(missing)} (it has "
            f"{preview(frame.columns)}); download the sample sheet of the cart from the GDC "
            "portal (File ID, File Name, Data Category, Data Type, Project ID, Case ID, Sample "
            "ID, …)"
        )
    line = pd.Series(np.arange(len(frame)) + frame.attrs["first_line"], index=frame.index)
    if "Data Type" in frame.columns:
        rna = frame["Data Type"].str.strip().str.lower() == _GDC_DATA_TYPE
    else:
        rna = pd.Series(True, index=frame.index)
    ignored = int((~rna).sum())
    frame, line = frame[rna], line[rna]
    if frame.empty:
        raise ValueError(
            f"GDC sample sheet {path} lists no Gene Expression Quantification file; download "
            "the sample sheet of the RNA-seq (STAR - Counts) files"
        )
    tissue_col = next((c for c in ("Tissue Type", "Sample Type") if c in frame.columns), None)
    rows = []
    for i in frame.index:
        where = f"GDC sample sheet {path}, line {line[i]}"
        ids = sorted({s.strip() for s in frame.at[i, "Sample ID"].split(",") if s.strip()})
        if not ids:
            raise ValueError(f"{where}: empty Sample ID; fix the row or delete it")
        if len(ids) > 1:
            raise ValueError(
                f"{where}: file {frame.at[i, 'File Name']} is of several samples "
                f"({', '.join(ids)}), so its expression is no one sample's; delete the row"
            )
        if not is_tcga(ids[0]):
            raise ValueError(
                f"{where}: Sample ID {ids[0]!r} is not a TCGA sample barcode "
                "(TCGA-XX-XXXX-01A); fix the row or delete it"
            )
        kind = parse_barcode(ids[0]).kind
        if tissue_col:
            text = frame.at[i, tissue_col].lower()
            said = (
                "normal"
                if "normal" in text
                else "tumour"
                if any(w in text for w in ("tumor", "tumour", "metasta", "cancer"))
                else None
            )
            if said and said != kind:
                raise ValueError(
                    f"{where}: {tissue_col} {frame.at[i, tissue_col]!r} contradicts the sample "
                    f"barcode {ids[0]} ({kind}); the sheet does not belong to these files, or "
                    "the row is wrong"
                )
        rows.append(
            {
                "file_id": frame.at[i, "File ID"].strip(),
                "file_name": frame.at[i, "File Name"].strip(),
                "case_id": frame.at[i, "Case ID"].split(",")[0].strip()
                if "Case ID" in frame.columns
                else "",
                "sample_id": ids[0],
                "line": int(line[i]),
            }
        )
    out = pd.DataFrame(rows)
    dupes = out["file_name"].duplicated(keep=False)
    if dupes.any():
        shown = [
            f"{n} (line {k})"
            for n, k in zip(out["file_name"][dupes], out["line"][dupes], strict=True)
        ]
        raise ValueError(f"GDC sample sheet {path} lists files twice: {preview(shown, 4)}")
    out.attrs["ignored"] = ignored
    return out


def read_star_counts(path: Path, column: str) -> pd.DataFrame:
    """One GDC STAR-Counts file: ``gene_id`` (index), ``gene_name`` and ``value`` (the column).

    Count-summary rows (``N_unmapped``…) are left out.

    Raises:
        ValueError: not a STAR-Counts file, or a value that is not a number; names the file
            and line.
    """
    frame = read_table(path, "GDC STAR-Counts file")
    need = ["gene_id", "gene_name", column]
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path} is not a GDC STAR-Counts file: it lacks {', '.join(missing)} (header: "
            f"{preview(frame.columns)}); expected {GDC_HEADER.replace(chr(9), ', ')}"
        )
    line = np.arange(len(frame)) + frame.attrs["first_line"]
    ids = frame["gene_id"].str.strip()
    genes = ~ids.map(is_count_summary).to_numpy()
    text = frame[column].str.strip()
    value = pd.to_numeric(text, errors="coerce")
    bad = genes & (value.isna() | ~np.isfinite(value) | (value < 0)).to_numpy()
    if bad.any():
        shown = [f"{ids.iloc[i]}={text.iloc[i]!r} (line {line[i]})" for i in np.flatnonzero(bad)]
        raise ValueError(
            f"{path}: column {column} holds values that are not numbers ≥ 0: {preview(shown, 4)}"
        )
    out = pd.DataFrame(
        {
            "gene_name": frame["gene_name"].str.strip()[genes].to_numpy(),
            "value": value[genes].to_numpy(np.float64),
        },
        index=pd.Index(ids[genes].to_numpy(), name="gene_id"),
    )
    dupes = out.index[out.index.duplicated()]
    if len(dupes):
        raise ValueError(f"{path}: gene ids repeated: {preview(sorted(set(dupes)))}")
    return out


def find_sample_sheet(folder: Path) -> Path | None:
    """The one ``gdc_sample_sheet*.tsv`` in ``folder`` (or its parent), else ``None``."""
    for where in (folder, folder.parent):
        found = sorted(where.glob("gdc_sample_sheet*.tsv"))
        if len(found) == 1:
            return found[0]
    return None


def read_gdc_download(
    folder: Path | str, sample_sheet: Path | str, column: str = "tpm_unstranded"
) -> pd.DataFrame:
    """A genes × samples matrix from a GDC STAR-Counts download.

    Each file of the sheet is looked up as ``folder/<File ID>/<File Name>`` (else anywhere
    under ``folder``); its ``column`` is read; counts become CPM over the gene rows; samples of
    several files (aliquots) are averaged; ``_PAR_Y`` rows are dropped; ids become the files'
    ``gene_name`` symbols, repeated symbols collapsed by :data:`DUPLICATE_RULE`.

    Args:
        folder: the download (``gdc_download_…`` or gdc-client's output folder).
        sample_sheet: the GDC sample sheet of the same files.
        column: ``tpm_unstranded`` (default), ``fpkm_unstranded``, ``fpkm_uq_unstranded``
            (normalised, used as they are) or ``unstranded``, ``stranded_first``,
            ``stranded_second`` (counts, scaled to CPM).

    Returns:
        Symbols × sample barcodes (16 characters), linear; ``attrs``: ``layout`` (``gdc``),
        ``units`` (``tpm``: a normalised linear unit), ``unit_detail``, ``notes``,
        ``files`` (sample → file names), ``gene_model``.

    Raises:
        FileNotFoundError: the folder, or a file of the sheet, is missing (names the line).
        ValueError: see :func:`read_sample_sheet` and :func:`read_star_counts`; files of
            different gene models.
    """
    folder, sample_sheet = Path(folder), Path(sample_sheet)
    if column not in GDC_COLUMNS:
        raise ValueError(f"GDC column must be one of {', '.join(GDC_COLUMNS)}; got {column!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"GDC download folder {folder} does not exist")
    sheet = read_sample_sheet(sample_sheet)
    by_name: dict[str, list[Path]] = {}
    for p in folder.rglob("*"):
        if p.is_file():
            by_name.setdefault(p.name, []).append(p)
    paths, missing = [], []
    for row in sheet.itertuples():
        direct = folder / row.file_id / row.file_name
        found = direct if direct.is_file() else (by_name.get(row.file_name) or [None])[0]
        if found is None:
            missing.append(f"{row.file_name} (line {row.line})")
        paths.append(found)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} file(s) of the GDC sample sheet {sample_sheet} are not in "
            f"{folder}: {preview(missing, 4)}. Download them again (gdc-client download -m "
            "MANIFEST), or delete their rows from the sample sheet."
        )
    listed = set(sheet["file_name"])
    extra = sorted(n for n in by_name if n.endswith("star_gene_counts.tsv") and n not in listed)
    notes = []
    if extra:
        notes.append(
            f"{len(extra)} STAR-Counts file(s) not in the sample sheet, ignored: "
            f"{preview(extra, 3)}"
        )
    notes.append(
        "STAR count-summary rows (N_unmapped, N_multimapping, N_noFeature, N_ambiguous) left "
        "out of every file: they are not genes"
    )
    units = GDC_COLUMNS[column]
    columns, names, model, reference = {}, None, None, None
    files: dict[str, list[str]] = {}
    for row, path in zip(sheet.itertuples(), paths, strict=True):
        counts = read_star_counts(path, column)
        model_line = next(
            (c for c in leading_comments(path) if c.lower().startswith("gene-model")), ""
        )
        if reference is None:
            reference, names, model = counts.index, counts["gene_name"], model_line
        elif not counts.index.equals(reference):
            if set(counts.index) != set(reference):
                raise ValueError(
                    f"{path} (sample sheet line {row.line}) has other genes than {paths[0]} "
                    f"({model_line or 'no gene model line'} vs {model or 'none'}): files of one "
                    "matrix must come from one GDC data release"
                )
            counts = counts.loc[reference]
        values = counts["value"]
        if units == "counts":
            values = cpm(values.to_frame(row.sample_id), str(path))[row.sample_id]
        columns[row.file_name] = values
        files.setdefault(row.sample_id, []).append(row.file_name)
    per_file = pd.DataFrame(columns, index=reference)
    matrix = pd.DataFrame({s: per_file[f].mean(axis=1) for s, f in files.items()}, index=reference)
    several = {s: f for s, f in files.items() if len(f) > 1}
    if several:
        notes.append(
            f"{len(several)} sample(s) have several files (aliquots), averaged: "
            f"{preview(several, 4)}"
        )
    par_y = matrix.index.str.endswith("_PAR_Y")
    if par_y.any():
        notes.append(f"dropped {int(par_y.sum())} _PAR_Y row(s) (zero twins of chrX genes)")
    matrix = matrix[~par_y]
    symbols = names.loc[matrix.index].to_numpy()
    no_name = symbols == ""
    if no_name.any():
        notes.append(f"dropped {int(no_name.sum())} row(s) without gene_name")
    matrix = matrix[~no_name]
    matrix.index = pd.Index(symbols[~no_name], name="gene")
    matrix, collapsed = collapse_duplicates(matrix)
    if collapsed:
        notes.append(
            f"{len(collapsed)} repeated symbol(s) ({preview(collapsed, 5)}): {DUPLICATE_RULE}"
        )
    detail = (
        f"CPM of GDC '{column}' counts over gene rows (N_* rows left out)"
        if units == "counts"
        else f"GDC '{column}' ({units.upper()})"
    )
    matrix.attrs = {
        "layout": "gdc",
        "units": "tpm",
        "unit_detail": detail,
        "notes": notes,
        "files": files,
        "gene_model": model or "",
        "ignored_sheet_rows": int(sheet.attrs["ignored"]),
    }
    return matrix


__all__ = [
    "COUNT_SUMMARY_ROWS",
    "DUPLICATE_RULE",
    "GDC_COLUMNS",
    "LOG_MAX",
    "UNITS",
    "collapse_duplicates",
    "cpm",
    "ensembl_key",
    "find_sample_sheet",
    "is_count_summary",
    "log_scale_reason",
    "read_expression",
    "read_gdc_download",
    "read_gene_map",
    "read_h5ad_expression",
    "read_sample_sheet",
    "read_star_counts",
    "to_linear",
]
