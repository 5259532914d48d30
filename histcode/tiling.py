"""Tiling: a grid of tiles at a target µm/px over the tissue of each slide → ``tiles.zarr``.

The level-0 tile side is ``tile_size × target_mpp / mpp_level0`` (a float; corners are
rounded), so a 40x (0.25 µm/px) and a 20x (0.5 µm/px) scan of the same tissue get the same
tiles over the same area. Tiles are later read from the pyramid level nearest the target that
is at least as fine (``level``), and resized to ``tile_size``.

Each tile keeps its tissue fraction, measured exactly on the tissue mask by a summed-area
table; tiles below ``min_tissue`` are dropped. Only coordinates are stored, never pixels.

Before tiling, the thumbnail that tissue is segmented on is checked to be a brightfield H&E
scan (:mod:`histcode.slideqc`: bright neutral glass, tissue that absorbs, in H&E colours); a
fluorescence, inverted or mis-decoded slide is recorded as ``failed`` (``--brightfield_qc
warn`` tiles it with a warning). The measurements are kept in each slide's ``qc`` attrs.

Level-0 µm/px comes from the slide's metadata; ``--mpp_override`` is used only for slides
without any, and ``--mpp_csv`` gives it per slide (replacing metadata, with a warning).

``--stain_norm macenko`` estimates each slide's stains (:func:`histcode.stain.estimate_macenko`)
from a seeded random sample of its tissue tiles, read at the store's resolution by the reader
that pretraining and embedding use (:func:`histcode.tilereader.read_tile`), and stores them in
the slide's attrs (``stain``); the tile reader then maps every tile of the slide to the
reference stains. A slide whose sample holds too little tissue (or one stain only) to estimate
is ``failed``, naming why. A store is normalised or not as a whole: its ``stain_norm`` must
match on rerun like ``mpp`` and ``tile_size`` (``--overwrite`` redoes every slide).
"""

from __future__ import annotations

import csv
import glob
import logging
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from histcode import stain
from histcode.commandkit import EXIT_OK, EXIT_PARTIAL, CommandResult, adapter, run_function
from histcode.segmentation import SegmentationParams, segment_tissue
from histcode.slide import (
    SLIDE_EXTENSIONS,
    SlideError,
    SlideReader,
    check_mpp,
    open_slide,
    slide_id,
)
from histcode.slideqc import QC_MODES, QCMode, measure_brightfield
from histcode.tilestore import TileStore

log = logging.getLogger(__name__)

#: Fewest tissue pixels (OD above ``stain.BETA`` in every channel) a slide's stain estimate
#: takes: about 2.5 tissue tiles of 64 px, a sixth of one of 256 px.
STAIN_MIN_PIXELS = 10_000
#: Seed of the draw of the tiles (and pixels) a slide's stains are estimated from.
STAIN_SEED = 0
#: Most pixels (tissue and glass) of a slide's sampled tiles that enter its stain estimate,
#: drawn evenly from the tiles (bounds its memory: 128 tiles of 512 px hold 33 M pixels).
STAIN_MAX_PIXELS = 2_000_000
#: Parameters an existing store must share with a run that adds slides to it.
MUST_MATCH = ("mpp", "tile_size", "min_tissue", "seg_mpp", "seg_coarsen", "stain_norm")
#: The value of a parameter in a store made before the parameter existed.
PARAM_DEFAULTS = {"stain_norm": "none"}


