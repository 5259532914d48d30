"""Cells of a synthetic slide: nucleus and gland shapes and where they lie, in µm.

Nuclei and glands are drawn from catalogues of prototypes (shapes defined analytically in µm)
and placed on jittered hexagonal lattices inside the regions of a :class:`TissueLayout`:
fibroblasts in stroma, glands with a ring of epithelial nuclei, solid sheets or glands of
tumour cells, dense lymphocytes, nuclear debris in necrosis. A prototype is rasterised once
per resolution, area-averaged, so a nucleus looks the same at 0.25 µm/px and, two pixels
averaged into one, at 0.5 µm/px; the renderer stamps the rasters.

The differences between tumour and normal follow histology: tumour nuclei are larger, darker,
more pleomorphic, with coarser chromatin and nucleoli, more crowded and less polarised.
:meth:`Morphology.preset` makes them obvious (``easy``) or subtle (``hard``).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from histcode.synth.tissue import TissueLayout

#: Indices of the nucleus kinds in ``Morphology.nuclei``.
STROMA, EPITHELIUM, TUMOUR, LYMPHOCYTE, DEBRIS = range(5)
#: Indices of the gland kinds in ``Morphology.glands``.
NORMAL_GLAND, TUMOUR_GLAND = range(2)

#: Nucleus prototypes per kind: ``ORIENTATIONS`` orientations × ``VARIANTS`` shapes; prototype
#: ``o + ORIENTATIONS·v`` has its long axis at angle ``o·π/ORIENTATIONS``.
ORIENTATIONS, VARIANTS = 16, 4
GLAND_PROTOTYPES = 32


@dataclass(frozen=True)
class NucleusKind:
    """Shape and staining of one kind of nucleus (ranges are drawn uniformly).

    Attributes:
        semi_major: semi-major axis range, µm.
        semi_minor: semi-minor axis range, µm (capped at the semi-major).
        darkness: haematoxylin concentration range.
        irregularity: amplitude of the boundary's harmonics (0 = ellipse).
        chromatin: amplitude of chromatin clumping (0 = even).
        rim: extra darkness of the nuclear membrane, relative.
        nucleolus: probability of a visible nucleolus.
    """

    semi_major: tuple[float, float]
    semi_minor: tuple[float, float]
    darkness: tuple[float, float]
    irregularity: float = 0.04
    chromatin: float = 0.25
    rim: float = 0.15
    nucleolus: float = 0.0


@dataclass(frozen=True)
class GlandKind:
    """Shape of one kind of gland: a lumen ringed by epithelium.

    Attributes:
        lumen_radius: range of the lumen's semi-major axis, µm.
        lumen_aspect: range of minor/major axis ratio of the lumen.
        thickness: range of the epithelium's thickness, µm.
        irregularity: amplitude of the lumen boundary's harmonics.
        nucleus_spacing: distance between neighbouring nuclei along the ring, µm.
        nucleus_jitter: sd of the nuclei's radial position, µm (stratification).
        polarity: sd of the nuclei's orientation around radial, radians.
        nucleus_kind: index into ``Morphology.nuclei``.
    """

    lumen_radius: tuple[float, float]
    lumen_aspect: tuple[float, float]
    thickness: tuple[float, float]
    irregularity: float
    nucleus_spacing: float
    nucleus_jitter: float
    polarity: float
    nucleus_kind: int


@dataclass(frozen=True)
class Background:
    """Stain concentrations of a tissue class between the cells.

    Attributes:
        eosin: eosin concentration.
        haematoxylin: diffuse haematoxylin concentration.
        fibres: amplitude of the fibrous texture (0 = smooth).
    """

    eosin: float
    haematoxylin: float
    fibres: float


@dataclass(frozen=True)
class Morphology:
    """Everything about how tissue classes look, independent of where they are.

    Attributes:
        nuclei: nucleus kinds, indexed by ``STROMA, EPITHELIUM, TUMOUR, LYMPHOCYTE, DEBRIS``.
        glands: gland kinds, indexed by ``NORMAL_GLAND, TUMOUR_GLAND``.
        tumour_glands: tumour grows as glands (subtle) rather than solid sheets.
        gland_spacing: lattice spacing of (normal, tumour) glands, µm.
        tumour_spacing: lattice spacing of nuclei in solid tumour, µm.
        lymphocyte_spacing: lattice spacing of nuclei in lymphocyte-rich tissue, µm.
        stroma_spacing: lattice spacing of fibroblasts, µm.
        stroma, tumour, lymphocyte, necrosis: background of each class.
        cytoplasm: (normal, tumour) gland epithelium as (eosin, haematoxylin).
    """

    nuclei: tuple[NucleusKind, ...]
    glands: tuple[GlandKind, GlandKind]
    tumour_glands: bool
    gland_spacing: tuple[float, float]
    tumour_spacing: float
    lymphocyte_spacing: float
    stroma_spacing: float
    stroma: Background
    tumour: Background
    lymphocyte: Background
    necrosis: Background
    cytoplasm: tuple[tuple[float, float], tuple[float, float]]

    @classmethod
    def preset(cls, difficulty: Literal["easy", "hard"]) -> Morphology:
        """Tumour clearly different (``easy``: solid sheets of large, dark, pleomorphic
        nuclei) or subtly different (``hard``: glands like normal ones, nuclei 15–25 % larger,
        ~10 % darker, a little more crowded and less polarised)."""
        if difficulty not in ("easy", "hard"):
            raise ValueError(f"difficulty must be 'easy' or 'hard', not {difficulty!r}")
        stroma = NucleusKind((4.5, 6.5), (1.1, 1.6), (1.5, 1.9), 0.04, 0.15, 0.1)
        epithelium = NucleusKind((2.9, 3.8), (2.3, 3.0), (1.1, 1.4), 0.04, 0.3, 0.25, 0.1)
        lymphocyte = NucleusKind((2.5, 3.0), (2.3, 2.8), (1.9, 2.3), 0.03, 0.15, 0.05)
        debris = NucleusKind((0.7, 2.0), (0.5, 1.4), (1.6, 2.6), 0.25, 0.1, 0.0)
        normal_gland = GlandKind(
            (7.0, 20.0), (0.45, 0.95), (10.0, 13.0), 0.08, 6.5, 0.4, 0.15, EPITHELIUM
        )
        common = dict(
            lymphocyte_spacing=6.8,
            stroma_spacing=24.0,
            stroma=Background(0.85, 0.05, 0.85),
            lymphocyte=Background(0.35, 0.15, 0.1),
            necrosis=Background(1.05, 0.25, 0.2),
        )
        if difficulty == "easy":
            tumour = NucleusKind((4.5, 6.5), (3.4, 4.8), (1.5, 2.1), 0.14, 0.5, 0.3, 0.6)
            return cls(
                nuclei=(stroma, epithelium, tumour, lymphocyte, debris),
                glands=(normal_gland, normal_gland),
                tumour_glands=False,
                gland_spacing=(70.0, 70.0),
                tumour_spacing=13.0,
                tumour=Background(0.45, 0.28, 0.15),
                cytoplasm=((0.5, 0.35), (0.5, 0.35)),
                **common,
            )
        tumour = NucleusKind((3.5, 4.6), (2.8, 3.6), (1.25, 1.55), 0.07, 0.35, 0.25, 0.2)
        tumour_gland = GlandKind(
            (6.0, 18.0), (0.4, 0.95), (11.0, 14.0), 0.14, 5.6, 1.0, 0.35, TUMOUR
        )
        return cls(
            nuclei=(stroma, epithelium, tumour, lymphocyte, debris),
            glands=(normal_gland, tumour_gland),
            tumour_glands=True,
            gland_spacing=(70.0, 60.0),
            tumour_spacing=10.5,
            tumour=Background(0.8, 0.07, 0.5),
            cytoplasm=((0.5, 0.35), (0.48, 0.42)),
            **common,
        )


# -- prototypes ------------------------------------------------------------------------------


def _seed_of(obj: object) -> int:
    return zlib.crc32(repr(obj).encode())


def _supersampling(m: float, finest_um: float) -> int:
    """Sub-samples per pixel side so that they are at most ``finest_um`` apart (≤ 32)."""
    return int(min(32, max(1, math.ceil(m / finest_um - 1e-9))))


def _pixel_grid(radius_px: int, m: float, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-sample offsets (µm) from the centre of the centre pixel of a (2r+1)² sprite."""
    n = (2 * radius_px + 1) * ss
    u = ((np.arange(n) + 0.5) / ss - 0.5 - radius_px) * m
    return np.meshgrid(u, u, indexing="xy")


