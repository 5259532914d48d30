"""Tile reading throughput: histcode's reader against a naive per-tile ``read_region`` loop.

Three ways to get the same tiles of one synthetic slide (Aperio SVS, 256 px JPEG tiles,
quality 80) as uint8 arrays, measured in one run, in tiles per second:

- ``histcode``: :class:`~histcode.tilereader.TileDataset` over a
  :class:`~histcode.tilereader.TileIndex` in a ``DataLoader`` with ``--workers`` processes,
  batched by :func:`~histcode.tilereader.collate_tiles`, exactly as ``histcode embed`` reads;
- ``histcode_one_process``: the same loader with no worker processes (``--workers 0``);
- ``dataset_loop``: ``TileDataset[i]`` in a plain loop, no loader: the per-tile read path
  (OpenSlide ``read_region``, RGBA → RGB compositing, tensor view) without batching;
- ``naive``: one process, ``openslide.OpenSlide.read_region`` per tile, RGBA → RGB numpy;
- ``decode_only``: PIL decoding one JPEG of a tile's pixels, in a loop on one core — the
  decode limit of this machine (the issue's rule of thumb is about 1,000 tiles/s a core).

Goals: ``histcode / naive`` ≥ 1.5 with two or more cores (the workers parallelise what the
naive loop does on one core, as for ``benchmarks.embedding``), and per core as close to the
decode limit as OpenSlide allows (``histcode per core / decode limit`` is reported; a read
also pays for OpenSlide's region assembly, the RGBA → RGB conversion and the hand-over
between processes, which ``dataset_loop`` and ``histcode_one_process`` separate).
Each reader runs ``--repeats`` times, interleaved, and the best is kept (the machine may be
shared).

    python -m benchmarks.tile_reading [--tiles 2000] [--tile_size 224] [--workers N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

#: Decoding limit of one core quoted by the issue (tiles/s), for context.
NOMINAL_DECODE_LIMIT = 1000.0
#: histcode's loader (one worker a core) against the naive one-process loop.
GOAL_RATIO_TO_NAIVE = 1.5


def make_slide(work: Path, tiles: int, tile_size: int, mpp: float) -> tuple[Path, Path]:
    """A synthetic slide with about ``tiles`` tissue tiles, and its tile store (cached)."""
    from histcode.synth import write_test_slide
    from histcode.tiling import TilingParams, tile_slides

    side_um = tile_size * mpp
    # tissue covers about half of a synthetic slide
    width_um = float(np.sqrt(tiles * 2.2) * side_um)
    slide = work / f"TCGA-TR-{tiles:04d}-01A-01-TS1.svs"
    if not slide.exists():
        work.mkdir(parents=True, exist_ok=True)
        write_test_slide(slide, width_um=width_um, height_um=width_um, mpp=mpp, seed=5)
    store = work / f"tiles-{tiles}-{tile_size}.zarr"
    params = TilingParams(mpp=mpp, tile_size=tile_size)
    try:
        tile_slides([slide], store, params, progress=False)
    except ValueError:  # a cached store made by another histcode version: redo it
        tile_slides([slide], store, params, overwrite=True, progress=False)
    return slide, store


def histcode_reader(store: Path, workers: int, batch_size: int) -> tuple[float, int]:
    """Tiles/s of TileDataset in a DataLoader (the loader of ``histcode embed``)."""
    from torch.utils.data import DataLoader

    from histcode.tilereader import TileDataset, TileIndex, collate_tiles

    index = TileIndex(store)
    loader = DataLoader(
        TileDataset(index),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_tiles,
        prefetch_factor=4 if workers else None,
    )
    start = time.perf_counter()
    n = 0
    for batch in loader:  # worker start-up is part of the cost, as in embed
        n += len(batch)
    return n / (time.perf_counter() - start), n


def dataset_loop(store: Path) -> float:
    """Tiles/s of ``TileDataset[i]`` in a plain loop: histcode's per-tile read path alone."""
    from histcode.tilereader import TileDataset, TileIndex

    dataset = TileDataset(TileIndex(store))
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset) / (time.perf_counter() - start)


