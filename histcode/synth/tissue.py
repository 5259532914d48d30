"""Low-resolution tissue layout of a synthetic slide, in physical units (µm).

A layout says *where* things are on the glass, independently of any scan resolution: the
tissue (a few irregular blobs, small fragments, a few holes), tumour (large regions or small
foci), lymphocyte-rich patches, necrosis inside tumour, and glandular epithelium. Each region
is stored as a signed distance field in µm (> 0 inside) on a grid of ``MASK_MPP`` µm per
cell, so that a 40x and a 20x scan of the same layout show the same tissue at the same place,
and the boundaries stay smooth when interpolated at any resolution. The ground-truth masks
(:class:`SlideTruth`) are the signs of these fields at the cell centres.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

#: µm per cell of the layout grid and of the ground-truth masks.
MASK_MPP = 8.0

#: Names of the layout's fields, in the order of ``TissueLayout.fields``. The first five are
#: signed distances in µm (> 0 inside the region); ``eosin`` is a multiplicative factor (≈ 1)
#: for slow variation of the stroma's staining.
FIELDS = ("tissue", "tumour", "lymphocyte", "necrosis", "epithelium", "eosin")


@dataclass(frozen=True)
class LayoutParams:
    """What a slide's layout should hold (targets; the truth masks give the actual values).

    Attributes:
        width_um: width of the slide area in µm.
        height_um: height of the slide area in µm.
        tumour_fraction: fraction of the tissue that is tumour (0 for a normal slide).
        tumour_pattern: ``regions`` (large contiguous areas) or ``foci`` (a few small nests).
        lymphocyte_fraction: fraction of the tissue that is lymphocyte-rich (outside tumour).
        necrosis: put necrotic cores inside large tumour regions.
        epithelium_fraction: fraction of the non-tumour tissue with glands.
        fragments: add a few small detached tissue fragments.
        holes: add a few holes (tears, fat) inside the tissue.
        blank: no tissue at all (glass only).
    """

    width_um: float
    height_um: float
    tumour_fraction: float = 0.0
    tumour_pattern: Literal["regions", "foci"] = "regions"
    lymphocyte_fraction: float = 0.05
    necrosis: bool = False
    epithelium_fraction: float = 0.45
    fragments: bool = True
    holes: bool = True
    blank: bool = False

    def __post_init__(self) -> None:
        if not (self.width_um >= 4 * MASK_MPP and self.height_um >= 4 * MASK_MPP):
            raise ValueError(
                f"slide area {self.width_um} × {self.height_um} µm is too small; give at least "
                f"{4 * MASK_MPP:g} µm a side (e.g. slide_mm=(4.0, 3.0))"
            )
        for name in ("tumour_fraction", "lymphocyte_fraction", "epithelium_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1)")
        if self.tumour_fraction + self.lymphocyte_fraction >= 0.95:
            raise ValueError(
                f"tumour_fraction + lymphocyte_fraction = "
                f"{self.tumour_fraction + self.lymphocyte_fraction:.2f} leaves no normal "
                "tissue; keep their sum below 0.95"
            )


@dataclass(frozen=True, eq=False)
class SlideTruth:
    """Ground-truth masks of a synthetic slide.

    Mask pixel ``(i, j)`` covers level-0 pixels ``[j·mask_mpp/mpp, (j+1)·mask_mpp/mpp)`` in x
    (and likewise in y), counted from the level-0 origin, whatever the slide's µm/px.

    Attributes:
        mask_mpp: µm per mask pixel.
        tissue: (H_mask, W_mask) bool, tissue.
        tumour: (H_mask, W_mask) bool, tumour (including necrosis inside it); within tissue.
        lymphocyte: (H_mask, W_mask) bool, lymphocyte-rich tissue; within tissue, not tumour.
    """

    mask_mpp: float
    tissue: np.ndarray
    tumour: np.ndarray
    lymphocyte: np.ndarray

    @property
    def tumour_fraction(self) -> float:
        """Fraction of the tissue that is tumour (0 when there is no tissue)."""
        n = int(self.tissue.sum())
        return float(self.tumour.sum() / n) if n else 0.0

    @property
    def lymphocyte_fraction(self) -> float:
        """Fraction of the tissue that is lymphocyte-rich (0 when there is no tissue)."""
        n = int(self.tissue.sum())
        return float(self.lymphocyte.sum() / n) if n else 0.0

    def save(self, path: Path | str) -> Path:
        """Write the masks to an ``.npz`` file atomically (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial.npz")
        try:
            np.savez_compressed(
                tmp,
                mask_mpp=np.float64(self.mask_mpp),
                tissue=self.tissue,
                tumour=self.tumour,
                lymphocyte=self.lymphocyte,
            )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: Path | str) -> SlideTruth:
        """Read masks written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file lacks one of the arrays (not a truth file).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such truth file")
        with np.load(path) as data:
            missing = {"mask_mpp", "tissue", "tumour", "lymphocyte"} - set(data.files)
            if missing:
                raise ValueError(
                    f"{path}: not a SlideTruth file (missing {sorted(missing)}); truth files "
                    "are written by histcode synth into <out>/truth/"
                )
            return cls(
                mask_mpp=float(data["mask_mpp"]),
                tissue=data["tissue"].astype(bool),
                tumour=data["tumour"].astype(bool),
                lymphocyte=data["lymphocyte"].astype(bool),
            )


@dataclass(frozen=True, eq=False)
class TissueLayout:
    """Where tissue, tumour, lymphocytes, necrosis and glands lie, in µm.

    Attributes:
        width_um: width of the slide area in µm.
        height_um: height of the slide area in µm.
        fields: (len(FIELDS), H, W) float32 on a grid of ``grid_um`` µm, value at cell centre
            ``((j + 0.5)·grid_um, (i + 0.5)·grid_um)``; see :data:`FIELDS`.
        grid_um: µm per grid cell.
    """

    width_um: float
    height_um: float
    fields: np.ndarray
    grid_um: float = MASK_MPP

    def field(self, name: str) -> np.ndarray:
        """One field, (H, W) float32."""
        return self.fields[FIELDS.index(name)]

    def sample(self, name: str, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Bilinear value of a field at points.

        Args:
            name: one of :data:`FIELDS`.
            x_um: (N,) x positions in µm.
            y_um: (N,) y positions in µm.

        Returns:
            (N,) float32.
        """
        coords = np.stack(
            [np.asarray(y_um) / self.grid_um - 0.5, np.asarray(x_um) / self.grid_um - 0.5]
        )
        return ndimage.map_coordinates(self.field(name), coords, order=1, mode="nearest")

    def truth(
        self, width_px: int | None = None, height_px: int | None = None, mpp: float | None = None
    ) -> SlideTruth:
        """Ground-truth masks, optionally cropped/padded to cover a slide of given pixels.

        Args:
            width_px: level-0 width of the slide (with ``height_px`` and ``mpp``); the masks
                then have ``ceil(width_px·mpp / grid_um)`` columns.
            height_px: level-0 height.
            mpp: level-0 µm/px.

        Returns:
            The masks at ``grid_um`` µm per pixel.
        """
        tissue = self.field("tissue") > 0
        tumour = tissue & (self.field("tumour") > 0)
        lymph = tissue & (self.field("lymphocyte") > 0) & ~tumour
        masks = [tissue, tumour, lymph]
        if width_px is not None and height_px is not None and mpp is not None:
            h = math.ceil(height_px * mpp / self.grid_um - 1e-9)
            w = math.ceil(width_px * mpp / self.grid_um - 1e-9)
            out = []
            for m in masks:
                m = m[:h, :w]
                out.append(np.pad(m, ((0, h - m.shape[0]), (0, w - m.shape[1]))))
            masks = out
        return SlideTruth(self.grid_um, *masks)

    def distance_inside(self, name: str) -> np.ndarray:
        """Exact Euclidean distance (µm) from each cell centre to outside the region.

        Returns:
            (H, W) float32, 0 outside the region.
        """
        inside = self.field(name) > 0
        return (ndimage.distance_transform_edt(inside) * self.grid_um).astype(np.float32)


