"""Drawing and writing per-tile scores over a slide: PNG heatmap, montage, GeoJSON, CSV.

Model-agnostic: these functions take tile coordinates and one score per tile (attention, a
gene's tile contribution, …), whatever model made them. ``histcode heatmap`` computes the
scores (:mod:`histcode.finetune.maps`) and calls them; scoring maps against a synthetic
cohort's truth masks is :mod:`histcode.synth.scoring`.

- :func:`draw_heatmap`: the slide thumbnail beside the scores over it, with a colour bar (PNG);
  :func:`score_grid` makes the scores one image at tile resolution, and
  :func:`thumbnail_mpp_for` chooses the thumbnail's resolution from the slide's size.
- :func:`draw_montage`: the top-k and bottom-k tiles with their scores (PNG).
- :func:`tiles_geojson`: a GeoJSON FeatureCollection of tile squares with their scores in
  level-0 pixel coordinates, which QuPath imports (File › Import objects) as detections with
  measurements; :func:`write_geojson` writes it.
- :func:`write_tile_scores_csv`: every tile's corner and scores, one row a tile.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from histcode.slide import SlideReader
from histcode.tilereader import SlideGeometry, read_tile

#: resolution of the PNGs
DPI = 150


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def score_grid(
    coords: np.ndarray, side: float, scores: np.ndarray
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Tile scores as one image at tile resolution: one pixel per cell of the tile grid.

    Tiles written by ``histcode tile`` sit on the grid ``round(k × side)`` from the slide's
    origin; each lands in its own pixel, so neighbouring tiles touch whatever the thumbnail
    resolution (painting tile squares into a thumbnail leaves 1-px seams where ``side``
    is fractional).

    Args:
        coords: (N, 2) level-0 top-left corners.
        side: level-0 tile side.
        scores: (N,) one score per tile.

    Returns:
        (rows, cols) float32 grid, NaN where there is no tile, and its extent in level-0
        pixels ``(left, right, bottom, top)`` for ``imshow(..., extent=...)``.

    Raises:
        ValueError: tiles that are not on the grid ``round(k × side)``, or two on one cell.
    """
    coords = np.asarray(coords, float).reshape(-1, 2)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} tiles but {len(scores)} scores")
    if side <= 0:
        raise ValueError(f"tile side must be > 0 level-0 px, got {side}")
    cells = np.round(coords / side).astype(np.int64)
    off = np.abs(cells * side - coords).max() if len(coords) else 0.0
    if len(coords) and (off > 1.0 or cells.min() < 0):
        raise ValueError(
            f"tiles are not on a grid of side {side:g} level-0 px from the origin (a corner is "
            f"{off:.1f} px off); expected corners at round(k × side) as `histcode tile` writes"
        )
    cols = int(cells[:, 0].max()) + 1 if len(cells) else 0
    rows = int(cells[:, 1].max()) + 1 if len(cells) else 0
    grid = np.full((rows, cols), np.nan, np.float32)
    flat = cells[:, 1] * cols + cells[:, 0]
    if len(np.unique(flat)) != len(flat):
        raise ValueError("two tiles fall on one grid cell: the tiles overlap; cannot draw them")
    grid[cells[:, 1], cells[:, 0]] = scores
    return grid, (0.0, cols * float(side), rows * float(side), 0.0)


def thumbnail_mpp_for(
    dimensions: tuple[int, int],
    mpp0: float,
    side: float,
    px_per_tile: float = 16.0,
    min_px: int = 512,
    max_px: int = 2048,
) -> float:
    """The µm/px of a heatmap's thumbnail, chosen from the slide's size.

    The longest side gets ``px_per_tile`` pixels per tile, kept within ``[min_px, max_px]``
    (and never finer than level 0): a small slide still shows its tissue, a large one stays
    a few MB.

    Args:
        dimensions: level-0 (width, height).
        mpp0: level-0 µm/px.
        side: level-0 tile side.
        px_per_tile: thumbnail pixels per tile side wanted.
        min_px, max_px: bounds on the thumbnail's longest side.

    Returns:
        µm/px for :meth:`SlideReader.thumbnail`.
    """
    longest = float(max(dimensions))
    wanted = min(max(px_per_tile * longest / side, min_px), max_px, longest)
    return longest * mpp0 / wanted


def ratio_limits(values: np.ndarray, least: float = 2.0, most: float = 1000.0) -> float:
    """``r`` of a log colour scale from ``1/r`` to ``r`` that holds 1 and the values' range.

    At least ``least`` so that a flat map (every value near 1) keeps one colour, the middle
    one; at most ``most``.
    """
    finite = np.asarray(values, float)
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if not finite.size:
        return least
    return float(np.clip(max(finite.max(), 1.0 / finite.min()), least, most))


