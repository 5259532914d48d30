"""Reading tile pixels from the slides through a tile store (no tile images on disk).

``TileIndex`` flattens the ``ok`` slides of a tile store into one index of (slide, tile).
``TileDataset`` is a map-style torch ``Dataset`` over it returning uint8 tensors, suitable
for a shuffling or distributed sampler (pretraining shuffles across all slides) and for
sequential per-slide reading (embedding). Each worker process keeps an LRU cache of open
slide handles, so a shuffled stream does not reopen a slide for every tile, and opens the
next slide of the index on a thread while it reads the last tiles of the current one.

A stain-normalised store (``histcode tile --stain_norm macenko``) holds each slide's stains
in its attrs; :class:`TileIndex` turns them into one precomputed normaliser per slide when
it is built, and :class:`TileDataset` maps every tile it returns with it
(:class:`histcode.stain.TileNormaliser`), so that pretraining and embedding both see the
normalised tiles. :func:`read_tile` itself returns the slide's pixels as scanned (heatmap
backgrounds show the slide as it is).

Slides are opened with :func:`~histcode.slide.open_slide`'s ``auto`` reader: JPEG-tiled
Aperio SVS and generic TIFF levels are decoded directly (:mod:`histcode.tiffjpeg`), and a
tile read from a level ``f`` = 2, 4 or 8 times finer than the store's µm/px is decoded at
1/f scale in the DCT domain instead of decoded in full and resized. For decoding on a GPU
(``histcode embed --decode``), :func:`read_tile_streams` returns a tile's stored JPEG tiles
instead of its pixels, and :class:`StreamBatch` carries a batch's, decodes them on the
device and pastes the tiles into the batch there.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from histcode import stain
from histcode.errors import NotFoundError
from histcode.slide import SlideReader, open_slide
from histcode.tilestore import SlideTiles, TileStore


@dataclass(frozen=True)
class SlideGeometry:
    """How to read one slide's tiles.

    Attributes:
        slide_id: the slide's id.
        path: the slide file.
        level: pyramid level to read.
        size_at_level: side of a tile in pixels of that level (before resizing).
        mpp_override: level-0 µm/px used when the tiles were made from an override.
    """

    slide_id: str
    path: str
    level: int
    size_at_level: int
    mpp_override: float | None = None

    @classmethod
    def from_tiles(cls, tiles: SlideTiles) -> SlideGeometry:
        return cls.from_attrs(tiles.slide_id, tiles.attrs)

    @classmethod
    def from_attrs(cls, slide_id: str, a: dict[str, Any]) -> SlideGeometry:
        """From a slide's tile-store attrs (``path``, ``level``, ``tile_size_level0``, …)."""
        size = max(1, round(a["tile_size_level0"] / a.get("level_downsample", 1.0)))
        override = a["mpp_level0"] if a.get("mpp_source") == "override" else None
        return cls(slide_id, a["path"], int(a["level"]), size, override)