@dataclass(frozen=True)
class TilingParams:
    """What decides a slide's tiles (stored in the tile store's root attrs).

    Each attribute is also an option of ``histcode tile`` (:func:`tile_slides`); its help is
    the text below.

    Attributes:
        mpp: target µm/px of the tiles (0.5 ≈ 20x, 0.25 ≈ 40x).
        tile_size: tile side in pixels at the target µm/px.
        min_tissue: drop tiles whose tissue fraction is below this (0–1).
        seg_mpp: µm/px of the thumbnail used for tissue segmentation.
        seg_coarsen: segment a pyramid level up to this many times coarser than seg_mpp
            when that spares decoding a much larger level (1 = never coarser; 40x Aperio
            pyramids have 4 and 16 µm/px levels: 16 is used, not 4).
        verify_tiles: tiles per slide read back (at the read level) to detect damaged tile
            data (0 to skip).
        stain_norm: 'macenko' normalises the stains of every slide: its stain matrix is
            estimated from --stain_tiles of its tissue tiles and stored in the store, and
            pretraining and embedding read its tiles mapped to Macenko's reference H&E
            stains. A slide with too little tissue to estimate is failed, naming why.
            'none' (default) reads the tiles as scanned. A store is normalised or not as a
            whole: rerunning with another value is refused (use another --out, or
            --overwrite to redo every slide).
        stain_tiles: tissue tiles per slide (a seeded random draw) the stains are estimated
            from.
    """

    mpp: float = 0.5
    tile_size: int = 256
    min_tissue: float = 0.5
    seg_mpp: float = 8.0
    seg_coarsen: float = 2.0
    verify_tiles: int = 8
    stain_norm: Literal["none", "macenko"] = "none"
    stain_tiles: int = 128

    def check(self) -> None:
        """Raise ``ValueError`` with a fix for impossible values."""
        if not 0.05 <= self.mpp <= 50:
            raise ValueError(f"--mpp {self.mpp}: expected 0.05–50 µm/px (0.5 is 20x)")
        if not 16 <= self.tile_size <= 4096:
            raise ValueError(f"--tile_size {self.tile_size}: expected 16–4096 px (256 typical)")
        if not 0 <= self.min_tissue <= 1:
            raise ValueError(f"--min_tissue {self.min_tissue}: a fraction, expected 0–1")
        if self.seg_mpp < self.mpp:
            raise ValueError(f"--seg_mpp {self.seg_mpp} must be ≥ --mpp {self.mpp}")
        if self.seg_coarsen < 1:
            raise ValueError(f"--seg_coarsen {self.seg_coarsen}: expected ≥ 1 (1 = never coarser)")
        if self.stain_norm not in stain.STAIN_NORMS:
            raise ValueError(
                f"--stain_norm {self.stain_norm!r}: choose one of {', '.join(stain.STAIN_NORMS)}"
            )
        if self.stain_tiles < 1:
            raise ValueError(f"--stain_tiles {self.stain_tiles}: expected at least 1 (128 typical)")


@dataclass
class SlideTiling:
    """The outcome of tiling one slide.

    Attributes:
        slide_id: file stem.
        attrs: the slide group's attributes (contract of the tile store).
        coords: (N, 2) int64 level-0 top-left corners.
        tissue: (N,) float32 tissue fractions.
        seconds: wall time.
    """

    slide_id: str
    attrs: dict[str, Any]
    coords: np.ndarray
    tissue: np.ndarray
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return self.attrs["status"]


@dataclass(frozen=True)
class SlideMpp:
    """One slide's level-0 µm/px given by the user (a ``--mpp_csv`` row).

    Attributes:
        mpp: level-0 µm/px; replaces the slide's metadata.
        given_by: where it was given, for messages and attrs (``--mpp_csv FILE line N``).
    """

    mpp: float
    given_by: str


