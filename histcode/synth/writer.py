"""Writing pyramidal whole-slide images (Aperio SVS or generic tiled TIFF) tile by tile.

The pixels come from a ``render`` callback asked for one strip of tiles at a time, so memory
stays at a few strips whatever the slide size (a 100,000 × 80,000 px slide is written with
well under 1 GiB). The file is written under a temporary name and renamed when complete, so a
half-written slide never looks like a slide.

OpenSlide recognises the result: an ``.svs`` is vendor ``aperio`` with ``openslide.mpp-x``
and ``openslide.objective-power`` (from the ``MPP`` and ``AppMag`` fields of the Aperio
ImageDescription); a ``.tiff`` is vendor ``generic-tiff`` with its µm/px in the TIFF
resolution tags (or none, to exercise the missing-µm/px path).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image

#: render(level, downsample, x, y, width, height) → (height, width, 3) uint8: the pixels of
#: a region of pyramid ``level`` (``downsample`` × level 0), in that level's pixel coordinates.
RenderFn = Callable[[int, float, int, int, int, int], np.ndarray]


@dataclass(frozen=True)
class PyramidSpec:
    """Geometry and metadata of a slide file to write.

    Attributes:
        width: level-0 width in pixels.
        height: level-0 height in pixels.
        mpp: level-0 µm/px.
        format: ``svs`` (Aperio) or ``tiff`` (generic tiled TIFF).
        objective_power: written as Aperio ``AppMag`` (SVS only); None leaves it out.
        write_mpp: write the µm/px (Aperio ``MPP`` or TIFF resolution); False exercises
            slides without it.
        tile: tile side in pixels (a multiple of 16).
        level_factor: downsample between successive pyramid levels (Aperio uses 4).
        min_level_size: stop adding levels once the larger side is below this.
        quality: JPEG quality.
    """

    width: int
    height: int
    mpp: float
    format: Literal["svs", "tiff"] = "svs"
    objective_power: float | None = None
    write_mpp: bool = True
    tile: int = 256
    level_factor: int = 4
    min_level_size: int = 1024
    quality: int = 80

    def levels(self) -> list[tuple[int, int, float]]:
        """(width, height, downsample) of each pyramid level, level 0 first."""
        out = [(self.width, self.height, 1.0)]
        while max(out[-1][:2]) > self.min_level_size:
            ds = out[-1][2] * self.level_factor
            w, h = int(self.width // ds), int(self.height // ds)
            if min(w, h) < 1:
                break
            out.append((w, h, ds))
        return out


def _tiles(strips: Iterator[np.ndarray], width: int, tile: int) -> Iterator[np.ndarray]:
    """Cut strips of height ``tile`` (the last may be shorter) into row-major tiles."""
    for strip in strips:
        if strip.shape[0] < tile:  # tifffile wants whole tiles: pad the last strip
            strip = np.pad(strip, ((0, tile - strip.shape[0]), (0, 0), (0, 0)), mode="edge")
        for x in range(0, width, tile):
            t = strip[:, x : x + tile]
            if t.shape[1] < tile:
                t = np.pad(t, ((0, 0), (0, tile - t.shape[1]), (0, 0)), mode="edge")
            yield t


def _strips(
    render: RenderFn,
    level: int,
    ds: float,
    width: int,
    height: int,
    tile: int,
    on_strip: Callable[[], None] | None,
) -> Iterator[np.ndarray]:
    for y in range(0, height, tile):
        h = min(tile, height - y)
        strip = render(level, ds, 0, y, width, h)
        if strip.shape != (h, width, 3) or strip.dtype != np.uint8:
            raise ValueError(
                f"render returned {strip.shape} {strip.dtype} for level {level} y={y}; "
                f"expected ({h}, {width}, 3) uint8"
            )
        yield strip
        if on_strip is not None:
            on_strip()


def count_strips(spec: PyramidSpec) -> int:
    """Number of render calls :func:`write_pyramid` makes (for progress bars)."""
    return sum(-(-h // spec.tile) for _, h, _ in spec.levels())


def write_pyramid(
    path: Path | str,
    spec: PyramidSpec,
    render: RenderFn,
    on_strip: Callable[[], None] | None = None,
) -> Path:
    """Write a pyramidal slide file, strip by strip, atomically.

    Args:
        path: destination (``.svs`` or ``.tiff``).
        spec: geometry and metadata.
        render: pixel source, called once per strip of ``spec.tile`` rows of each level.
        on_strip: called after each strip (progress).

    Returns:
        The path written.
    """
    path = Path(path)
    levels = spec.levels()
    big = spec.width * spec.height * 3 > 2**31  # JPEG shrinks it, but stay safe past 4 GiB
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    w0, h0 = spec.width, spec.height
    common = dict(
        dtype=np.uint8,
        tile=(spec.tile, spec.tile),
        compression="jpeg",
        compressionargs={"level": spec.quality},
        photometric="rgb",
        metadata=None,
    )
    try:
        with tifffile.TiffWriter(tmp, bigtiff=big) as tif:
            for level, (w, h, ds) in enumerate(levels):
                extra: dict[str, object] = {"subfiletype": 0 if level == 0 else 1}
                if spec.format == "svs":
                    fields = [f"AppMag = {spec.objective_power:g}"] if spec.objective_power else []
                    if spec.write_mpp:
                        fields.append(
                            f"MPP = {spec.mpp * ds:.4f}" if level else f"MPP = {spec.mpp:.4f}"
                        )
                    head = (
                        f"{w0}x{h0} [0,0 {w0}x{h0}] ({spec.tile}x{spec.tile}) JPEG/RGB "
                        f"Q={spec.quality}"
                        if level == 0
                        else f"{w0}x{h0} -> {w}x{h} - "
                    )
                    extra["description"] = "|".join(
                        [
                            f"Aperio Image Library v12.0.15 \r\n{head}",
                            *fields,
                            "ScanScope ID = HISTCODE-SYNTH",
                        ]
                    )
                elif spec.write_mpp:
                    px_per_cm = 1e4 / (spec.mpp * ds)
                    extra["resolution"] = (px_per_cm, px_per_cm)
                    extra["resolutionunit"] = "CENTIMETER"
                strips = _strips(render, level, ds, w, h, spec.tile, on_strip)
                tif.write(_tiles(strips, w, spec.tile), shape=(h, w, 3), **common, **extra)
                if level == 0 and spec.format == "svs":
                    _write_svs_thumbnail(tif, render, levels, spec)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_svs_thumbnail(
    tif: tifffile.TiffWriter,
    render: RenderFn,
    levels: list[tuple[int, int, float]],
    spec: PyramidSpec,
) -> None:
    """Aperio keeps a stripped thumbnail as the second directory; OpenSlide lists it."""
    w, h, ds = levels[-1]
    image = Image.fromarray(render(len(levels) - 1, ds, 0, 0, w, h))
    image.thumbnail((768, 768))
    tif.write(
        np.asarray(image),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": spec.quality},
        metadata=None,
        description=f"Aperio Image Library v12.0.15 \r\n{spec.width}x{spec.height} -> "
        f"{image.width}x{image.height} - ",
    )
