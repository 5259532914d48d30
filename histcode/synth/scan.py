"""Scanning a synthetic slide: a layout rendered into a pyramidal file, with its truth.

:func:`write_slide` is the general entry point (any layout, stain, resolution and format);
:func:`write_test_slide` makes a small slide for tests in one call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from histcode.synth.cells import Morphology, place_cells
from histcode.synth.render import SlideRenderer, random_dust
from histcode.synth.stain import Stain, site_stain
from histcode.synth.tissue import LayoutParams, SlideTruth, TissueLayout, make_layout
from histcode.synth.writer import PyramidSpec, count_strips, write_pyramid

#: RGB of the light through bare glass: white (most scanners) or a grey scanner background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (246, 245, 247), "grey": (207, 206, 208)}
#: Overall stain strength of a pale (faintly stained) slide.
PALE_STRENGTH = 0.4


def slide_size(layout: TissueLayout, mpp: float) -> tuple[int, int]:
    """Level-0 (width, height) in pixels of a scan of ``layout`` at ``mpp`` µm/px."""
    return max(1, round(layout.width_um / mpp)), max(1, round(layout.height_um / mpp))


def _check(mpp: float, fmt: str, background: str) -> None:
    if not 0.05 <= mpp <= 20.0:
        raise ValueError(f"mpp={mpp} µm/px is not plausible; use 0.25 (40x) or 0.5 (20x)")
    if fmt not in ("svs", "tiff"):
        raise ValueError(f"fmt={fmt!r}: write 'svs' (Aperio) or 'tiff' (generic TIFF)")
    if background not in BACKGROUNDS:
        raise ValueError(f"background={background!r}: choose one of {sorted(BACKGROUNDS)}")


def write_slide(
    path: Path | str,
    layout: TissueLayout,
    *,
    mpp: float,
    morphology: Morphology,
    stain: Stain | None = None,
    fmt: Literal["svs", "tiff"] = "svs",
    objective_power: float | None = None,
    write_mpp: bool = True,
    background: Literal["white", "grey"] = "white",
    pale: bool = False,
    seed: int = 0,
    dust: int = 3,
    on_strip: Callable[[], None] | None = None,
) -> SlideTruth:
    """Render a layout into a pyramidal slide file, tile by tile, and return its truth.

    Nuclei, glands and textures are placed in µm, so scans of the same layout and seed at
    different ``mpp`` show the same tissue at the same place (a 20x scan looks like the 40x
    one averaged 2 × 2). Memory stays at a few strips whatever the slide size.

    Args:
        path: destination, ``.svs`` or ``.tiff``; written atomically.
        layout: where the tissue and its classes lie.
        mpp: level-0 µm/px (0.25 for 40x, 0.5 for 20x).
        morphology: how each class looks (``Morphology.preset("easy"|"hard")``).
        stain: the slide's stain; the reference H&E when None.
        fmt: ``svs`` (Aperio; OpenSlide vendor ``aperio``) or ``tiff`` (``generic-tiff``).
        objective_power: Aperio ``AppMag`` (SVS only); None leaves it out.
        write_mpp: write the µm/px (False makes a slide without it).
        background: glass colour, ``white`` (≈ 245) or ``grey`` (≈ 207).
        pale: faintly stained tissue.
        seed: seed of the cells, glass noise and dust.
        dust: number of dust specks on the glass.
        on_strip: called after each strip written (progress).

    Returns:
        The ground-truth masks covering the slide.
    """
    _check(mpp, fmt, background)
    width, height = slide_size(layout, mpp)
    rng = np.random.default_rng([seed, 0xD057])
    glass = tuple(int(v + rng.integers(-2, 3)) for v in BACKGROUNDS[background])
    renderer = SlideRenderer(
        layout,
        place_cells(layout, morphology, seed),
        morphology,
        stain or Stain(),
        mpp=mpp,
        background=glass,
        strength=PALE_STRENGTH if pale else 1.0,
        seed=seed,
        dust=random_dust(rng, layout.width_um, layout.height_um, dust),
    )
    spec = PyramidSpec(
        width, height, mpp, fmt, objective_power if fmt == "svs" else None, write_mpp
    )
    write_pyramid(path, spec, renderer, on_strip)
    return layout.truth(width, height, mpp)


def strips_of(layout: TissueLayout, mpp: float, fmt: str = "svs") -> int:
    """Number of strips :func:`write_slide` renders (for progress bars)."""
    width, height = slide_size(layout, mpp)
    return count_strips(PyramidSpec(width, height, mpp, fmt))


def write_test_slide(
    path: Path | str,
    *,
    width_um: float = 2000.0,
    height_um: float = 1500.0,
    mpp: float = 0.5,
    fmt: Literal["svs", "tiff"] = "svs",
    seed: int = 0,
    background: Literal["white", "grey"] = "white",
    pale: bool = False,
    blank: bool = False,
    fragments: bool = True,
    write_mpp: bool = True,
    objective_power: float | None = None,
    difficulty: Literal["easy", "hard"] = "easy",
    tumour: bool = True,
) -> SlideTruth:
    """A small synthetic slide for tests, in one call.

    Tumour covers about 40 % of the tissue (``easy``) or a few small foci, ~5 % (``hard``,
    which also gets a strong site colour cast); about 8 % is lymphocyte-rich. The same seed
    at different ``mpp`` gives the same tissue.

    Args:
        path: destination (``.svs`` or ``.tiff``).
        width_um: slide width in µm.
        height_um: slide height in µm.
        mpp: level-0 µm/px.
        fmt: ``svs`` or ``tiff``.
        seed: random seed (layout, cells, noise).
        background: ``white`` or ``grey`` glass.
        pale: faintly stained tissue.
        blank: no tissue at all (glass with noise and dust).
        fragments: add small detached tissue fragments.
        write_mpp: write the µm/px into the file.
        objective_power: Aperio ``AppMag``; default ``10 / mpp`` for SVS.
        difficulty: ``easy`` or ``hard`` tumour morphology and pattern.
        tumour: include tumour (False gives a normal slide).

    Returns:
        The ground-truth masks.
    """
    if objective_power is None and fmt == "svs":
        objective_power = round(10.0 / mpp, 2)
    easy = difficulty == "easy"
    params = LayoutParams(
        width_um=width_um,
        height_um=height_um,
        tumour_fraction=(0.4 if easy else 0.05) if tumour else 0.0,
        tumour_pattern="regions" if easy else "foci",
        lymphocyte_fraction=0.08,
        fragments=fragments,
        blank=blank,
    )
    return write_slide(
        path,
        make_layout(params, seed),
        mpp=mpp,
        morphology=Morphology.preset(difficulty),
        stain=None if easy else site_stain(seed % 3, 3, seed, 1.0),
        fmt=fmt,
        objective_power=objective_power,
        write_mpp=write_mpp,
        background=background,
        pale=pale,
        seed=seed,
        dust=8 if blank else 3,
    )
