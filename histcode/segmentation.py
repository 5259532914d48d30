"""Tissue segmentation on a low-resolution thumbnail.

Stained tissue is coloured; glass is neutral whatever its brightness. The mask is therefore a
threshold on saturation (HSV), which holds on white and on grey scanner backgrounds alike; the
threshold is Otsu's on the thumbnail, clipped to a range so that pale tissue is kept when
tissue dominates the image and noise is not picked up when there is no tissue at all (a blank
slide gives an empty mask). Small specks are removed and holes filled; sizes are in µm² so the
result does not depend on the thumbnail's resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class SegmentationParams:
    """Parameters of :func:`segment_tissue`.

    Attributes:
        min_saturation: lowest saturation threshold (0–1) however low Otsu's falls; glass
            and JPEG noise sit below ~0.03, pale eosin around 0.06–0.15.
        max_saturation: highest threshold however high Otsu's rises (keeps pale tissue
            when the slide is mostly tissue).
        min_brightness: pixels whose brightest channel is at most this (near black: debris,
            out-of-focus dirt, scanner artefacts) are not tissue; stained nuclei stay above.
        min_area_um2: connected tissue smaller than this is dropped (dust, specks).
        max_hole_um2: holes up to this size inside tissue are filled.
        smooth_um: Gaussian smoothing of the saturation before thresholding.
    """

    min_saturation: float = 0.05
    max_saturation: float = 0.12
    min_brightness: int = 20
    min_area_um2: float = 5_000.0
    max_hole_um2: float = 2_000.0
    smooth_um: float = 8.0


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (written here: scikit-image is not a dependency).

    Args:
        values: any shape, float in [0, 1].

    Returns:
        The threshold maximising the between-class variance (the middle of the range
        where it is maximal, when the modes are separated by empty bins).
    """
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(centres[best].mean())  # middle of a flat maximum (empty bins between modes)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation.

    Args:
        rgb: (H, W, 3) uint8.

    Returns:
        (H, W) float32 in [0, 1].
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)  # elementwise on uint8: far faster than max(axis=2)
    mn = np.minimum(np.minimum(r, g), b)
    return (mx - mn).astype(np.float32) / np.maximum(mx, 1).astype(np.float32)


def segment_tissue(
    rgb: np.ndarray, mpp: float, params: SegmentationParams | None = None
) -> np.ndarray:
    """Tissue mask of a slide thumbnail.

    Args:
        rgb: (H, W, 3) uint8 thumbnail.
        mpp: µm/px of the thumbnail.
        params: thresholds and sizes; defaults suit H&E.

    Returns:
        (H, W) bool mask, True on tissue.
    """
    p = params or SegmentationParams()
    sat = saturation(rgb)
    sigma = p.smooth_um / mpp
    if sigma >= 0.5:
        sat = ndimage.gaussian_filter(sat, sigma / 2)
    threshold = float(np.clip(otsu_threshold(sat), p.min_saturation, p.max_saturation))
    brightest = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    mask = (sat > threshold) & (brightest > p.min_brightness)
    if not mask.any():
        return mask
    px_area = mpp * mpp
    radius = max(1, round(p.smooth_um / mpp))
    structure = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), radius)
    mask = ndimage.binary_closing(mask, structure=structure, border_value=0)
    mask = _fill_small_holes(mask, p.max_hole_um2 / px_area)
    return _remove_small_objects(mask, p.min_area_um2 / px_area)


def _remove_small_objects(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    holes = ~mask
    labels, n = ndimage.label(holes)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes <= max_pixels
    fill[0] = False
    fill[border] = False  # background touching the edge is glass, not a hole
    return mask | fill[labels]