def _save(fig: Any, path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight", metadata=dict(metadata or {}))
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def draw_heatmap(
    reader: SlideReader,
    coords: np.ndarray,
    side: float,
    scores: np.ndarray,
    path: Path | str,
    title: str,
    label: str = "score",
    cmap: str = "inferno",
    thumbnail_mpp: float | None = None,
    alpha: float = 0.6,
    centre: float | None = None,
    ratio: bool = False,
    warning: str | None = None,
) -> Path:
    """The slide thumbnail beside the same thumbnail under the tile scores, with a colour bar.

    Both panels show the whole slide at the same size and position (level-0 coordinates);
    the scores are one image at tile resolution (:func:`score_grid`), so there are no seams
    between tiles. The title (and ``warning``) also go into the PNG's ``Title`` and
    ``Warning`` text chunks.

    Args:
        reader: the open slide.
        coords: (N, 2) level-0 top-left corners.
        side: level-0 tile side.
        scores: (N,) one score per tile.
        path: PNG to write.
        title: what the map shows and what made it (model ref, slide id).
        label: colour bar label.
        cmap: matplotlib colour map (a diverging one with ``centre`` or ``ratio``).
        thumbnail_mpp: µm/px of the thumbnail; ``None`` chooses it from the slide's size
            (:func:`thumbnail_mpp_for`).
        alpha: opacity of the scores over the thumbnail.
        centre: centre a linear diverging colour scale on this value (0 for contributions).
        ratio: the scores are multiples of a reference value 1 (attention × n tiles): a log
            colour scale from ``1/r`` to ``r`` (:func:`ratio_limits`), 1 in the middle.
        warning: drawn in red above the title (e.g. the slide was seen in training).

    Returns:
        The path written.
    """
    from matplotlib.colors import LogNorm, Normalize

    plt = _pyplot()
    scores = np.asarray(scores, np.float32)
    if thumbnail_mpp is None:
        thumbnail_mpp = thumbnail_mpp_for(reader.dimensions, reader.mpp, side)
    thumb, mpp = reader.thumbnail(thumbnail_mpp)
    per_px = mpp / reader.mpp  # level-0 px per thumbnail px
    th, tw = thumb.shape[:2]
    thumb_extent = (0.0, tw * per_px, th * per_px, 0.0)
    grid, grid_extent = score_grid(coords, side, scores)
    if ratio:
        r = ratio_limits(scores)
        norm: Normalize = LogNorm(vmin=1.0 / r, vmax=r)
        grid = np.where(np.isfinite(grid), np.clip(grid, 1.0 / r, r), np.nan)
    else:
        finite = scores[np.isfinite(scores)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if centre is not None:
            half = max(abs(vmax - centre), abs(centre - vmin)) or 1.0
            vmin, vmax = centre - half, centre + half
        elif vmax <= vmin:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        norm = Normalize(vmin=vmin, vmax=vmax)
    width, height = reader.dimensions
    # both panels the same size in inches, laid out by hand: [slide] gap [map] gap [bar]
    pw = float(np.clip(tw / DPI, 4.0, 8.0))
    ph = pw * height / max(width, 1)
    gap, bar_w, right, top = 0.15, 0.18, 0.9, 0.3
    fig_w, fig_h = 2 * pw + 2 * gap + bar_w + right, ph + top
    fig = plt.figure(figsize=(fig_w, fig_h))
    slide_ax = fig.add_axes((0.0, 0.0, pw / fig_w, ph / fig_h))
    map_ax = fig.add_axes(((pw + gap) / fig_w, 0.0, pw / fig_w, ph / fig_h))
    cax = fig.add_axes(((2 * pw + 2 * gap) / fig_w, 0.0, bar_w / fig_w, ph / fig_h))
    for ax in (slide_ax, map_ax):
        ax.imshow(thumb, extent=thumb_extent, interpolation="antialiased")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_axis_off()
    slide_ax.set_title("slide", fontsize=9)
    image = map_ax.imshow(
        grid, cmap=cmap, norm=norm, alpha=alpha, extent=grid_extent, interpolation="nearest"
    )
    map_ax.set_title(label, fontsize=9)
    bar = fig.colorbar(image, cax=cax)
    bar.set_label(label)
    if ratio:  # ticks at powers of 2: 1/8, 1/2, 1, 2, 8 (every other one past ±8)
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

        ticks = [t for t in 2.0 ** np.arange(-10, 11) if norm.vmin <= t <= norm.vmax]
        if len(ticks) > 9:
            ticks = [t for t in ticks if round(np.log2(t)) % 2 == 0]
        bar.ax.yaxis.set_major_locator(FixedLocator(ticks))
        bar.ax.yaxis.set_major_formatter(
            FuncFormatter(lambda t, _: f"{t:g}" if t >= 1 else f"1/{round(1 / t)}")
        )
        bar.ax.yaxis.set_minor_locator(NullLocator())
    bar.solids.set_alpha(1)
    title_y = 1.0 + 0.22 / fig_h  # above the panels' own titles
    fig.suptitle(title, fontsize=9, y=title_y, va="bottom")
    if warning:  # above the title, in red
        from matplotlib.transforms import offset_copy

        lift = (title.count("\n") + 1) * 9 * 1.25 + 4  # points
        where = offset_copy(fig.transFigure, fig=fig, y=lift, units="points")
        fig.text(
            0.5,
            title_y,
            warning,
            color="red",
            weight="bold",
            fontsize=10,
            ha="center",
            va="bottom",
            transform=where,
        )
    metadata = {"Title": title, **({"Warning": warning} if warning else {})}
    return _save(fig, Path(path), metadata)


def draw_montage(
    reader: SlideReader,
    geometry: SlideGeometry,
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size: int,
    path: Path | str,
    title: str,
    k: int = 8,
) -> Path:
    """The k highest- and k lowest-scoring tiles, each with its score.

    Returns:
        The path written.
    """
    plt = _pyplot()
    order = np.argsort(scores)
    k = min(k, len(order) // 2 if len(order) > 1 else len(order))
    rows = [("top", order[::-1][:k]), ("bottom", order[:k])]
    fig, axes = plt.subplots(2, max(k, 1), figsize=(1.6 * max(k, 1), 3.9), squeeze=False)
    for r, (name, idx) in enumerate(rows):
        for c in range(axes.shape[1]):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(idx):
                i = int(idx[c])
                ax.imshow(read_tile(reader, geometry, coords[i], tile_size))
                ax.set_title(f"{name} {c + 1}\n{scores[i]:.3g}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))


def tiles_geojson(
    coords: np.ndarray,
    side: float,
    scores: Mapping[str, np.ndarray],
    slide_id: str,
    provenance: Mapping[str, Any] | None = None,
    tile_properties: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Tile squares with their scores as a GeoJSON FeatureCollection (QuPath detections).

    Coordinates are level-0 pixels, y down, as QuPath expects.

    Args:
        coords: (N, 2) level-0 top-left corners.
        side: level-0 tile side.
        scores: name → (N,) scores, written as QuPath measurements.
        slide_id: the slide, kept in the collection's properties.
        provenance: what made the scores (model ref, feature store …), kept in the
            collection's properties.
        tile_properties: added to every tile's properties (what QuPath keeps of them), e.g.
            whether the model saw the slide in training.
    """
    features = []
    for i, (x, y) in enumerate(np.asarray(coords, dtype=float)):
        x1, y1 = x + side, y + side
        ring = [[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]
        measurements = {name: float(values[i]) for name, values in scores.items()}
        features.append(
            {
                "type": "Feature",
                "id": f"{slide_id}-tile-{i}",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "name": f"tile {i}",
                    "measurements": measurements,
                    **(tile_properties or {}),
                },
            }
        )
    return {
        "type": "FeatureCollection",
        "properties": {"slide_id": slide_id, **(provenance or {})},
        "features": features,
    }


def write_geojson(collection: Mapping[str, Any], path: Path | str) -> Path:
    """Write a GeoJSON collection atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(collection))
    tmp.replace(path)
    return path


def write_tile_scores_csv(
    coords: np.ndarray, scores: Mapping[str, np.ndarray], path: Path | str
) -> Path:
    """Every tile's scores as a CSV, written atomically.

    Columns ``x``, ``y`` (the level-0 top-left corner) and one per score, in the order of
    ``scores``; values as written, 6 significant digits (attention raw: it sums to 1).

    Args:
        coords: (N, 2) level-0 top-left corners.
        scores: name → (N,) scores.
        path: CSV to write.

    Returns:
        The path written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        names = list(scores)
        w.writerow(["x", "y", *names])
        for i, (x, y) in enumerate(coords):
            w.writerow([int(x), int(y), *(f"{scores[n][i]:.6g}" for n in names)])
    tmp.replace(path)
    return path
