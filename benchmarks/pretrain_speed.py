"""Pretraining throughput: the real pipeline against the model alone and a CPU-augmenting one.

Three ways to run the same SimCLR model (encoder + lightly head + NT-Xent, two views a tile, the
same batch size, precision and memory format), measured in one run, in tiles per second:

- ``pure``: forward + backward + optimiser step on in-memory tensors (the ceiling);
- ``histcode``: the real training step, ``Trainer.fit`` with :class:`TileDataModule` reading
  tiles from the slides in loader workers (uint8) and :class:`TileAugmentation` making the
  views on the device;
- ``reference``: the usual pipeline, tiles read by the same dataset but augmented on the CPU in
  the loader workers with lightly's ``SimCLRTransform`` (PIL), then the same model step.

Prints one JSON line with the three throughputs and the ratios ``histcode / pure`` (the goal on
a GPU is ≥ 0.7) and ``histcode / reference``. Each pipeline is measured ``--repeats`` times,
interleaved, and the best is kept (the machine may be shared).

Examples:
    python benchmarks/pretrain_speed.py                      # CPU: resnet18, 64 px, batch 32
    python benchmarks/pretrain_speed.py --device cuda --encoder resnet50_trunc --tile-size 224 \\
        --mpp 0.5 --batch-size 256 --workers 14 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.spec import PURE_LIMIT_SHARE, Benchmark, Row, fmt, meets

#: histcode / pure on a GPU with bf16 (on CPU the ratio is reported, not held to a goal)
GOAL_RATIO_TO_PURE_GPU = 0.7


def make_tiles(work: Path, slides: int, mpp: float, tile_size: int) -> Path:
    """Synthetic slides (4 × 3 mm, 0.5 µm/px) tiled at ``mpp``/``tile_size``; cached in ``work``."""
    from histcode.synth import write_test_slide
    from histcode.tiling import TilingParams, tile_slides

    tiles = work / f"tiles_{mpp:g}_{tile_size}.zarr"
    paths = []
    for i in range(slides):
        path = work / "slides" / f"TCGA-SP-{i:04d}-01A-01-TS1.svs"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_test_slide(path, width_um=4000, height_um=3000, mpp=0.5, seed=100 + i)
        paths.append(path)
    params = TilingParams(mpp=mpp, tile_size=tile_size)
    try:
        tile_slides(paths, tiles, params, progress=False)
    except ValueError:  # a cached store made by another histcode version: redo it
        tile_slides(paths, tiles, params, overwrite=True, progress=False)
    return tiles


def build(args: argparse.Namespace, tile_size: int, mpp: float):
    from histcode.pretrain.module import SimCLRModule

    torch.manual_seed(0)
    return SimCLRModule(encoder=args.encoder, mpp=mpp, tile_size=tile_size, warmup_steps=1)


def _autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _train_step(model, optimizer, v0: torch.Tensor, v1: torch.Tensor, device: str) -> None:
    x = torch.cat([v0, v1])
    if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(device):
        z0, z1 = model(x).chunk(2)
        loss = model.criterion(z0, z1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _prepare(model, device: str):
    model = model.to(device).train()
    if device == "cuda":
        model.encoder.to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def pure(args: argparse.Namespace, tile_size: int, mpp: float) -> float:
    """Model alone on in-memory views: tiles/s."""
    model, optimizer = _prepare(build(args, tile_size, mpp), args.device)
    b, s = args.batch_size, tile_size
    v0 = torch.randn(b, 3, s, s, device=args.device)
    v1 = torch.randn(b, 3, s, s, device=args.device)
    for _ in range(args.warmup):
        _train_step(model, optimizer, v0, v1, args.device)
    _sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        _train_step(model, optimizer, v0, v1, args.device)
    _sync(args.device)
    return args.steps * b / (time.perf_counter() - start)


class _StepTimer:
    """Times the steps after ``warmup`` (a Lightning callback, built lazily)."""

    def __new__(cls, warmup: int, device: str):
        from pytorch_lightning import Callback

        class Timer(Callback):
            def __init__(self) -> None:
                self.start: float | None = None
                self.end: float | None = None
                self.steps = 0

            def on_train_batch_start(self, trainer, module, batch, idx) -> None:
                if trainer.global_step == warmup:
                    _sync(device)
                    self.start = time.perf_counter()

            def on_train_end(self, trainer, module) -> None:
                _sync(device)
                self.end = time.perf_counter()
                self.steps = trainer.global_step - warmup

        return Timer()


def histcode_pipeline(args: argparse.Namespace, tiles: Path, tile_size: int, mpp: float) -> float:
    """The real training step (Trainer.fit, slides → workers → device augmentation): tiles/s."""
    import warnings

    import pytorch_lightning as pl

    from histcode.pretrain.data import TileDataModule

    model = build(args, tile_size, mpp)
    data = TileDataModule(str(tiles), batch_size=args.batch_size, num_workers=args.workers)
    timer = _StepTimer(args.warmup, args.device)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if args.device == "cuda" else "32-true",
        max_steps=args.warmup + args.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
        default_root_dir=args.work,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    return timer.steps * args.batch_size / (timer.end - timer.start)


class _LightlyViews(Dataset):
    """Tiles from the slides, augmented on the CPU with lightly's SimCLRTransform."""

    def __init__(self, tiles: Path, tile_size: int) -> None:
        from lightly.transforms import SimCLRTransform

        from histcode.tilereader import TileDataset, TileIndex

        self.tiles = TileDataset(TileIndex(tiles))
        self.transform = SimCLRTransform(input_size=tile_size, vf_prob=0.5, rr_prob=0.5)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        from torchvision.transforms.functional import to_pil_image

        return self.transform(to_pil_image(self.tiles[i]))


