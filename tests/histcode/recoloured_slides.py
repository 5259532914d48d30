"""Slides that are not brightfield H&E, made from a good one with the synthetic slide writer.

Each is a synthetic slide re-encoded pixel by pixel, level by level, into a new pyramid
(:func:`histcode.synth.writer.write_pyramid`), keeping its geometry and µm/px:

* ``fluorescence``: a dark field with bright signal — haematoxylin as a blue nuclear stain
  (DAPI-like), eosin as green (FITC-like), from colour deconvolution of the H&E slide;
* ``inverted``: 255 − RGB (dark glass, light tissue);
* ``ycbcr``: the pixels' YCbCr (JPEG, BT.601 full range) stored as RGB, as a DICOM read
  without its YCbCr→RGB conversion looks (teal tissue on salmon glass);
* ``grb``, ``gbr``, ``brg``, ``rbg``, ``bgr``: the RGB channels in another order;

or by any function of the pixels (:func:`write_recoloured` takes one, e.g. a stain cast).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide

from histcode.synth.writer import PyramidSpec, write_pyramid

#: Macenko et al.'s haematoxylin and eosin OD vectors, for unmixing the H&E slide.
_H = np.array([0.5626, 0.7201, 0.4062])
_E = np.array([0.2159, 0.8012, 0.5581])
RECOLOURINGS = ("fluorescence", "inverted", "ycbcr", "grb", "gbr", "brg", "rbg", "bgr")


def recolour(rgb: np.ndarray, kind: str) -> np.ndarray:
    """``rgb`` (..., 3) uint8 as a scan of kind ``kind`` (see the module) would show it."""
    x = rgb.astype(np.float64)
    if kind == "inverted":
        out = 255.0 - x
    elif kind == "ycbcr":
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        out = np.stack(
            [
                0.299 * r + 0.587 * g + 0.114 * b,
                128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                128 + 0.5 * r - 0.418688 * g - 0.081312 * b,
            ],
            axis=-1,
        )
    elif kind == "fluorescence":
        od = np.log10(256.0 / (x + 1.0))
        conc = np.clip(od @ np.linalg.pinv(np.stack([_H, _E])), 0, None)  # (..., 2): H, E
        h, e = conc[..., 0], conc[..., 1]
        out = np.stack([6 + 40 * e, 8 + 260 * e, 10 + 300 * h], axis=-1)
    elif kind in RECOLOURINGS:
        out = x[..., ["rgb".index(c) for c in kind]]
    else:
        raise ValueError(f"kind={kind!r}: choose one of {RECOLOURINGS}")
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def write_recoloured(src: Path, dst: Path, kind: str | Callable[[np.ndarray], np.ndarray]) -> Path:
    """Write ``src`` (a small slide with µm/px) recoloured as ``kind`` to ``dst``.

    ``kind`` names a recolouring of :func:`recolour`, or is a function of ``(h, w, 3)`` uint8
    pixels returning the new ones.

    Each level of the new pyramid is recoloured from the same level of the source (or from
    level 0 averaged, where the source has no such level, as a single-level real slide);
    ``dst``'s suffix (``.svs``/``.tiff``) picks the format.
    """
    with openslide.OpenSlide(str(src)) as slide:
        mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        w, h = slide.dimensions
        fmt = "tiff" if dst.suffix.lower() in (".tif", ".tiff") else "svs"
        power = round(10 / mpp, 2) if fmt == "svs" else None
        spec = PyramidSpec(w, h, mpp, fmt, objective_power=power)
        downsamples = [round(d) for d in slide.level_downsamples]

        def render(level: int, ds: float, x: int, y: int, width: int, height: int) -> np.ndarray:
            f = round(ds)
            if f in downsamples:  # the source has this level
                src_level, reduce = downsamples.index(f), 1
            else:  # box-average level 0
                src_level, reduce = 0, f
            region = slide.read_region(
                (x * f, y * f), src_level, (width * reduce, height * reduce)
            ).convert("RGB")
            if reduce > 1:
                region = region.reduce(reduce)
            pixels = np.asarray(region)[:height, :width]
            return kind(pixels) if callable(kind) else recolour(pixels, kind)

        return write_pyramid(dst, spec, render)