def slide_normaliser(
    tiles: SlideTiles, stain_norm: str, target: dict[str, Any] | None, store: Path | str
) -> stain.TileNormaliser | None:
    """What normalises a slide's tiles (its OD map, precomputed), or None (no normalisation).

    Args:
        tiles: the slide's entry in the tile store.
        stain_norm: the store's ``stain_norm`` (``none`` | ``macenko``).
        target: the store's ``stain_target`` (the reference stains); None: Macenko's.
        store: the store, for messages.

    Raises:
        ValueError: a method this histcode cannot apply, or a slide whose attrs disagree with
            the store's (raw and normalised slides mixed, or its stains missing); the message
            names the slide and the fix.
    """
    if stain_norm not in stain.STAIN_NORMS:
        raise ValueError(
            f"{store} was tiled with stain_norm {stain_norm!r}, which this histcode cannot "
            f"apply (it knows {', '.join(stain.STAIN_NORMS)}): upgrade histcode, or retile "
            "the slides into a new --out"
        )
    own = tiles.attrs.get("stain_norm") or "none"
    record = tiles.attrs.get("stain")
    if own != stain_norm or (stain_norm != "none" and not record):
        said = f"stain_norm {own!r}" + ("" if record or own == "none" else " without its stains")
        raise ValueError(
            f"slide {tiles.slide_id} of {store} has {said} but the store is {stain_norm!r}: "
            "normalised and raw tiles would be mixed. Retile every slide with `histcode tile "
            f"--stain_norm {stain_norm} --overwrite true`, or into a new --out."
        )
    if stain_norm == "none":
        return None
    try:
        source = stain.StainParams.from_dict(record)
        reference = stain.REFERENCE if target is None else stain.StainParams.from_dict(target)
    except ValueError as err:
        raise ValueError(
            f"slide {tiles.slide_id} of {store}: unusable stain attrs ({err}); retile it with "
            "`histcode tile --overwrite true`"
        ) from None
    return stain.TileNormaliser(stain.od_map(source, reference))


