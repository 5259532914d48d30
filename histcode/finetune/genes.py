"""Gene lists: the shipped driver genes, a gene-list file, and which genes a run models."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from histcode.finetune.tables import preview

log = logging.getLogger(__name__)


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
    """The driver and immune genes shipped with histcode (``data/driver_genes.txt`` here)."""
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


__all__ = ["default_genes", "read_gene_list", "resolve_genes"]
