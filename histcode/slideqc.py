"""Brightfield quality control of a slide, measured on the thumbnail tissue is segmented on.

histcode's encoders and models expect brightfield H&E: light through glass, absorbed by two
stains. Physics makes that checkable on a thumbnail, in optical density (OD, Beer–Lambert:
``OD = log10(I0 / I)`` per RGB channel, ``I0`` the light through bare glass):

* **the glass is bright and neutral** — bare glass absorbs almost nothing, equally in every
  channel: its OD against white is near 0 and the same in R, G and B. A fluorescence scan
  (light emitted on a dark field) or a colour-inverted one has a dark background; a
  mis-decoded one (YCbCr stored as RGB: teal tissue on salmon) a coloured one.
* **tissue absorbs** — stained tissue is darker than the glass around it (OD > 0); in
  fluorescence and inverted scans it is brighter (OD < 0).
* **the absorbance is haematoxylin and eosin** — each tissue pixel's OD vector is a
  non-negative mixture of the two stains' OD vectors (Ruifrok & Johnston 2001; Macenko et al.
  2009), so its direction lies in the thin cone those vectors span (both stains absorb green
  most: H&E looks pink to purple). Teal, green or blue tissue absorbs red most and lies far
  outside it.

:func:`measure_brightfield` measures all four on the thumbnail and its tissue mask;
:class:`BrightfieldQC` says which fail and how to fix it. The thresholds
(:class:`BrightfieldQCParams`) were set between the values measured on good slides (the real
CMU-1 Aperio slide, synthetic easy and hard cohorts with every site's stain cast, white and
grey glass, pale staining) and bad ones (fluorescence-like, colour-inverted, YCbCr mis-decoded
and channel-swapped versions of synthetic slides); the measured values are given next to each.

A swap of only the red and blue channels keeps H&E's green absorbance and looks like a
plausible (bluish) H&E: no colour check can tell it from a real stain, and this one passes it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import ndimage

#: Stain OD vectors (unit length, RGB) whose non-negative mixtures are accepted as H&E:
#: Ruifrok & Johnston's (2001) and Macenko et al.'s (2009) reference haematoxylin and eosin.
STAIN_VECTORS: dict[str, tuple[float, float, float]] = {
    "haematoxylin (Ruifrok & Johnston)": (0.650, 0.704, 0.286),
    "eosin (Ruifrok & Johnston)": (0.072, 0.990, 0.105),
    "haematoxylin (Macenko)": (0.5626, 0.7201, 0.4062),
    "eosin (Macenko)": (0.2159, 0.8012, 0.5581),
}

#: What ``--brightfield_qc`` does with a slide that fails: record it as failed, tile it with a
#: warning, or neither (the measurements are stored in every case).
QCMode = Literal["fail", "warn", "off"]
QC_MODES: tuple[str, ...] = ("fail", "warn", "off")


@dataclass(frozen=True)
class BrightfieldQCParams:
    """Thresholds of :func:`measure_brightfield`.

    Measured on the thumbnails ``histcode tile`` segments (8–16 µm/px), good slides: the real
    CMU-1-Small-Region (Aperio), 27 slides of ``histcode synth`` cohorts (easy with 2 sites;
    hard with 3 and 4 sites, seeds 0 and 7: every site's stain cast, 40x/20x, SVS/TIFF,
    white/grey glass) and 7 of ``write_test_slide`` (easy/hard, white/grey, pale). Bad:
    fluorescence-like, colour-inverted, YCbCr-as-RGB and channel-permuted versions of three
    synthetic slides and of CMU-1 (``tests/histcode/recoloured_slides.py``); 4 of each.

    ============  ===========  ============  ==============  ============
    slides        glass OD     glass spread  tissue OD       stain angle
    ============  ===========  ============  ==============  ============
    good (35)     0.013–0.094  0.000–0.011   0.092–0.311     0.0°–5.5°
    fluorescence  1.13–1.37    0.35–0.78     −0.59–0.00      138°–144°
    inverted      0.71–1.39    0.04–0.21     −1.00–−0.31     133°–144°
    YCbCr as RGB  0.20–0.23    0.20–0.28     0.000–0.002     61°–71°
    GRB/RBG/BRG   (as good)    (as good)     (as good)       21°–41°
    GBR           (as good)    (as good)     (as good)       14.8°–17.5°
    BGR           (as good)    (as good)     (as good)       0°–5.1° (passes)
    ============  ===========  ============  ==============  ============

    Attributes:
        background_max_od: highest mean OD of the glass against white: 0.3 is glass at RGB
            ≈ 128, 3× the grey scanner background (0.094) and below the darkest bad glass
            (0.71).
        background_max_spread: highest difference between the glass's largest and smallest
            channel OD: 0.1 is glass visibly tinted (RGB 245, 245, 195), 9× good glass
            (≤ 0.011) and half the salmon of a YCbCr mis-decode (≥ 0.20).
        tissue_min_od: lowest median OD of tissue against the glass (mean of channels): 0.03
            is tissue passing 93 % of the light, a third of the palest good slide (0.092);
            bad tissue is brighter than its background (≤ 0.002).
        max_stain_angle: largest median angle (degrees) between the tissue pixels' OD vectors
            and the cone of H&E mixtures (:data:`STAIN_VECTORS`): 12° is twice the strongest
            synthetic site cast (5.5°) and below every detectable channel mix-up (≥ 14.8°).
        od_floor: tissue pixels whose OD vector is shorter than this are too pale for a
            direction and left out of the angle.
        min_background_fraction: the glass is the non-tissue part of the thumbnail when that
            is at least this fraction of it; otherwise a ring at the border is taken.
        border_fraction: width of that ring, as a fraction of the thumbnail's sides.
        edge_px: non-tissue pixels this close to tissue are left out of the glass (blur).
        min_tissue_px: fewer tissue pixels than this: the tissue checks are not made.
        max_px: at most this many glass and tissue pixels are measured (an even stride over
            the thumbnail), so a large slide costs no more than a small one.
    """

    background_max_od: float = 0.3
    background_max_spread: float = 0.1
    tissue_min_od: float = 0.03
    max_stain_angle: float = 12.0
    od_floor: float = 0.1
    min_background_fraction: float = 0.05
    border_fraction: float = 0.05
    edge_px: int = 2
    min_tissue_px: int = 20
    max_px: int = 100_000


#: check name → what failing it says about the slide
CHECKS: dict[str, str] = {
    "background_bright": "dark glass, as in fluorescence or colour-inverted scans",
    "background_neutral": "coloured glass, as when YCbCr is decoded as RGB",
    "tissue_absorbs": "tissue no darker than the glass, as in fluorescence or inverted scans",
    "tissue_h_and_e": "tissue colour not haematoxylin and eosin (teal, green, blue), as with "
    "mis-decoded or swapped colour channels or another stain",
}


@dataclass
class BrightfieldQC:
    """What :func:`measure_brightfield` measured, and which checks failed.

    Attributes:
        background_rgb: median RGB of the glass (brighter half of the background pixels).
        background_from: ``glass`` (non-tissue pixels) or ``border`` (a ring at the border,
            when tissue covers nearly everything).
        background_od: mean OD of the glass against white (0 = white).
        background_spread: largest minus smallest channel OD of the glass (0 = neutral).
        tissue_px: tissue pixels on the thumbnail.
        tissue_od: median OD of tissue against the glass (mean of channels), or None when
            there is too little tissue.
        stain_angle: median angle in degrees between tissue OD vectors and the H&E cone, or
            None.
        failed: names of the failed checks (keys of :data:`CHECKS`).
        params: the thresholds used.
    """

    background_rgb: tuple[int, int, int]
    background_from: str
    background_od: float
    background_spread: float
    tissue_px: int
    tissue_od: float | None
    stain_angle: float | None
    failed: list[str] = field(default_factory=list)
    params: BrightfieldQCParams = field(default_factory=BrightfieldQCParams)

    @property
    def passed(self) -> bool:
        return not self.failed

    def attrs(self, mode: str) -> dict[str, Any]:
        """The measurements as JSON-ready attrs of a slide group (``qc``)."""
        p = self.params
        return {
            "check": "brightfield",
            "mode": mode,
            "passed": self.passed,
            "failed": list(self.failed),
            "background_rgb": list(self.background_rgb),
            "background_from": self.background_from,
            "background_od": round(self.background_od, 4),
            "background_spread": round(self.background_spread, 4),
            "tissue_px": self.tissue_px,
            "tissue_od": None if self.tissue_od is None else round(self.tissue_od, 4),
            "stain_angle": None if self.stain_angle is None else round(self.stain_angle, 2),
            "message": self.describe() or None,
            "thresholds": {
                "background_max_od": p.background_max_od,
                "background_max_spread": p.background_max_spread,
                "tissue_min_od": p.tissue_min_od,
                "max_stain_angle": p.max_stain_angle,
            },
        }

    def describe(self) -> str:
        """One clause per failed check: its name, the values against the limit, the meaning."""
        p = self.params
        glass = f"background RGB {tuple(self.background_rgb)}" + (
            " (at the border)" if self.background_from == "border" else ""
        )
        values = {
            "background_bright": f"{glass}, OD {self.background_od:.2f} > {p.background_max_od:g}",
            "background_neutral": f"{glass}, channel OD spread {self.background_spread:.3f} > "
            f"{p.background_max_spread:g}",
            "tissue_absorbs": f"median tissue OD {self.tissue_od or 0:.3f} < {p.tissue_min_od:g}",
            "tissue_h_and_e": f"median angle of tissue OD to the H&E stain vectors "
            f"{self.stain_angle or 0:.1f}° > {p.max_stain_angle:g}°",
        }
        return "; ".join(f"{name}: {values[name]} ({CHECKS[name]})" for name in self.failed)


def optical_density(
    rgb: np.ndarray, i0: np.ndarray | tuple[float, ...] = (255, 255, 255)
) -> np.ndarray:
    """Beer–Lambert optical density of each channel against the light ``i0``.

    Args:
        rgb: (..., 3) intensities 0–255.
        i0: RGB of the incident light (the glass); white by default.

    Returns:
        (..., 3) float32 ``log10((i0 + 1) / (rgb + 1))``: 0 for the glass, positive where
        light is absorbed, negative where the pixel is brighter than ``i0``.
    """
    i0 = np.asarray(i0, np.float32)
    return np.log10((i0 + 1.0) / (np.asarray(rgb, np.float32) + 1.0)).astype(np.float32)


def angle_to_cone(od: np.ndarray, generators: np.ndarray) -> np.ndarray:
    """Angle between vectors and the convex cone of the generators' non-negative mixtures.

    Exact: 0 inside the cone (inside the cone of some three generators, Carathéodory);
    otherwise the smallest angle to a face spanned by two generators (to the projection onto
    the face's plane when that is a non-negative mixture, else to the nearer generator).

    Args:
        od: (N, 3) vectors (any length; zero vectors give 90°).
        generators: (K, 3) generator vectors, K ≥ 2.

    Returns:
        (N,) float32 angles in degrees, 0–180.
    """
    x = od / np.maximum(np.linalg.norm(od, axis=1, keepdims=True), 1e-12)
    g = generators / np.linalg.norm(generators, axis=1, keepdims=True)
    inside = np.zeros(len(x), bool)
    for triple in itertools.combinations(range(len(g)), 3):
        m = g[list(triple)].T
        if abs(np.linalg.det(m)) < 1e-9:
            continue
        inside |= (np.linalg.solve(m, x.T).T >= -1e-9).all(axis=1)
    best = np.full(len(x), -1.0)
    for i, j in itertools.combinations(range(len(g)), 2):
        a = np.stack([g[i], g[j]], axis=1)  # (3, 2)
        coef = x @ a @ np.linalg.inv(a.T @ a)  # least-squares mixture on the face's plane
        proj = coef @ a.T
        cos_face = np.einsum("nc,nc->n", x, proj) / np.maximum(np.linalg.norm(proj, axis=1), 1e-12)
        cos = np.maximum(x @ g[i], x @ g[j])
        cos = np.where((coef >= 0).all(axis=1), np.maximum(cos, cos_face), cos)
        best = np.maximum(best, cos)
    angle = np.degrees(np.arccos(np.clip(best, -1.0, 1.0)))
    return np.where(inside, 0.0, angle).astype(np.float32)


def _every_nth(pixels: np.ndarray, most: int) -> np.ndarray:
    """At most ``most`` rows of ``pixels``, evenly strided (deterministic)."""
    return pixels[:: -(-len(pixels) // most)] if len(pixels) > most else pixels


def _background(
    rgb: np.ndarray, mask: np.ndarray, p: BrightfieldQCParams
) -> tuple[np.ndarray, str]:
    """Glass pixels: non-tissue away from tissue edges, else a ring at the border."""
    away = ~ndimage.binary_dilation(mask, iterations=p.edge_px) if mask.any() else ~mask
    if away.mean() >= p.min_background_fraction:
        return rgb[away], "glass"
    h, w = mask.shape
    by, bx = max(1, round(h * p.border_fraction)), max(1, round(w * p.border_fraction))
    ring = np.ones((h, w), bool)
    ring[by : h - by, bx : w - bx] = False
    return rgb[ring], "border"


def measure_brightfield(
    rgb: np.ndarray, mask: np.ndarray, params: BrightfieldQCParams | None = None
) -> BrightfieldQC:
    """Measure whether a slide thumbnail looks like a brightfield H&E scan.

    The glass is the median colour of the brighter half of the background pixels (glass is
    the brightest thing on a brightfield slide; the brighter half ignores dark debris, pen
    marks and black filler outside the scanned area up to half the background).

    Args:
        rgb: (H, W, 3) uint8 thumbnail.
        mask: (H, W) bool tissue mask of that thumbnail
            (:func:`histcode.segmentation.segment_tissue`).
        params: thresholds; the defaults are set from measurements (see the class).

    Returns:
        The measurements and the failed checks (none: a brightfield H&E slide).
    """
    p = params or BrightfieldQCParams()
    pixels, source = _background(rgb, mask, p)
    pixels = _every_nth(pixels, p.max_px)
    luminance = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    bright = pixels[luminance >= np.median(luminance)]
    glass = np.median(bright, axis=0)
    od_glass = optical_density(glass)
    qc = BrightfieldQC(
        background_rgb=tuple(int(np.rint(v)) for v in glass),  # type: ignore[arg-type]
        background_from=source,
        background_od=float(od_glass.mean()),
        background_spread=float(od_glass.max() - od_glass.min()),
        tissue_px=int(mask.sum()),
        tissue_od=None,
        stain_angle=None,
        params=p,
    )
    if qc.background_od > p.background_max_od:
        qc.failed.append("background_bright")
    if qc.background_spread > p.background_max_spread:
        qc.failed.append("background_neutral")
    if qc.tissue_px < p.min_tissue_px:
        return qc
    od = optical_density(_every_nth(rgb[mask], p.max_px), glass)
    qc.tissue_od = float(np.median(od.mean(axis=1)))
    if qc.tissue_od < p.tissue_min_od:
        qc.failed.append("tissue_absorbs")
    strong = od[np.linalg.norm(od, axis=1) >= p.od_floor]
    if len(strong) >= p.min_tissue_px:
        generators = np.asarray(list(STAIN_VECTORS.values()), np.float64)
        qc.stain_angle = float(np.median(angle_to_cone(strong.astype(np.float64), generators)))
        if qc.stain_angle > p.max_stain_angle:
            qc.failed.append("tissue_h_and_e")
    return qc