def _box(values: np.ndarray, ss: int) -> np.ndarray:
    """Average ss × ss blocks of the last two axes."""
    if ss == 1:
        return values
    *lead, h, w = values.shape
    return values.reshape(*lead, h // ss, ss, w // ss, ss).mean(axis=(-3, -1))


@lru_cache(maxsize=1)
def _chromatin_texture() -> np.ndarray:
    """Periodic smooth noise of 32 µm period at 0.125 µm/px, unit sd, (256, 256)."""
    rng = np.random.default_rng(0xC0FFEE)
    t = ndimage.gaussian_filter(rng.standard_normal((256, 256)), 3.5, mode="wrap")
    return (t / t.std()).astype(np.float32)


def _chromatin(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    coords = np.stack([(q / 0.125) % 256, (p / 0.125) % 256])
    return ndimage.map_coordinates(_chromatin_texture(), coords, order=1, mode="grid-wrap")


@dataclass(frozen=True)
class _NucleusShapes:
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    harm_amp: np.ndarray
    harm_phase: np.ndarray
    darkness: np.ndarray
    nucleolus: np.ndarray
    nucleolus_at: np.ndarray
    chromatin_at: np.ndarray

    @property
    def extent(self) -> float:
        return float((self.a * (1 + np.abs(self.harm_amp).sum(1))).max() + 1.0)


@lru_cache(maxsize=32)
def _nucleus_shapes(kind: NucleusKind) -> _NucleusShapes:
    k = ORIENTATIONS * VARIANTS
    rng = np.random.default_rng([_seed_of(kind), 0x0C])
    a = rng.uniform(*kind.semi_major, k)
    b = np.minimum(rng.uniform(*kind.semi_minor, k), a)
    theta = (np.arange(k) % ORIENTATIONS) * math.pi / ORIENTATIONS
    harm_amp = kind.irregularity * rng.standard_normal((k, 4)) / np.arange(1, 5)
    nucleolus = rng.random(k) < kind.nucleolus
    at = rng.uniform(-0.35, 0.35, (k, 2)) * np.stack([a, b], 1)
    return _NucleusShapes(
        a,
        b,
        theta,
        harm_amp,
        rng.uniform(0, 2 * math.pi, (k, 4)),
        rng.uniform(*kind.darkness, k),
        nucleolus,
        at,
        rng.uniform(0, 32, (k, 2)),
    )


def nucleus_extent(kind: NucleusKind) -> float:
    """Largest distance (µm) from a nucleus centre to the edge of any prototype's raster."""
    return _nucleus_shapes(kind).extent


@lru_cache(maxsize=64)
def nucleus_sprites(kind: NucleusKind, m: float) -> np.ndarray:
    """Haematoxylin of each prototype of a nucleus kind at ``m`` µm/px.

    Args:
        kind: the nucleus kind.
        m: µm per pixel.

    Returns:
        (ORIENTATIONS·VARIANTS, S, S) float32 with odd S; the nucleus centre lies in the
        centre of pixel ``(S//2, S//2)``.
    """
    shapes = _nucleus_shapes(kind)
    radius = math.ceil(shapes.extent / m)
    ss = _supersampling(m, 0.125 if m < 0.5 else max(0.25, m / 8))
    u, v = _pixel_grid(radius, m, ss)
    out = np.empty((len(shapes.a), 2 * radius + 1, 2 * radius + 1), np.float32)
    for i in range(len(shapes.a)):
        c, s = math.cos(shapes.theta[i]), math.sin(shapes.theta[i])
        p, q = u * c + v * s, -u * s + v * c
        pa, qb = p / shapes.a[i], q / shapes.b[i]
        phi = np.arctan2(qb, pa)
        rb = 1.0 + sum(
            shapes.harm_amp[i, j] * np.cos((j + 2) * phi + shapes.harm_phase[i, j])
            for j in range(4)
        )
        dist = (1.0 - np.hypot(pa, qb) / rb) * math.sqrt(shapes.a[i] * shapes.b[i])
        inside = np.clip(0.5 + dist / 0.3, 0.0, 1.0)
        if m < 2.0:  # chromatin texture is invisible on coarser levels
            tex = 1.0 + kind.chromatin * 0.6 * _chromatin(
                p + shapes.chromatin_at[i, 0], q + shapes.chromatin_at[i, 1]
            )
        else:
            tex = np.ones_like(p)
        rim = 1.0 + kind.rim * np.exp(-((dist / 0.45) ** 2))
        val = shapes.darkness[i] * inside * np.clip(tex, 0.2, None) * rim
        if shapes.nucleolus[i]:
            dn = (p - shapes.nucleolus_at[i, 0]) ** 2 + (q - shapes.nucleolus_at[i, 1]) ** 2
            val += 0.9 * inside * np.exp(-dn / (2 * 0.4**2))
        out[i] = _box(val, ss)
    return out


@dataclass(frozen=True)
class GlandShape:
    """One gland prototype.

    Attributes:
        radius: distance from the centre to the outer edge of the epithelium, µm (max).
        nuclei: (n, 2) centres of its nuclei relative to the gland centre, µm (x, y).
        orientation: (n,) orientation bins (0…ORIENTATIONS-1) of its nuclei.
        lumen: (a, b, theta, harmonic amplitudes (4,), harmonic phases (4,), thickness,
            outer harmonic amplitude, outer harmonic phase) — its analytic shape.
    """

    radius: float
    nuclei: np.ndarray
    orientation: np.ndarray
    lumen: tuple


def _gland_boundary(
    a: float, b: float, theta: float, amp: np.ndarray, phase: np.ndarray, phi: np.ndarray
) -> np.ndarray:
    """Points (n, 2) of a lumen boundary at ellipse angles ``phi``."""
    rb = 1.0 + sum(amp[j] * np.cos((j + 2) * phi + phase[j]) for j in range(4))
    x, y = a * rb * np.cos(phi), b * rb * np.sin(phi)
    c, s = math.cos(theta), math.sin(theta)
    return np.stack([x * c - y * s, x * s + y * c], 1)


@lru_cache(maxsize=8)
def gland_shapes(kind: GlandKind) -> tuple[GlandShape, ...]:
    """The ``GLAND_PROTOTYPES`` prototypes of a gland kind (deterministic)."""
    rng = np.random.default_rng([_seed_of(kind), 0x61])
    out = []
    for _ in range(GLAND_PROTOTYPES):
        a = rng.uniform(*kind.lumen_radius)
        b = a * rng.uniform(*kind.lumen_aspect)
        theta = rng.uniform(0, math.pi)
        amp = kind.irregularity * rng.standard_normal(4) / np.arange(1, 5)
        phase = rng.uniform(0, 2 * math.pi, 4)
        thick = rng.uniform(*kind.thickness)
        outer = (0.1 * rng.standard_normal(), rng.uniform(0, 2 * math.pi))
        phi = np.linspace(0, 2 * math.pi, 721)
        ring = _gland_boundary(a, b, theta, amp, phase, phi)
        arc = np.concatenate([[0], np.cumsum(np.hypot(*np.diff(ring, axis=0).T))])
        n = max(6, int(arc[-1] / kind.nucleus_spacing))
        at = (rng.uniform(0, 1) + np.arange(n)) * arc[-1] / n
        points = np.stack([np.interp(at, arc, ring[:, 0]), np.interp(at, arc, ring[:, 1])], 1)
        radial = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-6)
        depth = 0.5 * thick + kind.nucleus_jitter * rng.standard_normal(n)
        centres = points + radial * np.clip(depth, 3.0, thick - 2.5)[:, None]
        angle = np.arctan2(radial[:, 1], radial[:, 0]) + kind.polarity * rng.standard_normal(n)
        bins = np.round(angle / (math.pi / ORIENTATIONS)).astype(int) % ORIENTATIONS
        radius = float(np.linalg.norm(ring, axis=1).max() + thick * (1 + abs(outer[0])) + 1.0)
        out.append(
            GlandShape(radius, centres, bins, (a, b, theta, amp, phase, thick, outer[0], outer[1]))
        )
    return tuple(out)


@lru_cache(maxsize=16)
def gland_sprites(kind: GlandKind, m: float) -> tuple[np.ndarray, ...]:
    """Lumen and epithelium coverage of each gland prototype at ``m`` µm/px.

    Returns:
        One (2, S, S) float32 per prototype (S odd, centred like the nucleus sprites):
        channel 0 is the lumen, channel 1 the epithelium's cytoplasm, both in [0, 1].
    """
    out = []
    ss = _supersampling(m, max(0.5, m / 8))
    for shape in gland_shapes(kind):
        a, b, theta, amp, phase, thick, o_amp, o_phase = shape.lumen
        radius = math.ceil(shape.radius / m)
        u, v = _pixel_grid(radius, m, ss)
        c, s = math.cos(theta), math.sin(theta)
        p, q = (u * c + v * s) / a, (-u * s + v * c) / b
        phi = np.arctan2(q, p)
        rb = 1.0 + sum(amp[j] * np.cos((j + 2) * phi + phase[j]) for j in range(4))
        t = np.maximum(np.hypot(p, q) / rb, 1e-6)
        d = np.hypot(u, v) * (1.0 - 1.0 / t)  # radial distance outside the lumen, µm
        lumen = np.clip(0.5 - d / 0.6, 0.0, 1.0)
        outer = thick * (1.0 + o_amp * np.cos(3 * phi + o_phase))
        cyto = np.clip(0.5 + d / 0.5, 0.0, 1.0) * np.clip(0.5 + (outer - d) / 0.8, 0.0, 1.0)
        out.append(_box(np.stack([lumen, cyto]), ss).astype(np.float32))
    return tuple(out)


# -- placement -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Cells:
    """Nuclei and glands of a slide, sorted by y.

    Attributes:
        nucleus_xy: (N, 2) float64 centres, µm.
        nucleus_kind: (N,) uint8 index into ``Morphology.nuclei``.
        nucleus_proto: (N,) uint16 prototype index.
        gland_xy: (G, 2) float64 centres, µm.
        gland_kind: (G,) uint8 index into ``Morphology.glands``.
        gland_proto: (G,) uint16 prototype index.
    """

    nucleus_xy: np.ndarray
    nucleus_kind: np.ndarray
    nucleus_proto: np.ndarray
    gland_xy: np.ndarray
    gland_kind: np.ndarray
    gland_proto: np.ndarray


def _lattice(
    rng: np.random.Generator, box: tuple[float, float, float, float], spacing: float, jitter: float
) -> np.ndarray:
    """Jittered hexagonal lattice points (n, 2) in box (x0, y0, x1, y1), µm."""
    x0, y0, x1, y1 = box
    dy = spacing * math.sqrt(3) / 2
    ys = np.arange(y0, y1, dy)
    xs = np.arange(x0, x1, spacing)
    if len(ys) == 0 or len(xs) == 0:
        return np.zeros((0, 2))
    gx, gy = np.meshgrid(xs, ys)
    gx = gx + (np.arange(len(ys)) % 2)[:, None] * spacing / 2
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    return pts + rng.normal(0, jitter * spacing, pts.shape)


def _bbox(layout: TissueLayout, region: np.ndarray, margin: float) -> tuple[float, ...] | None:
    """Bounding box (µm) of the cells where ``region`` holds, grown by ``margin``."""
    ij = np.argwhere(region)
    if len(ij) == 0:
        return None
    g = layout.grid_um
    (i0, j0), (i1, j1) = ij.min(0), ij.max(0) + 1
    return (j0 * g - margin, i0 * g - margin, j1 * g + margin, i1 * g + margin)


def place_cells(layout: TissueLayout, morphology: Morphology, seed: int) -> Cells:
    """Place nuclei and glands in a layout.

    Args:
        layout: the tissue layout.
        morphology: how each class looks.
        seed: random seed; same layout, morphology and seed give the same cells.

    Returns:
        The cells, sorted by y.
    """
    rng = np.random.default_rng([seed, 0xCE11])
    tissue = layout.field("tissue") > 0
    empty = Cells(
        np.zeros((0, 2)),
        np.zeros(0, np.uint8),
        np.zeros(0, np.uint16),
        np.zeros((0, 2)),
        np.zeros(0, np.uint8),
        np.zeros(0, np.uint16),
    )
    if not tissue.any():
        return empty
    depth_grid = layout.distance_inside("tissue")
    g = layout.grid_um

    def sample(name: str, pts: np.ndarray) -> np.ndarray:
        return layout.sample(name, pts[:, 0], pts[:, 1])

    def depth(pts: np.ndarray) -> np.ndarray:
        coords = np.stack([pts[:, 1] / g - 0.5, pts[:, 0] / g - 0.5])
        return ndimage.map_coordinates(depth_grid, coords, order=1, mode="nearest")

    def soft_keep(sd: np.ndarray, width: float) -> np.ndarray:
        return rng.random(len(sd)) < np.clip(0.5 + sd / width, 0.0, 1.0)

    # glands: normal ones in glandular non-tumour tissue, tumour ones inside tumour (hard)
    g_xy, g_kind, g_proto, g_rad = [], [], [], []
    tissue_box = _bbox(layout, tissue, 0.0)
    for gk in (NORMAL_GLAND, TUMOUR_GLAND):
        if gk == TUMOUR_GLAND and not morphology.tumour_glands:
            continue
        shapes = gland_shapes(morphology.glands[gk])
        radii = np.array([s.radius for s in shapes])
        pts = _lattice(rng, tissue_box, morphology.gland_spacing[gk], 0.22)
        proto = rng.integers(0, len(shapes), len(pts))
        rad = radii[proto]
        tum = sample("tumour", pts)
        if gk == NORMAL_GLAND:
            keep = (
                (sample("epithelium", pts) > 0)
                & (tum < -rad)
                & (sample("lymphocyte", pts) < -rad / 2)
            )
        else:
            keep = tum > 0
        keep &= depth(pts) > rad + 4.0
        g_xy.append(pts[keep])
        g_kind.append(np.full(keep.sum(), gk, np.uint8))
        g_proto.append(proto[keep])
        g_rad.append(rad[keep])
    gland_xy = np.concatenate(g_xy)
    gland_kind = np.concatenate(g_kind)
    gland_proto = np.concatenate(g_proto).astype(np.uint16)
    gland_rad = np.concatenate(g_rad)
    # drop glands overlapping an earlier one
    if len(gland_xy) > 1:
        tree = cKDTree(gland_xy)
        alive = np.ones(len(gland_xy), bool)
        for i, j in sorted(tree.query_pairs(2 * gland_rad.max() + 2.0)):
            gap = np.hypot(*(gland_xy[i] - gland_xy[j])) - gland_rad[i] - gland_rad[j]
            if alive[i] and alive[j] and gap < 2.0:
                alive[j] = False
        gland_xy, gland_kind = gland_xy[alive], gland_kind[alive]
        gland_proto, gland_rad = gland_proto[alive], gland_rad[alive]

    n_xy, n_kind, n_proto = [], [], []

    def add(pts: np.ndarray, kind: int, proto: np.ndarray | None = None) -> None:
        k = ORIENTATIONS * VARIANTS
        n_xy.append(pts)
        n_kind.append(np.full(len(pts), kind, np.uint8))
        n_proto.append(rng.integers(0, k, len(pts)) if proto is None else proto)

    # epithelial nuclei of the glands
    for gk in np.unique(gland_kind):
        shapes = gland_shapes(morphology.glands[gk])
        kind = morphology.glands[gk].nucleus_kind
        for i in np.flatnonzero(gland_kind == gk):
            s = shapes[gland_proto[i]]
            variant = rng.integers(0, VARIANTS, len(s.nuclei))
            add(gland_xy[i] + s.nuclei, kind, s.orientation + ORIENTATIONS * variant)

    def outside_glands(pts: np.ndarray) -> np.ndarray:
        if len(gland_xy) == 0 or len(pts) == 0:
            return np.ones(len(pts), bool)
        dist, idx = cKDTree(gland_xy).query(pts, k=1)
        return dist > gland_rad[np.minimum(idx, len(gland_rad) - 1)] + 1.5

    # fibroblasts and scattered lymphocytes in the stroma
    for kind, spacing in ((STROMA, morphology.stroma_spacing), (LYMPHOCYTE, 45.0)):
        pts = _lattice(rng, tissue_box, spacing, 0.3)
        tum = sample("tumour", pts)
        keep = (
            (sample("tissue", pts) > 3.0)
            & (sample("lymphocyte", pts) < 0)
            & (sample("necrosis", pts) < 0)
        )
        if not morphology.tumour_glands:
            keep &= tum < 0
        pts = pts[keep]
        add(pts[outside_glands(pts)], kind)

    # dense lymphocytes
    region = tissue & (layout.field("lymphocyte") > -10)
    box = _bbox(layout, region, 10.0)
    if box is not None:
        pts = _lattice(rng, box, morphology.lymphocyte_spacing, 0.15)
        keep = (sample("tissue", pts) > 1.5) & soft_keep(sample("lymphocyte", pts), 12.0)
        add(pts[keep], LYMPHOCYTE)

    # solid tumour and necrotic debris
    if not morphology.tumour_glands:
        box = _bbox(layout, tissue & (layout.field("tumour") > -10), 10.0)
        if box is not None:
            pts = _lattice(rng, box, morphology.tumour_spacing, 0.14)
            keep = (
                (sample("tissue", pts) > 2.0)
                & soft_keep(sample("tumour", pts), 6.0)
                & ~soft_keep(sample("necrosis", pts), 10.0)
            )
            add(pts[keep], TUMOUR)
    box = _bbox(layout, tissue & (layout.field("necrosis") > -10), 10.0)
    if box is not None:
        pts = _lattice(rng, box, 8.0, 0.3)
        keep = soft_keep(sample("necrosis", pts), 10.0) & (rng.random(len(pts)) < 0.6)
        add(pts[keep], DEBRIS)

    xy = np.concatenate(n_xy) if n_xy else np.zeros((0, 2))
    kinds = np.concatenate(n_kind) if n_kind else np.zeros(0, np.uint8)
    protos = np.concatenate(n_proto).astype(np.uint16) if n_proto else np.zeros(0, np.uint16)
    order = np.argsort(xy[:, 1], kind="stable")
    g_order = np.argsort(gland_xy[:, 1], kind="stable")
    return Cells(
        xy[order],
        kinds[order],
        protos[order],
        gland_xy[g_order],
        gland_kind[g_order],
        gland_proto[g_order],
    )