def reference(args: argparse.Namespace, tiles: Path, tile_size: int, mpp: float) -> float:
    """Augmentation on the CPU in the loader workers (lightly SimCLRTransform): tiles/s."""
    model, optimizer = _prepare(build(args, tile_size, mpp), args.device)
    loader = DataLoader(
        _LightlyViews(tiles, tile_size),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=args.device == "cuda",
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )
    done, start = 0, None
    while done < args.warmup + args.steps:
        for v0, v1 in loader:
            if done == args.warmup:
                _sync(args.device)
                start = time.perf_counter()
            v0 = v0.to(args.device, non_blocking=True)
            v1 = v1.to(args.device, non_blocking=True)
            _train_step(model, optimizer, v0, v1, args.device)
            done += 1
            if done == args.warmup + args.steps:
                break
    _sync(args.device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def augmentation_only(args: argparse.Namespace, tile_size: int) -> float:
    """TileAugmentation alone on a uint8 batch already on the device: tiles/s (two views)."""
    from histcode.inputspec import IMAGENET_MEAN, IMAGENET_STD
    from histcode.pretrain.augment import AugmentConfig, TileAugmentation

    aug = TileAugmentation(AugmentConfig(), IMAGENET_MEAN, IMAGENET_STD, tile_size).to(args.device)
    tiles = torch.randint(0, 256, (args.batch_size, 3, tile_size, tile_size), dtype=torch.uint8)
    tiles = tiles.to(args.device)
    for _ in range(2):
        aug.two_views(tiles)
    _sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        aug.two_views(tiles)
    _sync(args.device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--tile-size", type=int, default=None, help="default 64 (cpu), 224 (cuda)")
    parser.add_argument("--mpp", type=float, default=None, help="default 1.0 (cpu), 0.5 (cuda)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (cpu), 256")
    parser.add_argument("--workers", type=int, default=None, help="default 1 (cpu), cores - 2")
    parser.add_argument("--steps", type=int, default=None, help="timed steps: 15 (cpu), 30")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default: temp)")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    tile_size = args.tile_size or (224 if gpu else 64)
    mpp = args.mpp or (0.5 if gpu else 1.0)
    args.batch_size = args.batch_size or (256 if gpu else 32)
    args.workers = (
        args.workers
        if args.workers is not None
        else (max(1, (os.cpu_count() or 2) - 2) if gpu else 1)
    )
    args.steps = args.steps or (30 if gpu else 15)
    if gpu:
        torch.backends.cudnn.benchmark = True
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="pretrain_speed_")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    tiles = make_tiles(args.work, args.slides, mpp, tile_size)
    runs: dict[str, list[float]] = {"pure": [], "histcode": [], "reference": []}
    for _ in range(args.repeats):  # interleaved, best kept
        runs["pure"].append(pure(args, tile_size, mpp))
        runs["histcode"].append(histcode_pipeline(args, tiles, tile_size, mpp))
        runs["reference"].append(reference(args, tiles, tile_size, mpp))
    best = {k: max(v) for k, v in runs.items()}
    result = {
        "benchmark": "pretrain_speed",
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "encoder": args.encoder,
        "tile_size": tile_size,
        "mpp": mpp,
        "batch_size": args.batch_size,
        "views_per_tile": 2,
        "precision": "bf16-mixed, channels_last" if gpu else "32-true",
        "loader_workers": args.workers,
        "timed_steps": args.steps,
        "tiles_per_s": {k: round(v, 1) for k, v in best.items()},
        "all_runs_tiles_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "ratio_histcode_to_pure": round(best["histcode"] / best["pure"], 3),
        "ratio_histcode_to_reference": round(best["histcode"] / best["reference"], 3),
        "augmentation_only_tiles_per_s": round(augmentation_only(args, tile_size), 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result), flush=True)
    if tmp is not None:
        tmp.cleanup()
    return result