# -- construction --------------------------------------------------------------------------


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma_um: float, grid_um: float
) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation, (H, W) float64."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_um / grid_um, mode="wrap")
    return noise / max(float(noise.std()), 1e-12)


def _signed_distance(f: np.ndarray, grid_um: float, limit_um: float = 400.0) -> np.ndarray:
    """Turn a smooth level-set function into an approximate signed distance in µm.

    ``f / |∇f|`` is the distance to the zero level near the boundary and keeps the sign
    everywhere; the result is clipped to ±``limit_um``.
    """
    gy, gx = np.gradient(f, grid_um)
    grad = np.maximum(np.hypot(gx, gy), 1.0 / limit_um * np.abs(f) + 1e-9)
    return np.clip(f / grad, -limit_um, limit_um)


def _ellipse_radius(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float
) -> np.ndarray:
    """Normalised elliptical radius (1 on the ellipse) around (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _threshold_at_fraction(p: np.ndarray, where: np.ndarray, fraction: float) -> float:
    """The value of ``p`` above which ``fraction`` of the cells in ``where`` lie."""
    values = p[where]
    if values.size == 0 or fraction <= 0:
        return float("inf")
    return float(np.quantile(values, 1.0 - min(fraction, 1.0)))


def _bumps(
    xx: np.ndarray, yy: np.ndarray, centres: np.ndarray, sigmas: np.ndarray, heights: np.ndarray
) -> np.ndarray:
    """Maximum over Gaussian bumps, (H, W)."""
    out = np.zeros(xx.shape)
    for (cx, cy), s, h in zip(centres, sigmas, heights, strict=True):
        np.maximum(out, h * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s)), out=out)
    return out


def _pick_cells(
    rng: np.random.Generator, candidates: np.ndarray, n: int, grid_um: float, fallback: np.ndarray
) -> np.ndarray:
    """Centres (µm) of ``n`` random cells among ``candidates`` (else ``fallback``), (n, 2) x,y."""
    ij = np.argwhere(candidates)
    if len(ij) == 0:
        ij = np.argwhere(fallback)
    pick = ij[rng.integers(0, len(ij), n)]
    return (pick[:, ::-1] + 0.5 + rng.uniform(-0.5, 0.5, (n, 2))) * grid_um


def make_layout(params: LayoutParams, seed: int) -> TissueLayout:
    """Draw a random tissue layout.

    The tissue is one or two large irregular blobs away from the slide's edges, with a few
    small fragments and holes; tumour is either smooth large regions (``regions``) or a few
    small nests (``foci``); lymphocyte-rich patches lie in the non-tumour tissue; necrosis
    sits in the cores of large tumour regions. Fractions are hit exactly on the mask grid by
    thresholding random fields at quantiles.

    Args:
        params: what the layout should hold.
        seed: random seed; the same seed and params give the same layout.

    Returns:
        The layout on a ``MASK_MPP`` µm grid.
    """
    g = MASK_MPP
    rng = np.random.default_rng([seed, 0x7155])
    h = math.ceil(params.height_um / g)
    w = math.ceil(params.width_um / g)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy = (yy + 0.5) * g
    xx = (xx + 0.5) * g
    W, H = params.width_um, params.height_um
    fields = np.zeros((len(FIELDS), h, w), np.float32)
    fields[:5] = -400.0
    fields[5] = 1.0 + 0.12 * _smooth_noise(rng, (h, w), 120.0, g)
    if params.blank:
        return TissueLayout(W, H, fields, g)

    # tissue: big blobs + fragments, irregular edges, away from the slide's borders
    f = np.full((h, w), -1.0)
    n_main = int(rng.integers(1, 3))
    for k in range(n_main):
        cx = W * (0.5 + (rng.uniform(-0.12, 0.12) if n_main == 1 else (k - 0.5) * 0.42))
        cy = H * rng.uniform(0.42, 0.58)
        size = 0.33 if n_main == 1 else 0.22
        a = W * size * rng.uniform(0.8, 1.05)
        b = H * (0.32 if n_main == 1 else 0.3) * rng.uniform(0.8, 1.05)
        r = _ellipse_radius(xx, yy, cx, cy, a, b, rng.uniform(-0.4, 0.4))
        np.maximum(f, 1.0 - r, out=f)
    f += 0.16 * _smooth_noise(rng, (h, w), 110.0, g) + 0.06 * _smooth_noise(rng, (h, w), 30.0, g)
    if params.fragments:
        for _ in range(int(rng.integers(2, 5))):
            rad = rng.uniform(50.0, 160.0)
            cx, cy = rng.uniform(0.1, 0.9) * W, rng.uniform(0.12, 0.88) * H
            r = _ellipse_radius(
                xx, yy, cx, cy, rad * rng.uniform(1.0, 1.6), rad, rng.uniform(0, math.pi)
            )
            np.maximum(f, (1.0 - r) * 0.5, out=f)
    if params.holes:
        inner = f > 0.3
        if inner.any():
            for cx, cy in _pick_cells(rng, inner, int(rng.integers(0, 4)), g, inner):
                rad = rng.uniform(20.0, 70.0)
                r = _ellipse_radius(
                    xx, yy, cx, cy, rad * rng.uniform(1.0, 2.0), rad, rng.uniform(0, math.pi)
                )
                np.minimum(f, (r - 1.0) * 0.4, out=f)
    border = np.minimum(np.minimum(xx, W - xx), np.minimum(yy, H - yy))
    border += 60.0 * _smooth_noise(rng, (h, w), 60.0, g)
    np.minimum(f, (border - 150.0) / 300.0, out=f)
    sd_tissue = _signed_distance(f, g)
    tissue = sd_tissue > 0
    fields[0] = sd_tissue
    if not tissue.any():
        return TissueLayout(W, H, fields, g)
    depth = ndimage.distance_transform_edt(tissue) * g

    # tumour
    sd_tumour = np.full((h, w), -400.0)
    if params.tumour_fraction > 0:
        if params.tumour_pattern == "regions":
            p = _smooth_noise(rng, (h, w), 260.0, g) + 0.2 * _smooth_noise(rng, (h, w), 40.0, g)
        else:
            n = int(rng.integers(3, 7))
            centres = _pick_cells(rng, depth > 150.0, n, g, tissue)
            total = params.tumour_fraction * tissue.sum() * g * g
            sigma = math.sqrt(total / n / math.pi) * rng.uniform(0.8, 1.25, n)
            p = _bumps(xx, yy, centres, sigma, rng.uniform(0.75, 1.0, n))
            p += 0.05 * _smooth_noise(rng, (h, w), 24.0, g)
        t = _threshold_at_fraction(p, tissue, params.tumour_fraction)
        sd_tumour = _signed_distance(p - t, g)
    fields[1] = sd_tumour
    tumour = tissue & (sd_tumour > 0)

    # necrosis in the cores of tumour regions
    if params.necrosis and tumour.sum() * g * g > 0.2e6:
        core = ndimage.distance_transform_edt(tumour) * g
        p = _smooth_noise(rng, (h, w), 90.0, g) + core / 150.0
        candidates = core > 90.0
        if candidates.any():
            t = _threshold_at_fraction(p, candidates, rng.uniform(0.25, 0.5))
            fields[3] = np.minimum(_signed_distance(p - t, g), core - 60.0)

    # lymphocyte-rich patches in the non-tumour tissue
    if params.lymphocyte_fraction > 0:
        normal = tissue & ~tumour
        n = int(rng.integers(2, 7))
        centres = _pick_cells(rng, normal & (depth > 60.0), n, g, tissue)
        total = params.lymphocyte_fraction * tissue.sum() * g * g
        sigma = math.sqrt(total / n / math.pi) * rng.uniform(0.6, 1.4, n)
        p = _bumps(xx, yy, centres, sigma, rng.uniform(0.7, 1.0, n))
        p += 0.06 * _smooth_noise(rng, (h, w), 30.0, g)
        frac = params.lymphocyte_fraction * tissue.sum() / max(int(normal.sum()), 1)
        t = _threshold_at_fraction(p, normal, frac)
        fields[2] = np.minimum(_signed_distance(p - t, g), -sd_tumour)

    # glandular epithelium (where the non-tumour tissue has glands)
    p = _smooth_noise(rng, (h, w), 150.0, g)
    t = _threshold_at_fraction(p, tissue, params.epithelium_fraction)
    fields[4] = _signed_distance(p - t, g)
    return TissueLayout(W, H, fields, g)
