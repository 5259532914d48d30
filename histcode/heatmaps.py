"""Drawing per-tile scores over a slide, and scoring them against a ground-truth mask.

Model-agnostic: these functions take tile coordinates and one score per tile (attention, a
gene's tile contribution, …), whatever model made them. ``histcode heatmap`` (the finetune
stage) computes the scores and calls them.

- :func:`draw_heatmap`: the scores over the slide thumbnail with a colour bar (PNG).
- :func:`draw_montage`: the top-k and bottom-k tiles with their scores (PNG).
- :func:`tiles_geojson`: a GeoJSON FeatureCollection of tile squares with their scores in
  level-0 pixel coordinates, which QuPath imports (File › Import objects) as detections with
  measurements.
- :func:`mask_auroc`: how well the scores find a truth mask (AUROC of score vs "tile centre on
  the mask").
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histcode.slide import SlideReader
from histcode.tilereader import SlideGeometry, read_tile


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def score_grid(
    coords: np.ndarray, side: float, scores: np.ndarray, shape: tuple[int, int], scale: float
) -> np.ndarray:
    """Paint tile scores into an image aligned with a thumbnail (NaN where there is no tile).

    Args:
        coords: (N, 2) level-0 top-left corners.
        side: level-0 tile side.
        scores: (N,) one score per tile.
        shape: (height, width) of the thumbnail.
        scale: thumbnail pixels per level-0 pixel.

    Returns:
        (height, width) float32.
    """
    grid = np.full(shape, np.nan, np.float32)
    for (x, y), s in zip(coords, scores, strict=True):
        x0, y0 = round(x * scale), round(y * scale)
        x1, y1 = round((x + side) * scale), round((y + side) * scale)
        grid[y0:y1, x0:x1] = s
    return grid


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=150, bbox_inches="tight")
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
    thumbnail_mpp: float = 8.0,
    alpha: float = 0.55,
    centre: float | None = None,
) -> Path:
    """The slide thumbnail with tile scores overlaid and a colour bar.

    Args:
        reader: the open slide.
        coords: (N, 2) level-0 top-left corners.
        side: level-0 tile side.
        scores: (N,) one score per tile.
        path: PNG to write.
        title: what the map shows and what made it (model ref, slide id).
        label: colour bar label.
        cmap: matplotlib colour map (a diverging one with ``centre`` for signed scores).
        thumbnail_mpp: resolution of the thumbnail drawn under the scores.
        alpha: opacity of the overlay.
        centre: centre a diverging colour map on this value (e.g. 0 for contributions).

    Returns:
        The path written.
    """
    plt = _pyplot()
    thumb, mpp = reader.thumbnail(thumbnail_mpp)
    scale = reader.mpp / mpp
    grid = score_grid(coords, side, np.asarray(scores, np.float32), thumb.shape[:2], scale)
    finite = np.asarray(scores)[np.isfinite(scores)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if centre is not None:
        half = max(abs(vmax - centre), abs(centre - vmin)) or 1.0
        vmin, vmax = centre - half, centre + half
    height, width = thumb.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5 * height / max(width, 1) + 0.8))
    axes[0].imshow(thumb)
    axes[0].set_title("slide")
    axes[1].imshow(thumb)
    image = axes[1].imshow(
        grid, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    axes[1].set_title(label)
    for ax in axes:
        ax.set_axis_off()
    bar = fig.colorbar(image, ax=axes[1], fraction=0.046, pad=0.04)
    bar.set_label(label)
    bar.solids.set_alpha(1)
    fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))


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
) -> dict[str, Any]:
    """Tile squares with their scores as a GeoJSON FeatureCollection (QuPath detections).

    Coordinates are level-0 pixels, y down, as QuPath expects.

    Args:
        coords: (N, 2) level-0 top-left corners.
        side: level-0 tile side.
        scores: name → (N,) scores, written as QuPath measurements.
        slide_id: the slide, kept in the collection's properties.
        provenance: what made the scores (model ref, feature store …).
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


def tile_labels_from_mask(
    coords: np.ndarray, side: float, mpp0: float, mask: np.ndarray, mask_mpp: float
) -> np.ndarray:
    """Whether each tile's centre falls on a mask (e.g. the true tumour).

    Args:
        coords: (N, 2) level-0 top-left corners.
        side: level-0 tile side.
        mpp0: level-0 µm/px of the slide.
        mask: (H, W) bool, covering the slide from its origin at ``mask_mpp`` µm/px.
        mask_mpp: µm per mask pixel.

    Returns:
        (N,) bool.
    """
    centres = (np.asarray(coords, float) + side / 2) * mpp0 / mask_mpp
    cols = np.clip(centres[:, 0].astype(int), 0, mask.shape[1] - 1)
    rows = np.clip(centres[:, 1].astype(int), 0, mask.shape[0] - 1)
    return mask[rows, cols]


def mask_auroc(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray
) -> float | None:
    """AUROC of scores against tile labels; None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, float)))