def naive_reader(store: Path) -> float:
    """Tiles/s of a plain loop: ``OpenSlide.read_region`` per tile, RGBA → RGB numpy."""
    import openslide

    from histcode.tilereader import SlideGeometry
    from histcode.tilestore import TileStore

    tiles = next(TileStore(store).iter_slides(status="ok"))
    geometry = SlideGeometry.from_tiles(tiles)
    s = geometry.size_at_level
    start = time.perf_counter()
    slide = openslide.OpenSlide(geometry.path)
    for x, y in tiles.coords:
        region = slide.read_region((int(x), int(y)), geometry.level, (s, s))
        np.asarray(region.convert("RGB"))
    slide.close()
    return len(tiles.coords) / (time.perf_counter() - start)


def decode_only(slide: Path, tile_size: int, n: int = 300) -> float:
    """Tiles/s of decoding a JPEG (quality 80, as the slide's) of one tile's pixels, one core."""
    from PIL import Image

    from histcode.slide import SlideReader

    with SlideReader(slide) as reader:
        w, h = reader.dimensions
        # a tile from the middle of the slide (tissue, not glass)
        pixels = reader.read_region((w // 2, h // 2), 0, (tile_size, tile_size))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    data = buffer.getvalue()
    start = time.perf_counter()
    for _ in range(n):
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return n / (time.perf_counter() - start)


def run(
    work: Path, tiles: int, tile_size: int, mpp: float, workers: int, batch_size: int, repeats: int
) -> dict:
    """The whole measurement (see the module docstring); returns the result."""
    start = time.perf_counter()
    slide, store = make_slide(work, tiles, tile_size, mpp)
    setup_s = time.perf_counter() - start
    runs: dict[str, list[float]] = {
        "histcode": [],
        "histcode_one_process": [],
        "dataset_loop": [],
        "naive": [],
    }
    n = 0
    for _ in range(repeats):  # interleaved, best kept
        rate, n = histcode_reader(store, workers, batch_size)
        runs["histcode"].append(rate)
        runs["histcode_one_process"].append(histcode_reader(store, 0, batch_size)[0])
        runs["dataset_loop"].append(dataset_loop(store))
        runs["naive"].append(naive_reader(store))
    decode = max(decode_only(slide, tile_size) for _ in range(repeats))
    best = {k: max(v) for k, v in runs.items()}
    cores = len(os.sched_getaffinity(0))
    used = max(1, min(workers, cores))
    per_core = best["histcode"] / used
    return {
        "benchmark": "tile_reading",
        "tiles": n,
        "tile_size": tile_size,
        "mpp": mpp,
        "slide_px": "level 0 at the tiles' µm/px (no resizing); 256 px JPEG tiles, q80",
        "workers": workers,
        "batch_size": batch_size,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "tiles_per_s": {k: round(v, 1) for k, v in best.items()},
        "all_runs_tiles_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "histcode_tiles_per_s_per_core": round(per_core, 1),
        "decode_only_tiles_per_s_one_core": round(decode, 1),
        "nominal_decode_limit_per_core": NOMINAL_DECODE_LIMIT,
        "ratio_to_naive": round(best["histcode"] / best["naive"], 3),
        "ratio_one_process_to_naive": round(best["histcode_one_process"] / best["naive"], 3),
        "ratio_dataset_loop_to_naive": round(best["dataset_loop"] / best["naive"], 3),
        "ratio_per_core_to_decode_only": round(per_core / decode, 3),
        "ratio_per_core_to_nominal_limit": round(per_core / NOMINAL_DECODE_LIMIT, 3),
        "goal_ratio_to_naive": GOAL_RATIO_TO_NAIVE,
        "meets_goal": best["histcode"] / best["naive"] >= GOAL_RATIO_TO_NAIVE,
        "machine": platform.machine(),
        "setup_s": round(setup_s, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=2000, help="about this many tiles")
    parser.add_argument("--tile_size", type=int, default=224)
    parser.add_argument("--mpp", type=float, default=0.5, help="µm/px of slide and tiles")
    parser.add_argument(
        "--workers", type=int, default=None, help="loader processes (default: one a core)"
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/tile_reading"))
    args = parser.parse_args(argv)
    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    result = run(
        args.work, args.tiles, args.tile_size, args.mpp, workers, args.batch_size, args.repeats
    )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