def tile_grid(width: int, height: int, side: float) -> np.ndarray:
    """Top-left corners of every whole tile of side ``side`` (level-0 px) inside the slide.

    Returns:
        (N, 2) int64 x, y, row-major.
    """
    nx, ny = int(width // side), int(height // side)
    xs = np.round(np.arange(nx) * side).astype(np.int64)
    ys = np.round(np.arange(ny) * side).astype(np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fractions(
    mask: np.ndarray, scale: tuple[float, float], coords: np.ndarray, side: float
) -> np.ndarray:
    """Exact tissue fraction of each tile from a low-resolution mask.

    The summed-area table of a piecewise-constant mask is bilinear inside each mask pixel,
    so interpolating it at the tile's (fractional) corners gives the exact covered area.

    Args:
        mask: (h, w) bool tissue mask covering the whole slide.
        scale: (mask px per level-0 px in x, in y).
        coords: (N, 2) level-0 top-left corners.
        side: level-0 tile side.

    Returns:
        (N,) float32 in [0, 1].
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.float64)
    sat[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)

    def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.clip(x, 0, w)
        y = np.clip(y, 0, h)
        x0 = np.minimum(np.floor(x).astype(np.int64), w - 1)
        y0 = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx, fy = x - x0, y - y0
        return (
            sat[y0, x0] * (1 - fx) * (1 - fy)
            + sat[y0, x0 + 1] * fx * (1 - fy)
            + sat[y0 + 1, x0] * (1 - fx) * fy
            + sat[y0 + 1, x0 + 1] * fx * fy
        )

    x0 = coords[:, 0] * scale[0]
    y0 = coords[:, 1] * scale[1]
    x1 = (coords[:, 0] + side) * scale[0]
    y1 = (coords[:, 1] + side) * scale[1]
    area = at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)
    return np.clip(area / ((x1 - x0) * (y1 - y0)), 0, 1).astype(np.float32)


def _verify(reader: SlideReader, coords: np.ndarray, side: float, level: int, n: int) -> None:
    """Read ``n`` tiles spread over the slide at ``level``; raises SlideError if damaged."""
    if n <= 0 or len(coords) == 0:
        return
    size = max(1, round(side / reader.level_downsamples[level]))
    for i in np.unique(np.linspace(0, len(coords) - 1, min(n, len(coords))).round().astype(int)):
        reader.read_region((int(coords[i, 0]), int(coords[i, 1])), level, (size, size))


def estimate_slide_stains(
    reader: SlideReader,
    slide_attrs: dict[str, Any],
    coords: np.ndarray,
    tile_size: int,
    n_tiles: int,
    seed: int = STAIN_SEED,
) -> dict[str, Any]:
    """A slide's Macenko stains from a seeded random sample of its tiles.

    The tiles are read as the tile reader reads them (:func:`read_tile`: the store's pyramid
    level and resolution), so the stains are those of the pixels they will normalise. At most
    :data:`STAIN_MAX_PIXELS` of their pixels, the same number from each tile, enter the
    estimate (of which at most a million tissue pixels, :func:`~histcode.stain.estimate_macenko`).

    Args:
        reader: the open slide.
        slide_attrs: the slide's tile-store attrs so far (where and at which level its tiles
            are read: ``path``, ``level``, ``tile_size_level0``, …).
        coords: (N, 2) the slide's tiles (its tissue tiles).
        tile_size: tile side at the store's µm/px.
        n_tiles: tiles drawn (all of them when there are fewer).
        seed: seed of the draw of tiles and of pixels.

    Returns:
        The slide's ``stain`` attrs: :meth:`histcode.stain.StainParams.to_dict` plus
        ``tiles`` (how many were read) and ``seed``.

    Raises:
        SlideError: too little tissue in the sample, or one stain only; says what to do.
    """
    # tilereader (with torch) only here: tiling without --stain_norm stays free of torch
    from histcode.tilereader import SlideGeometry, read_tile

    geometry = SlideGeometry.from_attrs(slide_id(slide_attrs["path"]), slide_attrs)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(coords), min(n_tiles, len(coords)), replace=False))
    per_tile = min(tile_size * tile_size, max(1, STAIN_MAX_PIXELS // len(chosen)))
    pixels = []
    for i in chosen:
        rgb = read_tile(reader, geometry, coords[i], tile_size).reshape(-1, 3)
        if per_tile < len(rgb):
            rgb = rgb[rng.choice(len(rgb), per_tile, replace=False)]
        pixels.append(rgb)
    as_tiles = np.concatenate(pixels)[:, :, None, None]  # (P, 3, 1, 1): pixels as 1-px tiles
    try:
        params = stain.estimate_macenko(as_tiles, min_pixels=STAIN_MIN_PIXELS, seed=seed)
    except ValueError as err:
        raise SlideError(
            f"{geometry.path}: cannot estimate its stains for --stain_norm macenko from "
            f"{len(chosen)} of its {len(coords)} tissue tiles: {err}. Tile it into a store "
            "without --stain_norm (normalised and raw slides cannot share a store), or, if "
            "it has more tissue than these tiles show, raise --stain_tiles or lower "
            "--min_tissue."
        ) from None
    return {**params.to_dict(), "tiles": len(chosen), "seed": seed}


def tile_slide(
    path: Path | str,
    params: TilingParams = TilingParams(),
    mpp_override: float | None = None,
    segmentation: SegmentationParams | None = None,
    *,
    slide_mpp: SlideMpp | None = None,
    brightfield_qc: QCMode = "fail",
) -> SlideTiling:
    """Segment and tile one slide. Never raises for a bad slide: it comes back ``failed``.

    Args:
        path: the slide file.
        params: tile geometry and thresholds.
        mpp_override: level-0 µm/px used when the slide's metadata has none
            (``--mpp_override``).
        segmentation: tissue segmentation parameters.
        slide_mpp: this slide's level-0 µm/px, replacing its metadata (a ``--mpp_csv`` row).
        brightfield_qc: ``fail``: a slide that does not look like brightfield H&E
            (:func:`histcode.slideqc.measure_brightfield`) is ``failed``; ``warn``: it is
            tiled, its ``qc`` attrs say it failed; ``off``: measured, not acted on.

    Returns:
        The slide's tiles and attributes; ``status`` is ``ok``, ``empty`` (no tissue) or
        ``failed`` (``error`` says why and how to fix). ``qc`` holds the brightfield
        measurements (None when the slide could not be read that far). ``stain_norm`` is
        ``params.stain_norm``; ``stain`` the slide's estimated stains (None unless ``ok``
        and normalised: a slide whose stains cannot be estimated is ``failed``).
    """
    start = time.perf_counter()
    path = Path(path)
    sid = slide_id(path)
    attrs: dict[str, Any] = {
        "path": str(path.resolve()),
        "status": "failed",
        "error": None,
        "qc": None,
        "stain_norm": params.stain_norm,
        "stain": None,
    }
    empty = np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    try:
        with open_slide(
            path,
            mpp_override=None if slide_mpp is None else slide_mpp.mpp,
            mpp_fallback=mpp_override,
        ) as reader:
            side = params.tile_size * params.mpp / reader.mpp
            level = reader.level_for_mpp(params.mpp)
            source = reader.mpp_source
            attrs.update(
                mpp_level0=reader.mpp,
                mpp_source=source.source,
                tile_size_level0=side,
                level=level,
                level_downsample=float(reader.level_downsamples[level]),
                dimensions=list(reader.dimensions),
                vendor=reader.vendor,
                fingerprint=reader.fingerprint(),
            )
            if source.source == "override":
                attrs["mpp_override_from"] = (
                    "--mpp_override" if slide_mpp is None else slide_mpp.given_by
                )
            if source.replaced is not None:
                attrs["mpp_metadata"] = {"mpp": source.replaced[0], "source": source.replaced[1]}
            if min(reader.dimensions) < side:
                raise SlideError(
                    f"{path}: the slide ({reader.dimensions[0]}×{reader.dimensions[1]} px at "
                    f"{reader.mpp:.4g} µm/px) is smaller than one tile ({side:.0f} px). Use a "
                    "smaller --tile_size or a coarser --mpp."
                )
            thumb, thumb_mpp = reader.thumbnail(params.seg_mpp, params.seg_coarsen)
            mask = segment_tissue(thumb, thumb_mpp, segmentation)
            qc = measure_brightfield(thumb, mask)
            attrs["qc"] = qc.attrs(brightfield_qc)
            if not qc.passed and brightfield_qc == "fail":
                raise SlideError(
                    f"{path}: not a brightfield H&E scan by its colours (brightfield QC "
                    f"failed: {qc.describe()}). Re-export mis-decoded colours as RGB; if it "
                    "is H&E after all (an unusual stain or scanner), tile it anyway with "
                    "--brightfield_qc warn (or off)."
                )
            scale = (reader.mpp / thumb_mpp, reader.mpp / thumb_mpp)  # mask px per level-0 px
            coords = tile_grid(*reader.dimensions, side)
            tissue = tissue_fractions(mask, scale, coords, side)
            keep = tissue >= max(params.min_tissue, 1e-6)
            coords, tissue = coords[keep], tissue[keep]
            _verify(reader, coords, side, level, params.verify_tiles)
            if params.stain_norm == "macenko" and len(coords):
                attrs["stain"] = estimate_slide_stains(
                    reader, attrs, coords, params.tile_size, params.stain_tiles
                )
        attrs["status"] = "ok" if len(coords) else "empty"
        if not len(coords):
            attrs["error"] = None
    except (SlideError, FileNotFoundError, OSError, ValueError) as err:
        attrs["error"] = str(err)
        coords, tissue = empty
    except Exception as err:
        attrs["error"] = f"{path}: unexpected {type(err).__name__}: {err}"
        coords, tissue = empty
    return SlideTiling(sid, attrs, coords, tissue, time.perf_counter() - start)


def read_mpp_csv(path: Path | str, slides: Sequence[Path]) -> dict[str, SlideMpp]:
    """Per-slide level-0 µm/px from a CSV of ``slide, mpp`` rows.

    A slide is named by its id (the file name without extension, or with it) or by its path
    (as given, else relative to the CSV's folder). A header row (e.g. ``slide,mpp``), blank
    lines and ``#`` comments are allowed; fields are separated by commas, tabs or semicolons.

    Args:
        path: the CSV file.
        slides: the slides of the run.

    Returns:
        slide id → its µm/px and the line that gave it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a row that is not ``slide, µm/px``, a µm/px that is not a plausible
            number, a slide that is not in the run, or a slide listed twice; the message
            names the file, the line and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--mpp_csv {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(
            f"--mpp_csv {path} is not UTF-8 text; save it as a CSV of 'slide,mpp' rows."
        ) from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"--mpp_csv {path} has no rows; expected 'slide,mpp' rows.")
    first = lines[0][1]
    delimiter = "\t" if "\t" in first else ";" if ";" in first and "," not in first else ","
    ids = {slide_id(p): p for p in slides}
    by_path = {p.resolve(): sid for sid, p in ids.items()}
    fix = "Expected rows of 'slide,mpp' (slide id or path, level-0 µm/px such as 0.25)."
    found: dict[str, SlideMpp] = {}
    lines_of: dict[str, int] = {}
    for index, (n, line) in enumerate(lines):
        fields = [f.strip() for f in next(csv.reader([line], delimiter=delimiter))]
        while len(fields) > 2 and not fields[-1]:
            fields.pop()
        where = f"--mpp_csv {path}, line {n}"
        if len(fields) != 2 or not fields[0]:
            raise ValueError(f"{where}: {line.strip()!r} has {len(fields)} fields. {fix}")
        key, value = fields
        try:
            mpp = float(value)
        except ValueError:
            if index == 0:  # a header row
                continue
            raise ValueError(f"{where}: µm/px {value!r} is not a number. {fix}") from None
        check_mpp(mpp, f"{where}: µm/px")
        sid = _csv_slide(key, ids, by_path, path.parent)
        if sid is None:
            shown = ", ".join(sorted(ids)[:5]) + (", …" if len(ids) > 5 else "")
            raise ValueError(
                f"{where}: {key!r} is not a slide of this run (its slides: {shown}). Name a "
                "slide of --slides by its id or path, or remove the row."
            )
        if sid in found:
            raise ValueError(
                f"{where}: slide {sid} is already given on line {lines_of[sid]}; keep one row "
                "per slide."
            )
        found[sid] = SlideMpp(mpp, f"--mpp_csv {path} line {n}")
        lines_of[sid] = n
    return found


def _csv_slide(
    key: str, ids: dict[str, Path], by_path: dict[Path, str], folder: Path
) -> str | None:
    """The id of the run's slide that a ``--mpp_csv`` row names, or None."""
    if "/" in key or "\\" in key:
        for candidate in (Path(key), folder / key):
            sid = by_path.get(candidate.resolve())
            if sid is not None:
                return sid
        return None
    if key in ids:
        return key
    try:
        sid = slide_id(key)
    except ValueError:
        return None
    return sid if sid in ids else None


def discover_slides(inputs: Iterable[str]) -> list[Path]:
    """Slide files from files, folders (searched recursively) and glob patterns.

    In a folder, files with a slide extension are taken (``SLIDE_EXTENSIONS``); a folder of
    DICOM files is one slide. A file named explicitly is taken whatever its extension.

    Raises:
        FileNotFoundError: an input matches nothing.
        ValueError: two slides share an id, or an id is unsafe.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SLIDE_EXTENSIONS)
            dicom_dirs: set[Path] = set()
            for p in files:
                if p.name.startswith("."):
                    continue
                if p.suffix.lower() == ".dcm":
                    if p.parent not in dicom_dirs:
                        dicom_dirs.add(p.parent)
                        found.append(p)
                else:
                    found.append(p)
        elif matches := sorted(glob.glob(item, recursive=True)):
            found += [Path(m) for m in matches if Path(m).is_file()]
        else:
            raise FileNotFoundError(f"--slides {item}: no such file, folder or pattern")
    if not found:
        raise FileNotFoundError(
            f"--slides {' '.join(inputs)}: no slide files found (looked for "
            f"{', '.join(SLIDE_EXTENSIONS)})"
        )
    by_id: dict[str, Path] = {}
    for p in found:
        sid = slide_id(p)
        if sid in by_id and by_id[sid].resolve() != p.resolve():
            raise ValueError(
                f"two slides share the id {sid!r}: {by_id[sid]} and {p}. Slide ids are file "
                "names without extension and must be unique; rename one."
            )
        by_id[sid] = p
    return [by_id[k] for k in sorted(by_id)]


@dataclass
class TilingReport:
    """What a tiling run did, slide by slide."""

    store: Path
    slides: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counts(self) -> Counter[str]:
        return Counter(s["status"] for s in self.slides)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [s for s in self.slides if s["status"] == "failed"]


def tile_slides(
    slides: Sequence[str | Path],
    out: Path | str,
    params: TilingParams = TilingParams(),
    workers: int = 1,
    overwrite: bool = False,
    mpp_override: float | None = None,
    progress: bool = True,
    *,
    mpp_csv: Path | str | None = None,
    brightfield_qc: QCMode = "fail",
) -> TilingReport:
    """Segment tissue and lay a grid of tiles at a target µm/px on each slide; write tiles.zarr.

    Only tile coordinates are stored (never pixels). Rerunning skips finished slides and
    retries failed ones. A slide that cannot be read, or that is not a brightfield H&E scan
    (see --brightfield_qc), is recorded as failed with its error and the others still
    complete (exit status 1). ``histcode tile`` is this function (:func:`tile`), with
    ``params``'s attributes as options of their own.

    Args:
        slides: slide files, folders (searched recursively) or glob patterns, e.g.
            ``--slides cohort/slides`` or ``--slides a.svs b.ndpi``.
        out: the tile store to write (a zarr v3 folder, e.g. tiles.zarr).
        params: tile geometry and thresholds (must match an existing store's).
        workers: slides tiled in parallel (processes).
        overwrite: redo slides already in the store.
        mpp_override: level-0 µm/px of the slides whose metadata has none (no OpenSlide mpp,
            no TIFF resolution); it replaces the objective-power guess. Slides whose metadata
            has a µm/px keep it: to change one, use --mpp_csv.
        progress: show a progress bar on stderr.
        mpp_csv: CSV of 'slide,mpp' rows (slide id or path, level-0 µm/px; a header row is
            allowed): those slides' µm/px, replacing their metadata, with a warning naming
            the slide and both values. A row naming a slide not in --slides is an error.
        brightfield_qc: what happens to a slide whose thumbnail does not look like
            brightfield H&E (dark or coloured glass, tissue brighter than glass, tissue
            colours outside haematoxylin and eosin: fluorescence, inverted or mis-decoded
            colours): 'fail' records it as failed naming the check and values; 'warn' tiles
            it with a warning; 'off' tiles it silently. The measurements are stored in each
            slide's 'qc' attrs either way.

    Returns:
        A report listing each slide's status, tiles and error.

    Raises:
        ValueError: unusable arguments, or a malformed ``mpp_csv`` (nothing is written).
    """
    params.check()
    if workers < 1:
        raise ValueError(f"--workers {workers}: expected at least 1")
    if brightfield_qc not in QC_MODES:
        raise ValueError(f"--brightfield_qc {brightfield_qc!r}: choose one of {QC_MODES}")
    if mpp_override is not None:
        check_mpp(mpp_override, "--mpp_override")
    paths = discover_slides([str(s) for s in slides])
    per_slide = read_mpp_csv(mpp_csv, paths) if mpp_csv is not None else {}
    store = TileStore(out)
    report = TilingReport(store.path)
    with store.lock():
        root = {
            **asdict(params),
            "mpp_override": mpp_override,
            "mpp_csv": None if mpp_csv is None else str(Path(mpp_csv).resolve()),
            "brightfield_qc": brightfield_qc,
        }
        if overwrite:
            _check_no_mixed_stains(store, params.stain_norm, {slide_id(p) for p in paths})
        stained = params.stain_norm != "none"
        store.initialise(
            root,
            must_match=MUST_MATCH,
            overwrite_params=overwrite,
            defaults=PARAM_DEFAULTS,
            root={
                "stain_norm": params.stain_norm,
                "stain_target": stain.REFERENCE.to_dict() if stained else None,
            },
        )
        todo = []
        for p in paths:
            sid = slide_id(p)
            status = None if overwrite else store.status(sid)
            if status in ("ok", "empty"):
                done = store.read(sid)
                _warn_if_not_applied(done.attrs, per_slide.get(sid), sid)
                report.slides.append(
                    {
                        "slide_id": sid,
                        "status": status,
                        "tiles": len(done),
                        "error": None,
                        "skipped": True,
                    }
                )
            else:
                todo.append(p)
        bar = tqdm(
            total=len(todo), desc="tiling", unit="slide", disable=not progress, file=sys.stderr
        )

        def record(result: SlideTiling) -> None:
            store.write(result.slide_id, result.attrs, result.coords, result.tissue)
            qc = result.attrs.get("qc") or {}
            report.slides.append(
                {
                    "slide_id": result.slide_id,
                    "status": result.status,
                    "tiles": len(result.coords),
                    "error": result.attrs["error"],
                    "qc_failed": qc.get("failed"),
                    "seconds": round(result.seconds, 3),
                    "skipped": False,
                }
            )
            _log_outcome(result)
            bar.update()
            bar.set_postfix(tiles=sum(s["tiles"] for s in report.slides))

        def options(p: Path) -> dict[str, Any]:
            return {"slide_mpp": per_slide.get(slide_id(p)), "brightfield_qc": brightfield_qc}

        if workers == 1 or len(todo) <= 1:
            for p in todo:
                record(tile_slide(p, params, mpp_override, **options(p)))
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of zarr's I/O threads
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
                futures = [
                    pool.submit(tile_slide, p, params, mpp_override, **options(p)) for p in todo
                ]
                for future in as_completed(futures):
                    record(future.result())
        bar.close()
    report.slides.sort(key=lambda s: s["slide_id"])
    return report


def _check_no_mixed_stains(store: TileStore, stain_norm: str, redone: set[str]) -> None:
    """With ``--overwrite``, refuse a changed ``--stain_norm`` that would leave slides of the
    store that this run does not redo with the other setting (normalised and raw mixed)."""
    if not store.exists() or store.stain_norm == stain_norm:
        return
    kept = [
        t.slide_id
        for t in store.iter_slides()
        if t.slide_id not in redone and (t.attrs.get("stain_norm") or "none") != stain_norm
    ]
    if kept:
        shown = ", ".join(kept[:5]) + (", …" if len(kept) > 5 else "")
        raise ValueError(
            f"{store.path} holds {len(kept)} slide(s) tiled with stain_norm "
            f"{store.stain_norm!r} that --slides does not include ({shown}); --overwrite "
            f"with --stain_norm {stain_norm} would leave them mixed with slides tiled with "
            f"stain_norm {stain_norm!r}. "
            "Include them in --slides, or tile into a new --out."
        )


def _log_outcome(result: SlideTiling) -> None:
    """Log a slide's failure, emptiness, QC warning and µm/px override (main process)."""
    attrs, sid = result.attrs, result.slide_id
    if result.status == "failed":
        log.error("%s failed: %s", sid, attrs["error"])
    elif result.status == "empty":
        log.warning(
            "%s: no tissue found in %s (a blank slide, or tissue too faint to segment); "
            "recorded as empty, with no tiles. If it has tissue, check the scan or lower "
            "--min_tissue.",
            sid,
            attrs["path"],
        )
    qc = attrs.get("qc") or {}
    if result.status != "failed" and qc.get("passed") is False and qc.get("mode") == "warn":
        log.warning(
            "%s: brightfield QC failed (%s) but the slide was tiled (--brightfield_qc warn): "
            "%s. Its predictions may be meaningless unless it is brightfield H&E.",
            sid,
            ", ".join(qc["failed"]),
            qc["message"],
        )
    meta = attrs.get("mpp_metadata")
    if meta is not None:
        log.warning(
            "%s: µm/px %.4g from %s replaces %.4g from the slide's metadata (%s); the tiles "
            "use %.4g. Remove the row if the metadata is right.",
            sid,
            attrs["mpp_level0"],
            attrs.get("mpp_override_from"),
            meta["mpp"],
            meta["source"],
            attrs["mpp_level0"],
        )


def _warn_if_not_applied(attrs: dict[str, Any], row: SlideMpp | None, sid: str) -> None:
    """A finished slide is skipped: say so when its ``--mpp_csv`` row would change it."""
    if row is None or abs(attrs.get("mpp_level0", row.mpp) - row.mpp) <= 1e-3 * row.mpp:
        return
    log.warning(
        "%s is already tiled at %.4g µm/px (%s); %s gives %.4g, which is not applied to "
        "finished slides. Rerun with --overwrite to retile it.",
        sid,
        attrs.get("mpp_level0"),
        attrs.get("mpp_source"),
        row.given_by,
        row.mpp,
    )


def _tile_outcome(report: TilingReport, stain_norm: str, **_: Any) -> CommandResult:
    """``histcode tile``'s result line, summary details and exit status."""
    counts = report.counts
    result = {
        "out": str(report.store),
        "stain_norm": stain_norm,
        "slides": len(report.slides),
        **{k: counts.get(k, 0) for k in ("ok", "empty", "failed")},
        "skipped": sum(s["skipped"] for s in report.slides),
        "tiles": sum(s["tiles"] for s in report.slides),
        "failed_slides": [s["slide_id"] for s in report.failed],
        "qc_warned_slides": [
            s["slide_id"] for s in report.slides if s["status"] != "failed" and s.get("qc_failed")
        ],
    }
    return CommandResult(
        out_dir=report.store,
        result=result,
        details={"slides": report.slides},
        exit_code=EXIT_PARTIAL if report.failed else EXIT_OK,
    )


#: ``histcode tile``: :func:`tile_slides` as a command, :class:`TilingParams` as options.
tile = adapter(tile_slides, _tile_outcome, expand=["params"], command_types={"slides": list[str]})


def main(argv: Sequence[str], prog: str = "histcode tile") -> int:
    """``histcode tile``."""
    return run_function(tile, argv, prog, "tile")
