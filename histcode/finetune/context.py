"""Tile context: a tile's features with its neighbourhood's, both relative to its slide.

A tumour focus of a few per cent of a slide is a handful of neighbouring tiles that differ a
little from the tissue around them, while whole slides differ a lot from each other in stain,
scanner and site. Two label-free views of the same features address both:

- the **neighbourhood mean** (:func:`neighbour_mean`, the 3 × 3 tiles around a tile, itself
  included): a focus spans neighbouring tiles, so its signal adds up there while tile-to-tile
  noise averages out;
- the features **minus the slide's median tile**: what every tile of a slide shares (its
  stain cast, scanner and site) is taken away, so a focus stands out against its own slide.

:func:`context_features` concatenates ``[x, m, x − median(x), m − median(m)]`` (``4 D``).
Measured with labels MIL never gets (``python -m benchmarks.aggregation --features context``,
the hard demo's SimCLR features): a tile probe trained on the truth masks finds tumour tiles at
AUC 0.94–0.98 against 0.89–0.92 on the features alone, and ranks the slides at 0.92 ± 0.06
against 0.74 ± 0.10.
"""

from __future__ import annotations

import numpy as np

#: How many times the tile feature size :func:`context_features` returns.
CONTEXT_FACTOR = 4


def neighbour_mean(features: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Mean of each tile's features over its 3 × 3 grid neighbourhood (itself included).

    The grid step is the smallest positive spacing of the tile corners along either axis; a
    neighbour is a tile whose corner is one step away in x, y or both. Tiles missing from the
    grid (background) are left out of the mean, so a tile without neighbours keeps its own
    features.

    Args:
        features: ``(n, D)`` tile features of one slide.
        coords: ``(n, 2)`` level-0 tile corners of the same tiles, on a regular grid.

    Returns:
        ``(n, D)`` float32 neighbourhood means.

    Raises:
        ValueError: the corners are not on one regular grid, or do not match the features.
    """
    x = np.asarray(features, dtype=np.float32)
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(xy) != len(x):
        raise ValueError(f"{len(x)} tiles' features but {len(xy)} tile corners")
    if len(x) < 2:
        return x.copy()
    gaps = np.concatenate([np.diff(np.unique(xy[:, 0])), np.diff(np.unique(xy[:, 1]))])
    step = int(gaps.min()) if len(gaps) else 1
    origin = xy.min(0)
    cell = (xy - origin) // step
    if not np.array_equal(cell * step + origin, xy):
        raise ValueError(
            f"tile corners are not on a grid of step {step} px: tile context needs the regular "
            "grid `histcode tile` writes"
        )
    grid = np.full(tuple(cell.max(0) + 3), -1, dtype=np.int64)  # an empty cell on each side
    grid[cell[:, 0] + 1, cell[:, 1] + 1] = np.arange(len(xy))
    total, count = np.zeros_like(x), np.zeros((len(x), 1), np.float32)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            near = grid[cell[:, 0] + 1 + dx, cell[:, 1] + 1 + dy]
            has = near >= 0
            total[has] += x[near[has]]
            count[has] += 1
    return total / count


def context_features(features: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """A tile's features with its neighbourhood's, both also relative to the slide's median.

    ``[x, m, x − median(x), m − median(m)]`` with ``m`` the 3 × 3 neighbourhood mean
    (:func:`neighbour_mean`) and the medians taken over the slide's tiles per dimension.
    Nothing here sees a label; a slide's result depends on that slide alone.

    Args:
        features: ``(n, D)`` tile features of one slide.
        coords: ``(n, 2)`` level-0 tile corners.

    Returns:
        ``(n, 4D)`` float32 (``(0, 4D)`` for a slide without tiles).
    """
    x = np.asarray(features, dtype=np.float32)
    if len(x) == 0:
        return np.zeros((0, CONTEXT_FACTOR * x.shape[-1]), np.float32)
    m = neighbour_mean(x, coords)
    return np.concatenate([x, m, x - np.median(x, 0), m - np.median(m, 0)], axis=1)


__all__ = ["CONTEXT_FACTOR", "context_features", "neighbour_mean"]
