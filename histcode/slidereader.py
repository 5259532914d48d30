"""The slide reader that only reads: ``SlideReader`` over OpenSlide, its errors, level-0 µm/px.

``SlideReader`` wraps OpenSlide, so it opens every format OpenSlide 4 reads (Aperio SVS,
Hamamatsu NDPI, MIRAX MRXS, Leica SCN, DICOM WSI, generic tiled TIFF, …). It resolves the
physical resolution of level 0 (µm/px) from the slide's metadata (:func:`resolve_mpp`) and
returns RGB ``uint8`` arrays. Faster readers subclass it (:mod:`histcode.tiffjpeg`); which
reader opens a slide is :func:`histcode.slide.open_slide`'s choice, and :mod:`histcode.slide`
re-exports everything here, so ``from histcode.slide import SlideReader`` keeps working.

After TRIDENT's ``OpenSlideWSI``: dimensions, mpp, read_region, thumbnail, close, ``with``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

#: the log channel of slide reading (``histcode.slide``, as before this module was split off)
log = logging.getLogger("histcode.slide")

#: µm/px of level 0 assumed per unit of objective power when only the power is known:
#: 10 µm/px ÷ magnification, i.e. 40x → 0.25 µm/px and 20x → 0.5 µm/px (typical of Aperio,
#: Hamamatsu and Leica scanners; real scanners differ by a few percent).
MPP_TIMES_POWER = 10.0

#: Plausible range of level-0 µm/px; metadata outside it is treated as absent.
MPP_RANGE = (0.05, 20.0)


class SlideError(RuntimeError):
    """A slide cannot be opened or read. The message names the file and how to fix it."""


class MissingMppError(SlideError):
    """A slide has no usable µm/px in its metadata and none was given."""


@dataclass(frozen=True)
class MppSource:
    """Where a slide's level-0 µm/px came from.

    Attributes:
        mpp: level-0 µm/px (mean of x and y).
        source: ``override`` | ``openslide`` | ``tiff-resolution`` | ``objective-power``.
        replaced: when an override replaced a µm/px that the slide's metadata has, that
            value and where it came from (``openslide`` or ``tiff-resolution``); else None.
    """

    mpp: float
    source: str
    replaced: tuple[float, str] | None = None


def _plausible(mpp: float) -> bool:
    return math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def check_mpp(mpp: float, given_by: str = "--mpp_override") -> float:
    """``mpp`` as a float if it is a plausible level-0 µm/px.

    Raises:
        ValueError: outside :data:`MPP_RANGE` or not finite; names ``given_by``.
    """
    if not _plausible(float(mpp)):
        raise ValueError(
            f"{given_by} {mpp} is not a plausible µm/px for level 0 "
            f"(expected {MPP_RANGE[0]}–{MPP_RANGE[1]}; 40x scans are about 0.25, 20x 0.5)"
        )
    return float(mpp)


def metadata_mpp(properties: dict[str, str]) -> MppSource | None:
    """The µm/px of level 0 that a slide's metadata states, or None.

    OpenSlide's ``openslide.mpp-x``/``-y``, else the TIFF resolution tags
    (``tiff.XResolution`` with ``tiff.ResolutionUnit`` centimeter or inch). The objective
    power is not a µm/px and is not used here (see :func:`resolve_mpp`).
    """

    def number(key: str) -> float | None:
        try:
            value = float(properties[key])
        except (KeyError, ValueError):
            return None
        return value if math.isfinite(value) and value > 0 else None

    mx, my = number(openslide.PROPERTY_NAME_MPP_X), number(openslide.PROPERTY_NAME_MPP_Y)
    if mx and my and _plausible((mx + my) / 2):
        return MppSource((mx + my) / 2, "openslide")

    um_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(
        properties.get("tiff.ResolutionUnit", "").lower()
    )
    rx, ry = number("tiff.XResolution"), number("tiff.YResolution")
    if um_per_unit and rx and ry:
        mpp = (um_per_unit / rx + um_per_unit / ry) / 2
        if _plausible(mpp):
            return MppSource(mpp, "tiff-resolution")
    return None


def resolve_mpp(
    properties: dict[str, str],
    path: Path | str,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
) -> MppSource:
    """Level-0 µm/px of a slide from its OpenSlide properties.

    Order: ``mpp_override`` (this slide's value, e.g. a ``--mpp_csv`` row; the metadata value
    it replaces is kept in ``replaced``); the metadata (:func:`metadata_mpp`: OpenSlide's
    mpp, else the TIFF resolution); ``mpp_fallback`` (``--mpp_override``, for slides whose
    metadata has no µm/px); the objective power (``openslide.objective-power``) with
    ``MPP_TIMES_POWER`` µm/px per unit, which is an assumption and logged as a warning.

    Args:
        properties: OpenSlide's property map of the slide.
        path: the slide's path, for messages.
        mpp_override: µm/px of level 0 of this slide; wins over metadata.
        mpp_fallback: µm/px of level 0 used only when the metadata has none (it wins over
            the objective-power assumption).

    Returns:
        The µm/px and where it came from (``override`` for either of the two given values).

    Raises:
        MissingMppError: no source gives a plausible value; the message says how to fix it.
        ValueError: a given value is not plausible.
    """
    measured = metadata_mpp(properties)
    if mpp_override is not None:
        mpp = check_mpp(mpp_override, "--mpp_override")
        replaced = None if measured is None else (measured.mpp, measured.source)
        return MppSource(mpp, "override", replaced)
    if measured is not None:
        return measured
    if mpp_fallback is not None:
        return MppSource(check_mpp(mpp_fallback, "--mpp_override"), "override")

    try:
        power = float(properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER])
    except (KeyError, ValueError):
        power = None
    if power and power > 0 and _plausible(MPP_TIMES_POWER / power):
        mpp = MPP_TIMES_POWER / power
        log.warning(
            "%s: no µm/px in the metadata; assuming %.4g µm/px from objective power %gx "
            "(%g µm/px ÷ power). Pass --mpp_override if your scanner differs.",
            path,
            mpp,
            power,
            MPP_TIMES_POWER,
        )
        return MppSource(mpp, "objective-power")

    raise MissingMppError(
        f"{path}: no usable µm/px in the slide's metadata (no openslide.mpp-x, no TIFF "
        "resolution in centimeter or inch, no objective power). If you know the scanner's "
        "resolution, pass it with --mpp_override (µm/px of level 0 of every slide without "
        "one, e.g. 0.25 for 40x, 0.5 for 20x) or per slide with --mpp_csv."
    )


def fingerprint(path: Path | str, properties: dict[str, str] | None = None) -> str:
    """A cheap content fingerprint of a slide file, to notice a changed file on resume.

    Uses OpenSlide's ``openslide.quickhash-1`` when present, else a SHA-256 of the file size
    and its first and last MiB.
    """
    if properties and openslide.PROPERTY_NAME_QUICKHASH1 in properties:
        return "quickhash1:" + properties[openslide.PROPERTY_NAME_QUICKHASH1]
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 1 << 20:
            f.seek(max(size - (1 << 20), 0))
            digest.update(f.read(1 << 20))
    return "sha256-ends:" + digest.hexdigest()


def rgba_to_rgb(rgba: np.ndarray, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Composite a non-premultiplied RGBA array over a background colour.

    Args:
        rgba: (H, W, 4) uint8.
        background: RGB of the slide glass, used where alpha < 255 (outside scanned areas).

    Returns:
        (H, W, 3) uint8.
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    bg = np.asarray(background, np.float32)
    return (rgb * a + bg * (1.0 - a) + 0.5).astype(np.uint8)


class SlideReader:
    """Reads regions of a whole-slide image through OpenSlide.

    Args:
        path: the slide file.
        mpp_override: µm/px of level 0 to use instead of the metadata.
        mpp_fallback: µm/px of level 0 to use when the metadata has none.

    Raises:
        FileNotFoundError: no such file.
        SlideError: OpenSlide cannot open it (not a slide, unsupported or corrupt).
        MissingMppError: no usable µm/px and no override.

    Example:
        >>> with SlideReader("slide.svs") as slide:  # doctest: +SKIP
        ...     tile = slide.read_region((0, 0), 0, (256, 256))  # (256, 256, 3) uint8
    """

    def __init__(
        self,
        path: Path | str,
        mpp_override: float | None = None,
        mpp_fallback: float | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such slide file")
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(
                f"{self.path}: not a slide OpenSlide can read (unsupported or unrecognised "
                "format). Check that it is a whole-slide image (SVS, NDPI, MRXS, SCN, DICOM, "
                "tiled TIFF) and not truncated."
            ) from None
        except openslide.OpenSlideError as err:
            raise SlideError(
                f"{self.path}: OpenSlide cannot open it ({err}); the file "
                "may be corrupt or truncated. Re-export or re-copy it."
            ) from None
        self.properties: dict[str, str] = dict(self._slide.properties)
        try:
            self.mpp_source = resolve_mpp(self.properties, self.path, mpp_override, mpp_fallback)
        except (MissingMppError, ValueError):
            self._slide.close()
            raise
        bg = self.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "FFFFFF")
        try:
            self.background = tuple(int(bg[i : i + 2], 16) for i in (0, 2, 4))
        except ValueError:
            self.background = (255, 255, 255)

    # -- geometry -------------------------------------------------------------------------
    @property
    def mpp(self) -> float:
        """Level-0 µm/px."""
        return self.mpp_source.mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self._slide.dimensions

    @property
    def level_count(self) -> int:
        return self._slide.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._slide.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._slide.level_downsamples

    @property
    def vendor(self) -> str | None:
        return self.properties.get(openslide.PROPERTY_NAME_VENDOR)

    def level_mpp(self, level: int) -> float:
        """µm/px of a pyramid level."""
        return self.mpp * self.level_downsamples[level]

    def level_for_mpp(self, mpp: float, tolerance: float = 0.01) -> int:
        """The coarsest pyramid level that is at least as fine as ``mpp`` (never upsample).

        Args:
            mpp: the resolution wanted, µm/px.
            tolerance: relative slack, so that 0.499 µm/px counts as 0.5.
        """
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= mpp * (1 + tolerance):
                best = level
        return best

    def fingerprint(self) -> str:
        """Content fingerprint (see :func:`fingerprint`)."""
        return fingerprint(self.path, self.properties)

    # -- pixels ---------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read a region as RGB.

        Args:
            location: (x, y) of the top-left corner in level-0 pixels.
            level: pyramid level to read from.
            size: (width, height) in pixels of that level.

        Returns:
            (height, width, 3) uint8; areas outside the scan are the slide's background colour.

        Raises:
            SlideError: the tile data cannot be decoded (damaged file).
        """
        return rgba_to_rgb(np.asarray(self._read_rgba(location, level, size)), self.background)

    def _read_rgba(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        """OpenSlide's RGBA image of a region; damaged data raises :class:`SlideError`."""
        try:
            return self._slide.read_region(location, level, size)
        except openslide.OpenSlideError as err:
            raise SlideError(
                f"{self.path}: tile data at level {level}, x={location[0]}, y={location[1]} "
                f"cannot be read ({err}); the file is damaged. Re-export or re-copy it."
            ) from None

    def thumbnail(
        self, mpp: float, coarsen: float = 1.0, band_rows: int = 1024, threads: int = 2
    ) -> tuple[np.ndarray, float]:
        """The whole slide at about ``mpp`` µm/px, read band by band.

        Reads the coarsest level at least as fine as ``mpp`` (or up to ``coarsen`` times
        coarser, to spare decoding a much larger level) and averages blocks of
        ``f × f`` of its pixels, ``f`` the whole number nearest ``mpp / level_mpp`` (so the
        result's µm/px is ``level_mpp × f``, within a few percent of ``mpp``). The level is
        read in bands of about ``band_rows`` rows on ``threads`` threads, so memory stays at
        a few bands plus the result whatever the slide size.

        Returns:
            (H, W, 3) uint8 image, and its µm/px: thumbnail pixel (i, j) covers level-0
            pixels from (j, i) × that µm/px ÷ :attr:`mpp`. Partial blocks at the right and
            bottom edges are averages of the pixels they have.
        """
        level = self.level_for_mpp(mpp, tolerance=max(coarsen, 1.0) - 1.0 + 0.01)
        level_mpp = self.level_mpp(level)
        f = max(1, int(mpp / level_mpp + 0.5))
        w, h = self.level_dimensions[level]
        tw, th = -(-w // f), -(-h // f)
        out = np.empty((th, tw, 3), np.uint8)
        band = f * max(1, band_rows // f)
        ds = self.level_downsamples[level]

        def read_band(y: int) -> None:
            rows = min(band, h - y)
            image = self._read_rgba((0, round(y * ds)), level, (w, rows))
            if f > 1:
                image = image.reduce(f)  # box average in C; partial edge blocks averaged
            out[y // f : y // f + image.height] = rgba_to_rgb(np.asarray(image), self.background)

        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(read_band, range(0, h, band)))
        return out, level_mpp * f

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SlideReader({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]} px, "
            f"{self.mpp:.4g} µm/px from {self.mpp_source.source}, {self.level_count} levels)"
        )