# -- report --------------------------------------------------------------------------------


def speed_rows(r: dict[str, Any]) -> list[Row]:
    """The pipeline against the pure step and against CPU augmentation."""
    t = r.get("tiles_per_s", {})
    goal = GOAL_RATIO_TO_PURE_GPU if "bf16" in str(r.get("precision", "")) else None
    return [
        (
            f"pretraining ({r.get('encoder')}, {r.get('tile_size')} px, {r.get('precision')})",
            f"{fmt(t.get('histcode'))} tiles/s",
            f"pure fwd+bwd {fmt(t.get('pure'))} tiles/s",
            fmt(r.get("ratio_histcode_to_pure")),
            f"≥ {goal} (GPU)" if goal else f"≥ {GOAL_RATIO_TO_PURE_GPU} on a GPU; CPU: reported",
            meets(r.get("ratio_histcode_to_pure"), goal),
        ),
        (
            "pretraining vs CPU augmentation",
            f"{fmt(t.get('histcode'))} tiles/s",
            f"lightly SimCLRTransform in workers {fmt(t.get('reference'))} tiles/s",
            fmt(r.get("ratio_histcode_to_reference")),
            "> 1",
            meets(r.get("ratio_histcode_to_reference"), 1.0),
        ),
    ]


def time_notes(r: dict[str, Any], cores: int | None) -> list[str]:
    """Below :data:`PURE_LIMIT_SHARE` of the pure step: the augmentation's share of a step."""
    notes: list[str] = []
    if (ratio := r.get("ratio_histcode_to_pure")) is not None:
        t = r.get("tiles_per_s", {})
        pure, aug = t.get("pure"), r.get("augmentation_only_tiles_per_s")
        if ratio < PURE_LIMIT_SHARE and pure and aug:
            model = 1 / (1 + pure / aug)
            notes.append(
                f"**pretraining** at {ratio:.2f} of the pure forward+backward: the views are "
                f"made on the device ({r.get('device')}), {aug:,.0f} tiles/s for the "
                f"augmentation alone against {pure:,.0f} for the model, so augmentation adds "
                f"{pure / aug:.0%} to each step (bound ≈ {model:.2f}); the rest "
                f"({max(0.0, model - ratio):.2f}) is decoding in {r.get('loader_workers')} "
                "loader worker(s) on the same cores and Lightning's step overhead. On a GPU "
                "the augmentation is a small share of the step."
            )
    return notes


SPEC = Benchmark(
    name="pretrain_speed",
    what="SimCLR tiles/s vs pure forward+backward and a CPU-augmenting reference",
    quick=["--steps", "3", "--warmup", "1", "--repeats", "1", "--slides", "1"],
    cpu=["--device", "cpu"],
    gpu=["--device", "cuda"],
    order=50,
    goals=(
        f"on a GPU (bf16): ≥ {GOAL_RATIO_TO_PURE_GPU} × the pure forward+backward step; on CPU "
        "the ratio is reported",
        "faster than augmenting on the CPU in the loader workers (lightly's SimCLRTransform)",
    ),
    speed_rows=speed_rows,
    time_notes=time_notes,
)


if __name__ == "__main__":
    main(sys.argv[1:])
