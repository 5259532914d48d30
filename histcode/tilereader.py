"""Reading tile pixels from the slides through a tile store (no tile images on disk).

``TileIndex`` flattens the ``ok`` slides of a tile store into one index of (slide, tile).
``TileDataset`` is a map-style torch ``Dataset`` over it returning uint8 tensors, suitable
for a shuffling or distributed sampler (pretraining shuffles across all slides) and for
sequential per-slide reading (embedding). Each worker process keeps an LRU cache of open
slide handles, so a shuffled stream does not reopen a slide for every tile.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

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
        a = tiles.attrs
        size = max(1, round(a["tile_size_level0"] / a.get("level_downsample", 1.0)))
        override = a["mpp_level0"] if a.get("mpp_source") == "override" else None
        return cls(tiles.slide_id, a["path"], int(a["level"]), size, override)


class SlideCache:
    """An LRU cache of open slides (one per process; OpenSlide handles are not shared).

    Args:
        capacity: most slides kept open at once.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._open: OrderedDict[str, SlideReader] = OrderedDict()
        self._pid = os.getpid()

    def get(self, geometry: SlideGeometry) -> SlideReader:
        if os.getpid() != self._pid:  # forked into a worker: handles are not ours
            self._open.clear()
            self._pid = os.getpid()
        reader = self._open.get(geometry.path)
        if reader is None:
            reader = open_slide(geometry.path, mpp_override=geometry.mpp_override)
            self._open[geometry.path] = reader
            while len(self._open) > self.capacity:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(geometry.path)
        return reader

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def read_tile(
    reader: SlideReader, geometry: SlideGeometry, xy: Sequence[int], tile_size: int
) -> np.ndarray:
    """Read one tile at the store's resolution.

    Args:
        reader: the open slide.
        geometry: where and at which level to read.
        xy: level-0 top-left corner.
        tile_size: output side in pixels (the store's ``tile_size``).

    Returns:
        (tile_size, tile_size, 3) uint8.
    """
    s = geometry.size_at_level
    region = reader.read_region((int(xy[0]), int(xy[1])), geometry.level, (s, s))
    if s != tile_size:
        region = np.array(  # a writable copy: torch refuses read-only buffers
            Image.fromarray(region).resize((tile_size, tile_size), Image.Resampling.BILINEAR)
        )
    return region


class TileIndex:
    """All tiles of the ``ok`` slides of a tile store, as one flat index.

    Args:
        store: the tile store (path or ``TileStore``).
        slide_ids: restrict to these slides (default: every ``ok`` slide).

    Attributes:
        tile_size: tile side at the store's µm/px.
        mpp: the store's µm/px.
        slides: geometry per slide, in index order.
        coords: (N, 2) int64 level-0 corners of all tiles.
        slide_of: (N,) int32 index into ``slides`` of each tile.
        offsets: (S + 1,) start of each slide's tiles in the flat index.
    """

    def __init__(self, store: TileStore | Path | str, slide_ids: Sequence[str] | None = None):
        self.store = store if isinstance(store, TileStore) else TileStore(store)
        attrs = self.store.attrs
        self.tile_size = int(attrs["tile_size"])
        self.mpp = float(attrs["mpp"])
        wanted = set(slide_ids) if slide_ids is not None else None
        slides, coords = [], []
        for tiles in self.store.iter_slides(status="ok"):
            if wanted is None or tiles.slide_id in wanted:
                slides.append(SlideGeometry.from_tiles(tiles))
                coords.append(tiles.coords)
        if wanted is not None and (missing := wanted - {g.slide_id for g in slides}):
            raise KeyError(
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

    Args:
        index: the tiles to serve.
        cache_size: open slide handles kept per worker process.

    Returns (per item):
        (3, tile_size, tile_size) uint8 tensor, a view of (H, W, 3) pixels; batch with
        :func:`collate_tiles` (channels-last, no transpose).
    """

    def __init__(self, index: TileIndex, cache_size: int = 16) -> None:
        self.index = index
        self.cache_size = cache_size
        self._cache: SlideCache | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._cache is None:
            self._cache = SlideCache(self.cache_size)
        geometry = self.index.slides[self.index.slide_of[i]]
        reader = self._cache.get(geometry)
        tile = read_tile(reader, geometry, self.index.coords[i], self.index.tile_size)
        return torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # open handles don't travel to worker processes
        return state
