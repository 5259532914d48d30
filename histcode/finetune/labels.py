"""Slide labels: tumour vs normal, per-gene log2 fold change against normal tissue, and any
categorical column of the labels table.

Two sources, which combine:

* **A labels CSV** (any cohort; :func:`~histcode.finetune.tables.read_label_table`): one row
  per slide with ``slide_id``, ``patient_id`` and optionally ``tumour``, ``sample_id``,
  ``site``, ``<GENE>_log2fc`` columns (ready-made regression targets) and any other column
  (``subtype``, ``msi``, ``stage``: classification tasks when asked for). Without a CSV the
  slides of the feature store are the rows and TCGA barcodes give patient, site and tumour
  status (:mod:`histcode.barcodes`).
* **An expression matrix** (genes × samples, TPM or raw counts;
  :mod:`histcode.finetune.expression`): each tumour sample's log2 fold change against the
  normal reference (:mod:`histcode.finetune.foldchange`).

Normal slides have tumour label 0 and no differential-expression target (masked).

This module joins them into :class:`Labels`; the pieces live in :mod:`~histcode.finetune.genes`
(gene lists), :mod:`~histcode.finetune.tables` (the labels CSV),
:mod:`~histcode.finetune.expression` (matrices) and :mod:`~histcode.finetune.foldchange`
(matching and fold change), and are re-exported here.

Every problem with the inputs — ids that do not match, genes missing from the matrix, NaN,
negative or non-numeric values, no normal samples, duplicate ids — raises a ``ValueError``
naming the offending rows, columns or ids and saying how to fix it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.errors import NotFoundError
from histcode.finetune.expression import read_expression
from histcode.finetune.foldchange import (
    CLASS_NAMES,
    SampleMatch,
    classify,
    column_kinds,
    expression_log2fc,
    match_samples,
    match_slides,
    reference_columns,
)
from histcode.finetune.genes import default_genes, read_gene_list, resolve_genes
from histcode.finetune.tables import (
    LOG2FC_SUFFIX,
    preview,
    read_label_table,
    table_from_slide_ids,
)

log = logging.getLogger(__name__)

#: Former private names, kept for code that imported them from here.
_column_kinds, _reference_columns = column_kinds, reference_columns


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
        categories: categorical task (a labels-CSV column such as ``subtype``) → its class
            names, sorted; the class index of a slide is the name's position.
        category_codes: (n, K) int64, each slide's class index per categorical task (in the
            order of ``categories``), -1 where the slide has no value (masked).
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
    categories: dict[str, list[str]] = field(default_factory=dict)
    category_codes: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.slide_ids)
        if self.category_codes is None:
            self.category_codes = np.full((n, len(self.categories)), -1, np.int64)
        self.category_codes = np.asarray(self.category_codes, np.int64).reshape(
            n, len(self.categories)
        )
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
            raise NotFoundError(f"slides without labels: {preview(missing)}")
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
            categories={k: list(v) for k, v in self.categories.items()},
            category_codes=self.category_codes[rows],
        )

    @property
    def category_mask(self) -> np.ndarray:
        """(n, K) bool: the slide has a class for the categorical task."""
        return self.category_codes >= 0

    def category_names(self, task: str) -> np.ndarray:
        """(n,) object: each slide's class of categorical ``task``, ``""`` where none."""
        names = np.array([*self.categories[task], ""], dtype=object)
        return names[self.category_codes[:, list(self.categories).index(task)]]

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
        for task in self.categories:
            frame[task] = self.category_names(task)
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
    classes: Sequence[str] = (),
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
        classes: columns of ``table`` that are categorical tasks (:func:`categorical_targets`).

    Raises:
        ValueError: see the module docstring; every message names the offending ids.
    """
    categories, codes = categorical_targets(table, classes)
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
        kinds = column_kinds(expression.columns, mapping, dict(zip(slide_ids, tumour, strict=True)))
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
        normal_cols, left_out = reference_columns(expression.columns, kinds, normal_types)
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
        categories=categories,
        category_codes=codes,
    )


#: Names a categorical task cannot have: they are columns of predictions.csv or the table.
_RESERVED = {"tumour", "genes", "slide_id", "patient_id", "sample_id", "site", "fold"}


def categorical_targets(
    table: pd.DataFrame, classes: Sequence[str]
) -> tuple[dict[str, list[str]], np.ndarray]:
    """Class names and per-slide class indices of the categorical columns ``classes``.

    Args:
        table: a labels table holding the columns as text (``read_label_table(keep=…)``);
            ``""`` is a missing value.
        classes: the columns, each a task.

    Returns:
        (task → sorted class names, (n, K) int64 indices, -1 where missing).

    Raises:
        ValueError: a reserved or repeated task name, a column the table lacks, or a column
            with fewer than 2 classes; names the column and its values.
    """
    classes = list(classes)
    bad = [c for c in classes if c.lower() in _RESERVED or c.endswith(LOG2FC_SUFFIX)]
    if bad:
        raise ValueError(
            f"--data.classes {', '.join(bad)}: these name tumour status, ids or gene targets, "
            "not a categorical column; use --data.tasks for tumour and genes"
        )
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise ValueError(f"--data.classes names columns more than once: {', '.join(dupes)}")
    missing = [c for c in classes if c not in table.columns]
    if missing:
        raise ValueError(
            f"the labels table has no column {', '.join(missing)} for --data.classes; pass "
            "--labels a CSV with that column"
        )
    categories: dict[str, list[str]] = {}
    codes = np.full((len(table), len(classes)), -1, np.int64)
    for k, column in enumerate(classes):
        values = table[column].fillna("").astype(str).str.strip()
        names = sorted(set(values) - {""})
        if len(names) < 2:
            raise ValueError(
                f"categorical column {column!r} has {len(names)} class(es) "
                f"({', '.join(names) or 'every cell empty'}) on the slides with features; a "
                "classification task needs at least 2"
            )
        index = {name: i for i, name in enumerate(names)}
        codes[:, k] = [index.get(v, -1) for v in values]
        categories[column] = names
    return categories, codes


def _check_recorded_units(expression: pd.DataFrame, units: str, source: str) -> None:
    """Refuse units that contradict a matrix's own ``# units:`` line (``histcode cohort``)."""
    recorded = expression.attrs.get("units")
    if recorded in ("tpm", "counts") and units != recorded:
        raise ValueError(
            f"{source} says its units are {recorded!r} (its '# units:' line), but "
            f"--data.units is {units!r}; pass --data.units {recorded}"
        )


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
    classes: Sequence[str] = (),
) -> Labels:
    """Read labels from files (see :func:`build_labels`).

    Args:
        labels: a labels CSV, or ``None`` to label ``slide_ids`` from their TCGA barcodes.
        expression: an expression matrix, or ``None``.
        slide_ids: the slides with features (used when ``labels`` is ``None``).
        genes, threshold, units, pseudocount, strict, with_genes, normal_types, log_offset,
            classes: see :func:`build_labels`.
    """
    if classes and labels is None:
        raise ValueError("--data.classes needs --labels, a CSV with those columns")
    table = (
        read_label_table(labels, classes) if labels is not None else table_from_slide_ids(slide_ids)
    )
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
        classes=classes,
    )


__all__ = [
    "CLASS_NAMES",
    "LOG2FC_SUFFIX",
    "Labels",
    "SampleMatch",
    "build_labels",
    "categorical_targets",
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
