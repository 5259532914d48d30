"""Reading the TSV/CSV tables of a cohort, and ids in error messages.

Shared by :mod:`histcode.finetune.labels` (labels CSV), :mod:`histcode.finetune.expression`
(expression matrices, GDC sample sheets) and :mod:`histcode.finetune.cohort`. Tables are read
as strings (numbers are parsed by whoever knows the column); leading ``#`` lines — GDC's
``# gene-model: GENCODE v36``, histcode's ``# units: tpm`` — are kept apart as comments.
"""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import pandas as pd


def preview(items: Iterable[object], n: int = 8) -> str:
    """``a, b, c … (12 in all)``: a short list of ids for error messages."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:n])
    return f"{shown} … ({len(items)} in all)" if len(items) > n else shown


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


__all__ = ["at_lines", "leading_comments", "preview", "read_table", "write_atomic"]
