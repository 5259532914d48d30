"""Embedding throughput against the encoder's pure forward and a naive loop; one JSON line.

Goals (issue 5): tiles/s of ``histcode embed`` ≥ 0.9 × the encoder's pure forward on
in-memory tensors on CPU (≥ 0.8 on a GPU), and ≥ 1.5 × a naive loop that calls OpenSlide's
``read_region`` per tile and then runs the same forward. All three are measured in the same
run, on the same tiles, batch size and device.

    python -m benchmarks.embedding [--encoder resnet18] [--device auto] [--tiles 768]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _pure_forward(
    encoder, x_uint8: torch.Tensor, batch_size: int, dev, use_bf16: bool, n_batches: int
) -> float:
    """Tiles/s of normalise + forward on a batch already in device memory."""
    spec = encoder.input_spec
    mean = torch.tensor(spec.mean, device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=dev).view(1, 3, 1, 1) * 255
    # channels-last, as embed feeds it (faster on CPU too): the fair best case of the encoder
    x_uint8 = x_uint8.to(dev).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        x = x_uint8.float().sub_(mean).div_(std)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            encoder(x).float().cpu()

    with torch.inference_mode():
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(n_batches):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return n_batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tile_size", type=int, default=224)
    parser.add_argument("--tiles", type=int, default=768, help="about this many tiles")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from histcode.embedding import embed_store, load_encoder, pick_device
    from histcode.slide import SlideReader
    from histcode.synth import write_test_slide
    from histcode.tilereader import SlideGeometry, read_tile
    from histcode.tilestore import TileStore
    from histcode.tiling import TilingParams, tile_slides

    work = args.workdir or Path(tempfile.mkdtemp(prefix="histcode-bench-embed-"))
    work.mkdir(parents=True, exist_ok=True)
    dev = pick_device(args.device)
    use_bf16 = dev.type == "cuda"
    side_um = args.tile_size * 0.5
    # a square slide with roughly args.tiles tissue tiles (tissue covers about half of it)
    width_um = float(np.sqrt(args.tiles * 2.2) * side_um)
    slide = work / "TCGA-BE-0001-01A-01-TS1.svs"
    if not slide.exists():
        write_test_slide(slide, width_um=width_um, height_um=width_um, mpp=0.5, seed=3)
    tiles = work / "tiles.zarr"
    tile_slides([slide], tiles, TilingParams(mpp=0.5, tile_size=args.tile_size), progress=False)
    store = TileStore(tiles)
    t = store.read(slide.stem)
    n = len(t)

    loaded = load_encoder(args.encoder, mpp=0.5, tile_size=args.tile_size)
    encoder = loaded.module.to(dev)
    if dev.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)

    # 1. the encoder alone, on tensors already in memory
    x = torch.randint(
        0, 256, (args.batch_size, 3, args.tile_size, args.tile_size), dtype=torch.uint8
    )
    # at its best thread count (on a small CPU, one thread can beat all of them)
    pure, pure_threads = 0.0, 0
    all_threads = torch.get_num_threads()
    for threads in sorted({1, all_threads}) if dev.type == "cpu" else [all_threads]:
        torch.set_num_threads(threads)
        rate = _pure_forward(
            encoder, x, args.batch_size, dev, use_bf16, n_batches=max(3, n // (2 * args.batch_size))
        )
        if rate > pure:
            pure, pure_threads = rate, threads
    torch.set_num_threads(all_threads)

    # 2. histcode embed (workers decode, the device runs the encoder, zarr streaming)
    out = work / "features.zarr"
    report = embed_store(
        tiles,
        out,
        args.encoder,
        batch_size=args.batch_size,
        workers=args.workers,
        device=str(dev),
        overwrite=True,
        progress=False,
    )
    ours = report.tiles_embedded / report.seconds_embedding

    # 3. naive: read_region per tile in the main process, then the same forward per batch
    geometry = SlideGeometry.from_tiles(t)
    spec = encoder.input_spec
    mean = torch.tensor(spec.mean, device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=dev).view(1, 3, 1, 1) * 255
    start = time.perf_counter()
    with SlideReader(slide) as reader, torch.inference_mode():
        for i in range(0, n, args.batch_size):
            batch = np.stack(
                [
                    read_tile(reader, geometry, xy, args.tile_size)
                    for xy in t.coords[i : i + args.batch_size]
                ]
            )
            xb = torch.from_numpy(batch).permute(0, 3, 1, 2).to(dev).float()  # channels-last
            xb = xb.sub_(mean).div_(std)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                encoder(xb).float().cpu()
    naive = n / (time.perf_counter() - start)

    # decode alone: the reading limit of one core
    start = time.perf_counter()
    with SlideReader(slide) as reader:
        for xy in t.coords:
            read_tile(reader, geometry, xy, args.tile_size)
    decode = n / (time.perf_counter() - start)

    print(
        json.dumps(
            {
                "benchmark": "embedding",
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "encoder": args.encoder,
                "tile_size": args.tile_size,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "tiles": n,
                "torch_threads": torch.get_num_threads(),
                "precision": "bf16" if use_bf16 else "fp32",
                "pure_forward_tiles_per_s": round(pure, 1),
                "pure_forward_best_threads": pure_threads,
                "embed_tiles_per_s": round(ours, 1),
                "naive_loop_tiles_per_s": round(naive, 1),
                "decode_only_tiles_per_s_one_core": round(decode, 1),
                "ratio_to_pure_forward": round(ours / pure, 3),
                "ratio_to_naive_loop": round(ours / naive, 3),
                "goal_ratio_to_pure_forward": 0.8 if dev.type == "cuda" else 0.9,
                "goal_ratio_to_naive_loop": 1.5,
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