class SlideCache:
    """An LRU cache of open slides (one per process; OpenSlide handles are not shared).

    Args:
        capacity: most slides kept open at once.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._open: OrderedDict[str, SlideReader] = OrderedDict()
        self._pending: dict[str, threading.Thread] = {}
        self._opened: dict[str, SlideReader | BaseException] = {}
        self._pid = os.getpid()

    def _own(self) -> None:
        if os.getpid() != self._pid:  # forked into a worker: handles are not ours
            self._open.clear()
            self._pending.clear()
            self._opened.clear()
            self._pid = os.getpid()

    def get(self, geometry: SlideGeometry) -> SlideReader:
        self._own()
        reader = self._open.get(geometry.path)
        if reader is None:
            pending = self._pending.pop(geometry.path, None)
            if pending is not None:
                pending.join()
                got = self._opened.pop(geometry.path)
                if isinstance(got, BaseException):
                    raise got
                reader = got
            else:
                reader = open_slide(geometry.path, mpp_override=geometry.mpp_override)
            self._open[geometry.path] = reader
            while len(self._open) > self.capacity:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(geometry.path)
        return reader

    def prefetch(self, geometry: SlideGeometry) -> None:
        """Open a slide on a thread, so that the first :meth:`get` of it does not wait.

        Opening a slide (OpenSlide's and tifffile's parsing of its directories) costs tens of
        milliseconds to seconds on a network filesystem; done while the current slide's last
        tiles are read, it leaves no stall between slides. An error surfaces at :meth:`get`.
        """
        self._own()
        if geometry.path in self._open or geometry.path in self._pending:
            return

        def work() -> None:
            try:
                self._opened[geometry.path] = open_slide(
                    geometry.path, mpp_override=geometry.mpp_override
                )
            except BaseException as err:  # handed to get(), which raises it
                self._opened[geometry.path] = err

        thread = threading.Thread(target=work, name="histcode-prefetch-slide", daemon=True)
        self._pending[geometry.path] = thread
        thread.start()

    def is_open(self, path: str) -> bool:
        """Whether ``path`` is open or being opened (prefetched)."""
        return path in self._open or path in self._pending

    def close(self) -> None:
        for path, thread in list(self._pending.items()):
            thread.join()
            got = self._opened.pop(path, None)
            if isinstance(got, SlideReader):
                got.close()
        self._pending.clear()
        while self._open:
            self._open.popitem()[1].close()


def read_tile(
    reader: SlideReader,
    geometry: SlideGeometry,
    xy: Sequence[int],
    tile_size: int,
    scaled_decode: bool = True,
) -> np.ndarray:
    """Read one tile at the store's resolution.

    A level read 2, 4 or 8 times finer than the tiles is brought to the tile size by a box
    average (``Image.reduce``) or, where the reader can (:mod:`histcode.tiffjpeg`), by
    decoding the JPEG at that scale, which differs from the box average by the scaled IDCT's
    rounding (measured: mean |Δ| 0.12–0.2, 99.9th percentile ≤ 9, max ≤ 19 of 255; see
    ``tests/histcode/test_tiffjpeg.py``). Other ratios are resized bilinearly.

    Args:
        reader: the open slide.
        geometry: where and at which level to read.
        xy: level-0 top-left corner.
        tile_size: output side in pixels (the store's ``tile_size``).
        scaled_decode: allow the scaled decode (False: full decode and box average).

    Returns:
        (tile_size, tile_size, 3) uint8.
    """
    s = geometry.size_at_level
    location = (int(xy[0]), int(xy[1]))
    factor = s // tile_size
    whole = factor * tile_size == s and factor in (2, 4, 8)
    if whole and scaled_decode and hasattr(reader, "read_region_scaled"):
        # decode at 1/factor in the DCT domain: a fraction of the work of a full decode
        tile = reader.read_region_scaled(location, geometry.level, (s, s), factor)
        if tile is not None:
            return tile
    region = reader.read_region(location, geometry.level, (s, s))
    if s != tile_size:
        image = Image.fromarray(region)
        # whole factors: a box average, which the scaled decode above approximates
        image = (
            image.reduce(factor)
            if whole
            else image.resize((tile_size, tile_size), Image.Resampling.BILINEAR)
        )
        region = np.array(image)  # a writable copy: torch refuses read-only buffers
    return region


@dataclass(frozen=True)
class TileStreams:
    """One tile as the stored JPEG tiles it covers, to be decoded elsewhere (on a GPU).

    Attributes:
        path: the slide file (with ``level``, what makes a stored tile's index unique).
        level: the pyramid level.
        size: side of the window at that level, in pixels.
        factor: the window is brought to the tile size by a ``factor`` × ``factor`` box
            average (1, 2, 4 or 8).
        parts: per stored tile, ``(index, dy, dx, sy, sx, h, w)``
            (:meth:`histcode.tiffjpeg.TiffJpegReader.window_parts`).
        streams: complete JPEG stream of each stored tile in ``parts``, by index.
    """

    path: str
    level: int
    size: int
    factor: int
    parts: tuple[tuple[int, int, int, int, int, int, int], ...]
    streams: dict[int, bytes]


def read_tile_streams(
    reader: SlideReader, geometry: SlideGeometry, xy: Sequence[int], tile_size: int
) -> TileStreams | None:
    """The stored JPEG tiles of one tile, for decoding on the device (see :class:`StreamBatch`).

    Decoded and pasted, then box-averaged by ``factor``, they give the pixels of
    ``read_tile(..., scaled_decode=False)`` (within the two decoders' rounding).

    Returns:
        The tile's streams, or None when the tile must be read on the CPU: a slide OpenSlide
        reads, a level read at a ratio other than 1, 2, 4 or 8, a window over the level's edge
        or a missing stored tile.
    """
    factor = _device_factor(reader, geometry, tile_size)
    if factor is None:
        return None
    s = geometry.size_at_level
    parts = reader.window_parts((int(xy[0]), int(xy[1])), geometry.level, (s, s))  # type: ignore[attr-defined]
    if parts is None:
        return None
    streams = {p[0]: reader.stored_stream(geometry.level, p[0]) for p in parts}  # type: ignore[attr-defined]
    return TileStreams(geometry.path, geometry.level, s, factor, tuple(parts), streams)


#: Ratios of a level's pixels to the tiles' that the device path box-averages.
_FACTORS = (1, 2, 4, 8)


def _device_factor(reader: SlideReader, geometry: SlideGeometry, tile_size: int) -> int | None:
    """The box-average factor of a slide whose tiles can be decoded on the device, or None."""
    s = geometry.size_at_level
    factor = s // tile_size
    if not hasattr(reader, "window_parts") or factor * tile_size != s or factor not in _FACTORS:
        return None
    return factor


def sample_stored_tiles(
    reader: SlideReader,
    geometry: SlideGeometry,
    coords: np.ndarray,
    tile_size: int,
    n: int = 4,
) -> list[int]:
    """A few stored JPEG tiles that the device path would decode for one slide, to check the
    device's decoder against the CPU's on them
    (:func:`histcode.tiffjpeg.check_device_decode`).

    The stored tile under the most of each of ``n`` tiles spread evenly over the slide's tile
    list (tissue, since tiles are), then of tiles between them where some lie over the
    level's edge or a missing stored tile.

    Args:
        reader: the open slide.
        geometry: where and at which level its tiles are read.
        coords: (T, 2) level-0 corners of its tiles.
        tile_size: the store's tile size.
        n: most stored tiles to return.

    Returns:
        Up to ``n`` distinct stored-tile indices of level ``geometry.level``; empty when none
        of the slide's tiles would be decoded on the device (:func:`read_tile_streams`).
    """
    if _device_factor(reader, geometry, tile_size) is None or not len(coords):
        return []
    s = geometry.size_at_level
    last = len(coords) - 1

    def spread(m: int) -> list[int]:
        return np.linspace(0, last, min(m, last + 1)).round().astype(int).tolist()

    picked: list[int] = []
    # n tiles evenly spread, then the others of an evenly spread 4n
    for k in dict.fromkeys(spread(n) + spread(4 * n)):
        x, y = (int(v) for v in coords[k])
        parts = reader.window_parts((x, y), geometry.level, (s, s))  # type: ignore[attr-defined]
        if not parts:
            continue
        index = max(parts, key=lambda p: p[5] * p[6])[0]
        if index not in picked:
            picked.append(index)
            if len(picked) == n:
                break
    return picked


def box_reduce(windows: torch.Tensor, factor: int) -> torch.Tensor:
    """Average ``factor`` × ``factor`` blocks of uint8 pixels, rounding halves up as PIL's
    ``Image.reduce`` does (so the result equals :func:`read_tile`'s box average).

    Args:
        windows: (N, H, W, 3) uint8, H and W multiples of ``factor``.

    Returns:
        (N, H // factor, W // factor, 3) uint8.
    """
    n, h, w, c = windows.shape
    blocks = windows.view(n, h // factor, factor, w // factor, factor, c)
    total = blocks.sum(dim=(2, 4), dtype=torch.int32)
    area = factor * factor
    return torch.div(total + area // 2, area, rounding_mode="floor").to(torch.uint8)


class StreamBatch:
    """The stored JPEG tiles of a batch's device-decoded tiles, each stored tile once.

    Made by the loader's workers (:meth:`from_tiles`); the streams travel in one uint8
    tensor, which the loader pins (:meth:`pin_memory`) when it pins the batch, so that the
    decoder reads them from pinned memory. In the main process :meth:`paste` decodes them
    on the device in one batch and writes the tiles into the batch already there.

    Attributes:
        positions: each tile's position in the batch.
        tiles: each tile's (size, factor, parts with indices into the unique streams).
        data: the unique streams, concatenated (uint8).
        offsets: (U + 1,) where each stream starts in ``data``.
    """

    def __init__(
        self,
        positions: list[int],
        tiles: list[tuple[int, int, list[tuple[int, ...]]]],
        data: torch.Tensor,
        offsets: list[int],
    ) -> None:
        self.positions = positions
        self.tiles = tiles
        self.data = data
        self.offsets = offsets

    @classmethod
    def from_tiles(cls, items: Sequence[tuple[int, TileStreams]]) -> StreamBatch:
        """From (position in the batch, streams) of the tiles to decode on the device."""
        unique: dict[tuple[str, int, int], int] = {}
        chunks: list[bytes] = []
        positions, tiles = [], []
        for position, t in items:
            parts = []
            for index, *where in t.parts:
                key = (t.path, t.level, index)
                u = unique.get(key)
                if u is None:
                    u = unique[key] = len(chunks)
                    chunks.append(t.streams[index])
                parts.append((u, *where))
            positions.append(position)
            tiles.append((t.size, t.factor, parts))
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).tolist()
        data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
        return cls(positions, tiles, data, offsets)

    def __len__(self) -> int:
        return len(self.positions)

    def pin_memory(self) -> StreamBatch:
        """Pin the streams (the loader calls this when it pins the batch)."""
        self.data = self.data.pin_memory()
        return self

    def paste(self, batch: torch.Tensor, decoder: Any) -> dict[int, str]:
        """Decode the streams on ``decoder``'s device and write the tiles into ``batch``.

        Args:
            batch: (B, 3, T, T) uint8 on the decoder's device (any memory format).
            decoder: a :class:`histcode.tiffjpeg.DeviceDecoder`.

        Returns:
            Position → error for tiles whose stored tiles could not be decoded (left as
            they were in ``batch``).
        """
        host = self.data.numpy()
        o = self.offsets
        images = decoder.decode([host[o[u] : o[u + 1]] for u in range(len(o) - 1)])
        errors: dict[int, str] = {}
        groups: dict[tuple[int, int], list[int]] = {}
        for j, (size, factor, parts) in enumerate(self.tiles):
            if any(images[p[0]] is None for p in parts):
                errors[self.positions[j]] = (
                    "a stored JPEG tile of it cannot be decoded on the device; the file is "
                    "damaged, or decode it on the CPU (--decode cpu) to see why"
                )
            else:
                groups.setdefault((size, factor), []).append(j)
        for (size, factor), members in groups.items():
            windows = torch.empty(
                (len(members), size, size, 3), dtype=torch.uint8, device=batch.device
            )
            for k, j in enumerate(members):
                for u, dy, dx, sy, sx, h, w in self.tiles[j][2]:
                    windows[k, dy : dy + h, dx : dx + w] = images[u][sy : sy + h, sx : sx + w]
            if factor > 1:
                windows = box_reduce(windows, factor)
            at = torch.tensor([self.positions[j] for j in members], device=batch.device)
            batch[at] = windows.permute(0, 3, 1, 2)
        return errors


class TileIndex:
    """All tiles of the ``ok`` slides of a tile store, as one flat index.

    Args:
        store: the tile store (path or ``TileStore``).
        slide_ids: restrict to these slides (default: every ``ok`` slide).

    Attributes:
        tile_size: tile side at the store's µm/px.
        mpp: the store's µm/px.
        stain_norm: the store's stain normalisation (``none`` | ``macenko``).
        slides: geometry per slide, in index order.
        normalisers: per slide, the stain normaliser applied to its tiles (None: none);
            made here, once per slide (:func:`slide_normaliser`).
        coords: (N, 2) int64 level-0 corners of all tiles.
        slide_of: (N,) int32 index into ``slides`` of each tile.
        offsets: (S + 1,) start of each slide's tiles in the flat index.
    """

    def __init__(self, store: TileStore | Path | str, slide_ids: Sequence[str] | None = None):
        self.store = store if isinstance(store, TileStore) else TileStore(store)
        attrs = self.store.attrs
        self.tile_size = int(attrs["tile_size"])
        self.mpp = float(attrs["mpp"])
        self.stain_norm = str(attrs.get("stain_norm") or "none")
        target = attrs.get("stain_target")
        wanted = set(slide_ids) if slide_ids is not None else None
        slides, coords = [], []
        self.normalisers: list[stain.TileNormaliser | None] = []
        for tiles in self.store.iter_slides(status="ok"):
            if wanted is None or tiles.slide_id in wanted:
                slides.append(SlideGeometry.from_tiles(tiles))
                coords.append(tiles.coords)
                self.normalisers.append(
                    slide_normaliser(tiles, self.stain_norm, target, self.store.path)
                )
        if wanted is not None and (missing := wanted - {g.slide_id for g in slides}):
            raise NotFoundError(
                f"{self.store.path} has no ok slide {sorted(missing)[:5]} (not tiled, empty "
                "or failed; see its summary.json)"
            )
        self.slides = slides
        counts = np.array([len(c) for c in coords], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.coords = np.concatenate(coords) if coords else np.zeros((0, 2), np.int64)
        self.slide_of = np.repeat(np.arange(len(slides), dtype=np.int32), counts)

    def __len__(self) -> int:
        return len(self.coords)

    def slide_range(self, i: int) -> range:
        """Flat indices of slide ``i``'s tiles."""
        return range(int(self.offsets[i]), int(self.offsets[i + 1]))


def collate_tiles(tiles: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack tiles from :class:`TileDataset` into a channels-last batch, without transposing.

    Each tile is a (3, H, W) view of (H, W, 3) pixels; stacking those views directly costs a
    strided uint8 copy (~8 ms a tile on CPU), while stacking the (H, W, 3) memory is a plain
    copy. The result is a (B, 3, H, W) view in channels-last memory format, which
    convolutions (CPU and CUDA) take as is.

    Args:
        tiles: (3, H, W) uint8 tensors.

    Returns:
        (B, 3, H, W) uint8, channels-last strides.
    """
    return torch.stack([t.permute(1, 2, 0) for t in tiles]).permute(0, 3, 1, 2)


class TileDataset(Dataset):
    """Tiles of a tile store as uint8 tensors, read straight from the slides.

    When the store is stain-normalised (its ``stain_norm`` attr), every tile is mapped with
    its slide's precomputed normaliser (:attr:`TileIndex.normalisers`) before it is returned.

    Args:
        index: the tiles to serve.
        cache_size: open slide handles kept per worker process.
        scaled_decode: decode JPEG tiles at reduced scale where the level is 2, 4 or 8
            times finer than the tiles (see :func:`read_tile`).
        prefetch: tiles before the end of a slide at which the next slide of the index is
            opened on a thread (0: never).

    Returns (per item):
        (3, tile_size, tile_size) uint8 tensor, a view of (H, W, 3) pixels; batch with
        :func:`collate_tiles` (channels-last, no transpose).
    """

    def __init__(
        self,
        index: TileIndex,
        cache_size: int = 16,
        scaled_decode: bool = True,
        prefetch: int = 64,
    ) -> None:
        self.index = index
        self.cache_size = cache_size
        self.scaled_decode = scaled_decode
        self.prefetch = prefetch
        self._cache: SlideCache | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        s, geometry, reader = self.reader_of(i)
        tile = read_tile(
            reader, geometry, self.index.coords[i], self.index.tile_size, self.scaled_decode
        )
        normaliser = self.index.normalisers[s]
        if normaliser is not None:
            tile = normaliser(tile)
        return torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)

    def reader_of(self, i: int) -> tuple[int, SlideGeometry, SlideReader]:
        """Tile ``i``'s slide (its position in the index), geometry and open reader; opens
        the next slide on a thread when ``i`` is within :attr:`prefetch` tiles of the end."""
        s = int(self.index.slide_of[i])
        cache = self.cache
        reader = cache.get(self.index.slides[s])
        if (
            self.prefetch
            and s + 1 < len(self.index.slides)
            and self.index.offsets[s + 1] - i <= self.prefetch
        ):
            cache.prefetch(self.index.slides[s + 1])
        return s, self.index.slides[s], reader

    @property
    def cache(self) -> SlideCache:
        """This process's open slides."""
        if self._cache is None:
            self._cache = SlideCache(self.cache_size)
        return self._cache

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # open handles don't travel to worker processes
        return state


def default_workers(cuda: bool) -> int:
    """Loader worker processes for the cores this process may use.

    On a GPU every core but one (the main process feeds the device) decodes, up to 16; on
    CPU the encoder needs cores too, so half of them decode (at least one).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    return max(1, min(16, cores - 1)) if cuda else max(1, cores // 2)
