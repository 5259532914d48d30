"""A fast tile reader for JPEG-tiled TIFF slides (Aperio SVS, generic tiled TIFF).

OpenSlide's ``read_region`` composites every region through cairo in premultiplied RGBA
(about 1.2 ms a 224 px tile here against about 0.3 ms to decode the JPEG that holds it).
:class:`TiffJpegReader` keeps OpenSlide for everything but the pixels of the pyramid levels
that are JPEG-tiled TIFF pages: for those it reads the stored tiles' bytes with ``os.pread``,
decodes them with libjpeg-turbo and copies the wanted window into an RGB array. It decodes:

- each stored tile once while it stays in a small LRU of decoded tiles (adjacent grid tiles
  share stored tiles: a 448 px window on 256 px stored tiles touches 4–9 of them);
- at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled IDCT) when the caller wants
  the window downsampled by that factor (:meth:`TiffJpegReader.read_region_scaled`), which
  costs a fraction of a full decode and replaces the resize afterwards;
- a window that is exactly one stored tile (e.g. 256 px tiles at a level stored in 256 px
  tiles, the grid starting at 0) straight into the array it returns (simplejpeg's
  ``buffer=``): no LRU entry and no copy.

What a tile costs beyond its decode when windows straddle stored tiles (224 px tiles on
256 px stored tiles of a 20x SVS, one core, µs a tile; ``benchmarks.tile_reading``): the
decode itself runs 10–15 % slower than in a tight loop, since each decoded tile is written to
memory it keeps for the next row of windows (~19), copying the window out of the 1–4
stored tiles it covers (~15), Python (~6), ``os.pread`` (~2).

Library, chosen by measurement (one 256 px YCbCr 4:2:0 q80 tile of the synthetic 40x SVS and
one 240 px RGB tile of CMU-1, 300 decodes each, same run, 2 busy cores; ms a tile):

=====================================  ======  =======
decoder                                synth   CMU-1
=====================================  ======  =======
simplejpeg ``decode_jpeg``             0.11    0.30
imagecodecs ``jpeg8_decode``           0.23    0.31
tifffile ``TiffPage.decode``           0.20    0.29
PIL ``Image.open`` + ``np.asarray``    0.28    0.37
simplejpeg at 1/2 (``min_height``)     0.06    –
PIL with ``draft`` at 1/2              0.17    0.30
=====================================  ======  =======

simplejpeg (a maintained libjpeg-turbo binding with its own wheels) is the fastest, and the
only one of these with scaled decoding that returns a NumPy array without a PIL image in
between; imagecodecs has no scale argument; PyTurboJPEG needs a system ``libturbojpeg``.
simplejpeg cannot be told a stream's colour space, so abbreviated streams get their
``JPEGTables`` merged in, and streams of ``Photometric=RGB`` pages (Aperio's usual: no JFIF,
component ids 0, 1, 2, which libjpeg would take for YCbCr) get an Adobe APP14 marker with
transform 0 ("no colour transform"), exactly what OpenSlide tells libjpeg for those pages.

Pixels equal OpenSlide's within JPEG decoder rounding (both use libjpeg-turbo's islow IDCT
and fancy upsampling; see ``tests/histcode/test_tiffjpeg.py`` for the measured differences).
Levels that are not JPEG-tiled pages (JPEG 2000, stripped, …), regions that fall between
pixels of a level, and vendors whose TIFF layout OpenSlide must interpret (Philips, Ventana,
Leica, NDPI, …) stay with OpenSlide; :func:`fast_levels` says why for each level.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histcode.slidereader import SlideError, SlideReader

if TYPE_CHECKING:  # torch only where tiles go to a device: `histcode tile` never imports it
    import torch

log = logging.getLogger(__name__)

#: OpenSlide vendors whose pyramid levels are plain tiled TIFF pages, one per level.
TIFF_VENDORS = ("aperio", "generic-tiff")

#: Adobe APP14 marker, transform 0: the components are R, G, B (no YCbCr conversion).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

#: TIFF compression and photometric codes used here.
_JPEG, _PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 7, 2, 6

#: Decode scales libjpeg's scaled IDCT offers here (powers of two).
_SCALES = (1, 2, 4, 8)

#: Decoded stored tiles kept per reader (bytes).
DEFAULT_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class JpegLevel:
    """Where one pyramid level's stored JPEG tiles are in the file.

    Attributes:
        width: level width in pixels.
        height: level height in pixels.
        tile_width: stored tile width.
        tile_height: stored tile height.
        offsets: (tiles_down * tiles_across,) file offset of each stored tile.
        bytecounts: (same,) byte count of each (0: a missing tile, left as background).
        tables: the page's JPEGTables without its EOI (empty when the tiles are complete).
        rgb: the JPEG components are RGB (Photometric=RGB), not YCbCr.
    """

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    tables: bytes
    rgb: bool

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_height)


def fast_levels(path: Path | str, reader: SlideReader) -> tuple[list[JpegLevel | None], str]:
    """Map OpenSlide's pyramid levels to JPEG-tiled TIFF pages of the same size.

    Args:
        path: the slide file.
        reader: the slide open with OpenSlide (its vendor and level sizes decide).

    Returns:
        One :class:`JpegLevel` or None (read by OpenSlide) per level, and a sentence naming
        the levels left to OpenSlide and why ("" when every level is fast).
    """
    import tifffile  # only slides that may be TIFF pay for the import

    vendor = reader.vendor
    if vendor not in TIFF_VENDORS:
        return [None] * reader.level_count, (
            f"vendor {vendor!r} is not one of {', '.join(TIFF_VENDORS)}: OpenSlide assembles "
            "its tiles"
        )
    levels: list[JpegLevel | None] = []
    reasons: list[str] = []
    with tifffile.TiffFile(path) as tif:
        pages = [p for p in tif.pages if p.is_tiled]  # type: ignore[union-attr]
        for level, (w, h) in enumerate(reader.level_dimensions):
            same = [p for p in pages if (p.imagewidth, p.imagelength) == (w, h)]
            why = _unsupported(same)
            if why:
                levels.append(None)
                reasons.append(f"level {level}: {why}")
                continue
            page = same[0]
            tables = page.jpegtables or b""
            if tables and not (tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")):
                levels.append(None)
                reasons.append(f"level {level}: JPEGTables are not a tables-only stream")
                continue
            levels.append(
                JpegLevel(
                    width=w,
                    height=h,
                    tile_width=int(page.tilewidth),
                    tile_height=int(page.tilelength),
                    offsets=np.asarray(page.dataoffsets, np.int64),
                    bytecounts=np.asarray(page.databytecounts, np.int64),
                    tables=tables[:-2],
                    rgb=int(page.photometric) == _PHOTOMETRIC_RGB,
                )
            )
    return levels, "; ".join(reasons)


def _unsupported(pages: list) -> str:
    """Why these candidate pages of one level cannot be read directly ("" when they can)."""
    if len(pages) != 1:
        return f"{len(pages)} tiled TIFF pages have its size (expected exactly one)"
    page = pages[0]
    if int(page.compression) != _JPEG:
        return f"compression {page.compression.name} (only JPEG is read directly)"
    if int(page.photometric) not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
        return f"photometric {page.photometric.name}"
    if page.samplesperpixel != 3 or page.bitspersample != 8 or int(page.planarconfig) != 1:
        return "not 8-bit interleaved RGB/YCbCr"
    if page.imagedepth > 1:
        return "a volumetric (tiled in depth) page"
    return ""


class TiffJpegReader(SlideReader):
    """:class:`~histcode.slidereader.SlideReader` that decodes JPEG-tiled TIFF levels itself.

    Metadata, µm/px, thumbnails and every level that is not a JPEG-tiled page come from
    OpenSlide (the parent class); :meth:`read_region` of a JPEG-tiled level returns the same
    pixels as OpenSlide's within JPEG decoder rounding, several times faster.

    Args:
        path: the slide file.
        mpp_override: µm/px of level 0 to use instead of the metadata.
        mpp_fallback: µm/px of level 0 to use when the metadata has none.
        cache_bytes: decoded stored tiles kept in memory (LRU), per reader.

    Raises:
        SlideError: OpenSlide cannot open it, or no level is a JPEG-tiled page (the message
            says why; :func:`~histcode.slide.open_slide` then falls back to OpenSlide).
    """

    def __init__(
        self,
        path: Path | str,
        mpp_override: float | None = None,
        mpp_fallback: float | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        super().__init__(path, mpp_override=mpp_override, mpp_fallback=mpp_fallback)
        try:
            self._levels, self.fallback_reason = fast_levels(self.path, self)
        except Exception as err:  # tifffile refuses the file: OpenSlide's reading stays
            self._slide.close()
            raise SlideError(f"{self.path}: tifffile cannot parse it ({err})") from None
        if not any(self._levels):
            self._slide.close()
            raise SlideError(f"{self.path}: no level is read directly ({self.fallback_reason})")
        self.cache_bytes = cache_bytes
        # per level, what read_region_scaled needs (OpenSlide asks its C library for each)
        self._geometry = [
            None if lv is None else (lv, float(ds), lv.tile_width, lv.tile_height, *lv_size)
            for lv, ds, lv_size in zip(
                self._levels, self.level_downsamples, self.level_dimensions, strict=True
            )
        ]
        self._background = np.asarray(self.background, np.uint8)
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()  # thumbnail() reads bands on threads
        self._fd: int | None = None
        self._fd_pid = -1
        self.decoded_tiles = 0  # stored tiles decoded (for benchmarks and tests)

    def is_fast(self, level: int) -> bool:
        """Whether ``level`` is decoded here rather than by OpenSlide."""
        return self._levels[level] is not None

    # -- pixels ---------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read a region as RGB (see :meth:`SlideReader.read_region`)."""
        out = self.read_region_scaled(location, level, size, 1)
        if out is None:
            return super().read_region(location, level, size)
        return out

    def read_region_scaled(
        self, location: tuple[int, int], level: int, size: tuple[int, int], scale: int
    ) -> np.ndarray | None:
        """Read a region downsampled ``scale`` times by decoding in the DCT domain.

        A window that is exactly one stored tile (a grid of the stored tile size, aligned to
        them, e.g. 256 px tiles at a level stored in 256 px tiles) is decoded straight into
        the returned array: no decoded-tile cache, no copy. Any other window is copied out of
        the decoded stored tiles it covers (each decoded once while it stays in the LRU).

        Args:
            location: (x, y) of the top-left corner in level-0 pixels.
            level: pyramid level to read from.
            size: (width, height) in pixels of that level; the result is ``scale`` times
                smaller.
            scale: 1, 2, 4 or 8.

        Returns:
            (height // scale, width // scale, 3) uint8, or None when this region cannot be
            read that way (a level OpenSlide reads, a corner between pixels of the level, or
            a corner, size or stored tile not divisible by ``scale``): read it with
            :meth:`read_region` and resize.
        """
        geometry = self._geometry[level]
        if geometry is None or scale not in _SCALES:
            return None
        lv, ds, tw, th, lw, lh = geometry
        x0, y0 = location
        if ds != 1.0 or type(x0) is not int or type(y0) is not int:
            fx, fy = location[0] / ds, location[1] / ds
            x0, y0 = round(fx), round(fy)
            if abs(fx - x0) > 1e-6 or abs(fy - y0) > 1e-6:
                return None  # OpenSlide would interpolate between pixels here
        w, h = int(size[0]), int(size[1])
        if scale > 1 and (x0 | y0 | w | h | tw | th) % scale:
            return None  # (x | y) % s == 0 iff both are multiples of the power of two s
        out = np.empty((h // scale, w // scale, 3), np.uint8)
        inside = x0 >= 0 and y0 >= 0 and x0 + w <= lw and y0 + h <= lh
        if inside and w == tw and h == th and not x0 % tw and not y0 % th:
            # exactly one stored tile: decode it into the output
            self._tile_into(out, lv, level, (y0 // th) * lv.tiles_across + x0 // tw, scale)
            return out
        if not inside:  # only then is there glass to paint (a tuple fill costs 0.5 ms)
            out[...] = self._background
        # the part of the window inside the level (OpenSlide leaves the rest transparent)
        xa, ya = max(x0, 0), max(y0, 0)
        x1, y1 = min(x0 + w, lw), min(y0 + h, lh)
        if x1 <= xa or y1 <= ya:
            return out
        across = lv.tiles_across
        tx0, tx1 = xa // tw, (x1 - 1) // tw + 1
        for ty in range(ya // th, (y1 - 1) // th + 1):
            # rows of the window and of the stored tile that overlap, at the output scale
            top = ty * th
            ay, by = max(ya, top), min(y1, top + th)
            oy, ry = (
                slice((ay - y0) // scale, (by - y0) // scale),
                slice((ay - top) // scale, (by - top) // scale),
            )
            for tx in range(tx0, tx1):
                tile = self._tile(lv, level, ty * across + tx, scale)
                left = tx * tw
                ax, bx = max(xa, left), min(x1, left + tw)
                dst = out[oy, (ax - x0) // scale : (bx - x0) // scale]
                if tile is None:  # a missing stored tile: glass, as OpenSlide leaves it
                    dst[...] = self._background
                else:
                    dst[...] = tile[ry, (ax - left) // scale : (bx - left) // scale]
        return out

    def _tile(self, lv: JpegLevel, level: int, index: int, scale: int) -> np.ndarray | None:
        """A stored tile decoded at 1/``scale`` (from the LRU when there); None if missing."""
        key = (level, index, scale)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        count = int(lv.bytecounts[index])
        if count == 0:
            return None
        data = os.pread(self._file(), count, int(lv.offsets[index]))
        tile = self._decode(lv, data, scale, level, index)
        with self._lock:
            self.decoded_tiles += 1
            self._cache[key] = tile
            self._cached += tile.nbytes
            while self._cached > self.cache_bytes and len(self._cache) > 1:
                self._cached -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def _tile_into(
        self, out: np.ndarray, lv: JpegLevel, level: int, index: int, scale: int
    ) -> None:
        """Stored tile ``index`` decoded at 1/``scale`` into ``out`` (its exact shape).

        Taken from the LRU when another window decoded it already; otherwise decoded into
        ``out`` and not cached (``out`` is the caller's, who may change it).
        """
        with self._lock:
            tile = self._cache.get((level, index, scale))
        if tile is not None:
            out[...] = tile
            return
        count = int(lv.bytecounts[index])
        if count == 0:
            out[...] = self._background
            return
        data = os.pread(self._file(), count, int(lv.offsets[index]))
        self._decode_stream(jpeg_stream(data, lv.tables, lv.rgb), lv, scale, level, index, out)
        with self._lock:
            self.decoded_tiles += 1

    def _decode(self, lv: JpegLevel, data: bytes, scale: int, level: int, index: int) -> np.ndarray:
        return self._decode_stream(jpeg_stream(data, lv.tables, lv.rgb), lv, scale, level, index)

    def _decode_stream(
        self,
        stream: bytes,
        lv: JpegLevel,
        scale: int,
        level: int,
        index: int,
        buffer: np.ndarray | None = None,
    ) -> np.ndarray:
        """Decode one stored tile's complete stream at 1/``scale``, into ``buffer`` if given
        (C-contiguous, (tile height / scale, tile width / scale, 3) uint8)."""
        import simplejpeg  # imported at first decode: keeps `histcode tile --help` light

        th, tw = -(-lv.tile_height // scale), -(-lv.tile_width // scale)
        try:
            tile = simplejpeg.decode_jpeg(stream, "RGB", min_height=th, min_width=tw, buffer=buffer)
        except ValueError as err:
            raise SlideError(
                f"{self.path}: stored tile {index} of level {level} cannot be decoded ({err}); "
                "the file is damaged. Re-export or re-copy it."
            ) from None
        if tile.shape[:2] != (th, tw):
            raise SlideError(
                f"{self.path}: stored tile {index} of level {level} decodes to "
                f"{tile.shape[1]}×{tile.shape[0]} px, expected {tw}×{th} (the TIFF tile size "
                f"÷ {scale}); the file is inconsistent. Read it with reader='openslide'."
            )
        return tile

    def stored_stream(self, level: int, index: int) -> bytes:
        """The complete JPEG stream of stored tile ``index`` of a directly read level (tables
        merged, colour space marked), e.g. for :func:`decode_on_device`."""
        lv = self._levels[level]
        if lv is None:
            raise ValueError(f"level {level} of {self.path} is read by OpenSlide, not here")
        count, offset = int(lv.bytecounts[index]), int(lv.offsets[index])
        return jpeg_stream(os.pread(self._file(), count, offset), lv.tables, lv.rgb)

    def decode_stored(self, level: int, index: int) -> np.ndarray:
        """Stored tile ``index`` of a directly read level decoded at full scale here, on the
        CPU, as :meth:`read_region` decodes it (libjpeg-turbo): the reference
        :func:`check_device_decode` holds the device's decoding to.

        Raises:
            ValueError: the level is read by OpenSlide.
            SlideError: the stored tile cannot be decoded (the file is damaged).
        """
        return self._decode_stream(
            self.stored_stream(level, index), self._levels[level], 1, level, index
        )

    def window_parts(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> list[tuple[int, int, int, int, int, int, int]] | None:
        """Which stored tiles make up a window, and where each goes (for decoding elsewhere).

        Args:
            location: (x, y) of the top-left corner in level-0 pixels.
            level: pyramid level.
            size: (width, height) in pixels of that level.

        Returns:
            One ``(index, dy, dx, sy, sx, h, w)`` per stored tile the window covers, row-major:
            the window's ``[dy:dy+h, dx:dx+w]`` is the decoded stored tile's
            ``[sy:sy+h, sx:sx+w]``, all at full scale. None when the window is not all
            stored pixels of a directly read level (a level OpenSlide reads, a corner between
            pixels, a window over the level's edge, a missing stored tile): read it with
            :meth:`read_region`.
        """
        geometry = self._geometry[level]
        if geometry is None:
            return None
        lv, ds, tw, th, lw, lh = geometry
        fx, fy = location[0] / ds, location[1] / ds
        x0, y0 = round(fx), round(fy)
        w, h = int(size[0]), int(size[1])
        if abs(fx - x0) > 1e-6 or abs(fy - y0) > 1e-6:
            return None
        if x0 < 0 or y0 < 0 or x0 + w > lw or y0 + h > lh or w < 1 or h < 1:
            return None
        parts = []
        for ty in range(y0 // th, (y0 + h - 1) // th + 1):
            ay, by = max(y0, ty * th), min(y0 + h, (ty + 1) * th)
            for tx in range(x0 // tw, (x0 + w - 1) // tw + 1):
                index = ty * lv.tiles_across + tx
                if not lv.bytecounts[index]:
                    return None
                ax, bx = max(x0, tx * tw), min(x0 + w, (tx + 1) * tw)
                parts.append(
                    (index, ay - y0, ax - x0, ay - ty * th, ax - tx * tw, by - ay, bx - ax)
                )
        return parts

    def _file(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._cache.clear()
        self._cached = 0
        super().close()

    def __repr__(self) -> str:
        fast = [i for i, lv in enumerate(self._levels) if lv is not None]
        return f"{super().__repr__()[:-1]}, JPEG tiles decoded directly on levels {fast})"


def jpeg_stream(data: bytes, tables: bytes, rgb: bool) -> bytes:
    """A complete JPEG stream from a stored TIFF tile.

    Args:
        data: the tile's bytes (SOI … EOI; abbreviated when the page has JPEGTables).
        tables: the page's JPEGTables without their EOI, or empty.
        rgb: the components are R, G, B: add an Adobe APP14 marker with transform 0 unless
            the stream already has an Adobe or JFIF marker.

    Returns:
        SOI, the tables, the marker and the tile's segments.
    """
    head = data[:2]
    body = data[2:]
    marker = b""
    if rgb and b"\xff\xee" not in data[:64] and b"\xff\xe0" not in data[:4]:
        marker = _ADOBE_RGB
    if tables:
        return tables + marker + body
    return head + marker + body


def device_decoder_available(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether stored JPEG tiles can be decoded on a CUDA device here, and if not why.

    The device path needs NVIDIA's nvImageCodec built for torch's CUDA major version (the
    ``gpu`` extra for CUDA 13, PyPI's default torch; ``gpu-cu12`` for CUDA 12; see
    :func:`nvimgcodec_hint`) and a CUDA device.

    Args:
        device: the device the tiles are wanted on (None: any CUDA device).

    Returns:
        (True, "") or (False, a sentence saying what is missing and what to install).
    """
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if device is not None and torch.device(device).type != "cuda":
        return False, (
            f"the encoder runs on {torch.device(device).type}, and nvImageCodec decodes on a "
            "CUDA device"
        )
    if not torch.cuda.is_available():
        return False, "no CUDA device (nvImageCodec decodes on an NVIDIA GPU)"
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False, f"nvImageCodec is not installed: {nvimgcodec_hint(torch.version.cuda)}"
    return True, ""


def nvimgcodec_hint(cuda: str | None) -> str:
    """What to install for nvImageCodec with a torch built for CUDA ``cuda`` (``"13.0"``,
    ``"12.8"``; None for a CPU build): the extra matching its major version."""
    major = (cuda or "").split(".")[0]
    if major == "12":
        return "pip install 'histcode[gpu-cu12]' (nvidia-nvimgcodec-cu12; torch is CUDA 12)"
    if major == "13":
        return "pip install 'histcode[gpu]' (nvidia-nvimgcodec-cu13; torch is CUDA 13)"
    return (
        f"this torch is built for CUDA {cuda or 'none (a CPU or ROCm build)'}, and nvImageCodec "
        "needs a torch built for CUDA 12 or 13: pip install 'histcode[gpu]' (CUDA 13) or "
        "'histcode[gpu-cu12]' (CUDA 12), one of the two, beside such a torch"
    )


class DeviceDecoder:
    """nvImageCodec's batched JPEG decoder on one device, made once and reused.

    Not measured on a GPU yet (the machines this was written on had none): its pixels are
    checked against libjpeg-turbo's by ``tests/histcode/test_tiffjpeg.py`` (marked ``gpu``),
    and the plumbing around it on CPU with a stand-in decoder. ``histcode embed`` checks it
    at run time too, on a few stored tiles of each slide (:func:`check_device_decode`).

    It asks nvImageCodec for libjpeg-turbo's "fancy" (triangular) chroma upsampling
    (``:fancy_upsampling=1``; decoders that do not know the option ignore it), which brings
    its pixels of 4:2:0 tiles closer to the CPU path's at colour edges.

    Args:
        device: the CUDA device the decoded tiles are wanted on.

    Raises:
        ImportError: nvImageCodec is not installed (check :func:`device_decoder_available`
            first).
    """

    def __init__(self, device: torch.device | str | int) -> None:
        import torch
        from nvidia import nvimgcodec

        if isinstance(device, int):
            device = f"cuda:{device}"
        self.device = torch.device(device)
        index = self.device.index if self.device.index is not None else 0
        if self.device.type == "cuda" and self.device.index is None:
            index = torch.cuda.current_device()
            self.device = torch.device("cuda", index)
        try:
            self._decoder = nvimgcodec.Decoder(device_id=index, options=":fancy_upsampling=1")
        except TypeError:  # a version without decoder options
            self._decoder = nvimgcodec.Decoder(device_id=index)

    def decode(self, streams: list) -> list[torch.Tensor | None]:
        """Decode complete JPEG streams (bytes or 1-D uint8 arrays, e.g. views of pinned
        memory) in one batch.

        Returns:
            One (H, W, 3) uint8 tensor on :attr:`device` per stream; None for a stream that
            cannot be decoded.
        """
        import torch

        cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device).cuda_stream if cuda else 0
        images = self._decoder.decode(streams, cuda_stream=stream)
        return [
            None if image is None else torch.as_tensor(image, device=self.device)
            for image in images
        ]


#: How far the device decoder's pixels may be from libjpeg-turbo's (the CPU path's decoder) on
#: the stored tiles :func:`check_device_decode` samples, per stored tile, 0–255 scale: the
#: worst tile's mean |Δ| over its pixels and channels, and the largest |Δ| of any pixel.
#:
#: JPEG leaves the IDCT's rounding and the chroma upsampling to the decoder, so two correct
#: decoders differ a little. Published bounds for nvJPEG against libjpeg-turbo: torchvision's
#: test of ``decode_jpeg(device="cuda")`` asserts mean |Δ| < 2; DALI's tests of its nvJPEG
#: decoder against its libjpeg-turbo one allow mean |Δ| ≤ 4 by default and ≤ 1 with fancy
#: upsampling (which :class:`DeviceDecoder` asks for; a hardware decoder may not honour it),
#: and name the chroma upsampling as the main difference. Measured here with libjpeg-turbo
#: itself as "another decoder" (its fast integer IDCT and plain upsampling against the
#: default accurate IDCT and fancy upsampling; 40 stored tiles each of CMU-1, RGB 4:4:4, and
#: of the synthetic 40x SVS and generic TIFF, YCbCr 4:2:0): per tile mean |Δ| ≤ 0.96 on
#: CMU-1 and ≤ 1.81 on the (noisy) synthetic tiles; max |Δ| ≤ 2 on CMU-1 and ≤ 27 at the
#: synthetic tiles' colour edges, where the chroma upsampling differs. The bounds leave
#: 1.5× (mean) and 2.4× (max) room above that. What they catch, measured the same way: the
#: RGB components of Aperio's tiles taken for YCbCr (a lost Adobe marker: mean |Δ| 45–63,
#: max 254), every value 20 too high (mean 8.5–20, clipped on glass), channels swapped on
#: stained tissue (mean up to 24–30, max 81–206; on glass a swap changes nothing), and a
#: wrongly decoded block (|Δ| of ~100 where it is). A slide that fails is decoded on the
#: CPU, so a false alarm costs speed, never features.
DEVICE_MEAN_TOLERANCE = 3.0
DEVICE_MAX_TOLERANCE = 64


@dataclass(frozen=True)
class DecodeCheck:
    """The device decoder's pixels against libjpeg-turbo's on a few stored tiles.

    Attributes:
        tiles: stored tiles compared.
        mean_abs: the worst tile's mean |Δ| (0–255).
        max_abs: the largest |Δ| of any pixel and channel.
        problem: why the tiles could not be compared ("" when they were): the device could
            not decode one, or decoded it to another shape.
    """

    tiles: int
    mean_abs: float = 0.0
    max_abs: int = 0
    problem: str = ""

    @property
    def ok(self) -> bool:
        """Whether the device's pixels are libjpeg-turbo's within decoder rounding."""
        return (
            not self.problem
            and self.mean_abs <= DEVICE_MEAN_TOLERANCE
            and self.max_abs <= DEVICE_MAX_TOLERANCE
        )

    def describe(self) -> str:
        """The measured difference, or the problem, in words."""
        if self.problem:
            return self.problem
        return (
            f"mean |Δ| {self.mean_abs:.2f}, max |Δ| {self.max_abs} of 255 against "
            f"libjpeg-turbo over {self.tiles} stored tiles (allowed: mean "
            f"{DEVICE_MEAN_TOLERANCE:g}, max {DEVICE_MAX_TOLERANCE})"
        )


def check_device_decode(
    decoder: DeviceDecoder, streams: Sequence[bytes], reference: Sequence[np.ndarray]
) -> DecodeCheck:
    """Decode a few stored tiles on the device and compare them with the CPU's pixels.

    Args:
        decoder: the device decoder.
        streams: complete JPEG streams (:meth:`TiffJpegReader.stored_stream`).
        reference: the same tiles decoded on the CPU (:meth:`TiffJpegReader.decode_stored`).

    Returns:
        The worst tile's mean |Δ|, the largest |Δ|, or the problem; :attr:`DecodeCheck.ok`
        says whether it is within :data:`DEVICE_MEAN_TOLERANCE` and
        :data:`DEVICE_MAX_TOLERANCE`.
    """
    n = len(streams)
    # as the batches hand them over: 1-D uint8 arrays
    images = decoder.decode([np.frombuffer(s, np.uint8) for s in streams])
    worst_mean, worst_max = 0.0, 0
    for k, (image, want) in enumerate(zip(images, reference, strict=True)):
        if image is None:
            return DecodeCheck(
                n, problem=f"nvImageCodec cannot decode sampled stored tile {k + 1} of {n}, "
                "which libjpeg-turbo decodes"
            )  # fmt: skip
        got = image.cpu().numpy() if hasattr(image, "cpu") else np.asarray(image)
        if got.shape != want.shape:
            return DecodeCheck(
                n, problem=f"nvImageCodec decodes sampled stored tile {k + 1} of {n} to shape "
                f"{tuple(got.shape)}, libjpeg-turbo to {tuple(want.shape)}"
            )  # fmt: skip
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        worst_mean = max(worst_mean, float(diff.mean()))
        worst_max = max(worst_max, int(diff.max()))
    return DecodeCheck(n, worst_mean, worst_max)


def decode_on_device(streams: list[bytes], device: int = 0) -> list:
    """Decode complete JPEG streams on a CUDA device with nvImageCodec (batched).

    Args:
        streams: complete JPEG streams (:meth:`TiffJpegReader.stored_stream`).
        device: CUDA device index.

    Returns:
        One (H, W, 3) uint8 CUDA tensor per stream.

    Raises:
        RuntimeError: the device path is not available (the message says why and what to
            install), or a stream cannot be decoded.
    """
    ok, why = device_decoder_available()
    if not ok:
        raise RuntimeError(f"decoding on the device is not available: {why}")
    images = DeviceDecoder(device).decode(streams)
    if any(image is None for image in images):
        raise RuntimeError("nvImageCodec could not decode some of the streams")
    return images
