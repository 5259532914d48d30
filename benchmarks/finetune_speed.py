"""MIL training throughput of the finetune stage against a pure forward + backward; one JSON line.

For each aggregator (gated attention ``abmil`` and ``transformer`` by default), bags of
``--tiles`` tiles of dimension ``--dim`` are written to a temporary feature store and trained
for a few epochs through the real pipeline — :class:`~histcode.finetune.bags.FeatureBags`
(read once, cached), :class:`~histcode.finetune.bags.BagDataset`, padded batches, the
LightningModule and a ``pl.Trainer`` — and, separately, the same model, loss and AdamW run
forward + backward + step on the same bags already in device memory. The first epoch of each
is a warm-up and is not timed. ``ratio`` = pipeline / pure slides per second.

    python -m benchmarks.finetune_speed [--device cpu|cuda|auto] [--tiles 10000] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.spec import PURE_LIMIT_SHARE, Benchmark, Row, fmt, meets

GOAL_RATIO_TO_PURE = 0.8


def _write_store(path: Path, slides: int, tiles: int, dim: int, seed: int) -> list[str]:
    from histcode.featurestore import FeatureStore

    store = FeatureStore(path)
    store.initialise(
        {
            "encoder_ref": "benchmark@0",
            "encoder_sha256": "0" * 64,
            "embed_dim": dim,
            "tiles": "",
            "tiles_fingerprint": "benchmark",
            "mpp": 0.5,
            "tile_size": 224,
            "dtype": "float32",
        }
    )
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(slides):
        sid = f"TCGA-BM-{i:04d}-{'01' if i % 2 == 0 else '11'}A-01-TS1"
        coords = np.zeros((tiles, 2), np.int64)
        writer = store.writer(sid, coords, dim, "float32")
        writer.append(rng.standard_normal((tiles, dim), dtype=np.float32))
        writer.close()
        store.commit(
            writer.group, sid, {"status": "ok", "error": None, "path": "", "n_tiles": tiles}
        )
        ids.append(sid)
    return ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _pipeline(
    store: Path, ids: list[str], aggregator: str, args: argparse.Namespace, device: torch.device
) -> float:
    """Slides/s of Trainer.fit through the real data path (epochs after the first)."""
    import pytorch_lightning as pl

    from histcode.finetune.bags import BagDataset, FeatureBags, bag_loader
    from histcode.finetune.cv import quiet_lightning
    from histcode.finetune.labels import build_labels, table_from_slide_ids
    from histcode.finetune.module import MILModule
    from histcode.finetune.options import ModelOptions

    labels = build_labels(table_from_slide_ids(ids), with_genes=False)
    bags = FeatureBags(store)
    bags.preload(ids)
    loader = bag_loader(BagDataset(bags, labels, args.max_tiles), args.batch_size, True)
    module = MILModule(args.dim, True, [], ModelOptions(aggregator=aggregator, hidden=args.hidden))

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            _sync(device)
            self.starts.append(time.perf_counter())

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            _sync(device)
            self.ends.append(time.perf_counter())

    clock = Clock()
    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            max_epochs=args.epochs,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            precision=args.precision,
            callbacks=[clock],
        )
    with quiet_lightning():
        trainer.fit(module, loader)
    seconds = sum(e - s for s, e in zip(clock.starts[1:], clock.ends[1:], strict=True))
    return len(ids) * (args.epochs - 1) / seconds


def _pure_loop(
    features: list[torch.Tensor], aggregator: str, args: argparse.Namespace, device: torch.device
) -> float:
    """Slides/s of forward + loss + backward + AdamW step on bags already on the device."""
    from histcode.finetune.bags import BagBatch
    from histcode.finetune.module import MILModule
    from histcode.finetune.options import ModelOptions

    module = MILModule(args.dim, True, [], ModelOptions(aggregator=aggregator, hidden=args.hidden))
    module.to(device).train()
    optimiser = module.configure_optimizers()
    batches = []
    for i in range(0, len(features), args.batch_size):
        x = torch.stack(features[i : i + args.batch_size]).to(device)
        n = len(x)
        batches.append(
            BagBatch(
                features=x,
                mask=torch.ones(x.shape[:2], dtype=torch.bool, device=device),
                tumour=torch.tensor([float(j % 2 == 0) for j in range(i, i + n)], device=device),
                log2fc=torch.zeros(n, 0, device=device),
                classes=torch.zeros(n, 0, dtype=torch.long, device=device),
                slide_ids=[""] * n,
            )
        )
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else None

    def epoch() -> None:
        for batch in batches:
            with torch.autocast(
                device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                out = module(batch.features, batch.mask)
                loss = module.total(module.losses(batch, out), out)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

    epoch()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.epochs - 1):
        epoch()
    _sync(device)
    return len(features) * (args.epochs - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--aggregators", nargs="+", default=["abmil", "transformer"])
    parser.add_argument("--tiles", type=int, default=10_000, help="tiles per bag")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension D")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="the first is a warm-up")
    parser.add_argument("--max_tiles", type=int, default=None, help="training subsample")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed (GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be ≥ 2 (the first is a warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "features.zarr"
        start = time.perf_counter()
        ids = _write_store(store, args.slides, args.tiles, args.dim, args.seed)
        write_s = time.perf_counter() - start
        from histcode.featurestore import FeatureStore

        reader = FeatureStore(store)
        start = time.perf_counter()
        features = [torch.from_numpy(reader.read(sid).features) for sid in ids]
        read_s = time.perf_counter() - start
        for name in args.aggregators:
            torch.manual_seed(args.seed)
            pipeline = _pipeline(store, ids, name, args, device)
            torch.manual_seed(args.seed)
            pure = _pure_loop(features, name, args, device)
            results[name] = {
                "pipeline_slides_per_s": round(pipeline, 3),
                "pure_slides_per_s": round(pure, 3),
                "ratio": round(pipeline / pure, 3),
            }
    print(
        json.dumps(
            {
                "benchmark": "finetune_speed",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "cpu": platform.processor() or platform.machine(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "tiles_per_bag": args.tiles,
                "dim": args.dim,
                "slides": args.slides,
                "batch_size": args.batch_size,
                "hidden": args.hidden,
                "precision": args.precision,
                "timed_epochs": args.epochs - 1,
                "store_write_s": round(write_s, 2),
                "store_read_s": round(read_s, 2),
                "results": results,
            }
        ),
        flush=True,
    )


# -- report --------------------------------------------------------------------------------


def speed_rows(r: dict[str, Any]) -> list[Row]:
    """One row an aggregator: the training loop against the pure one."""
    rows: list[Row] = []
    for agg, v in r.get("results", {}).items():
        rows.append(
            (
                f"MIL training {agg} ({fmt(r.get('tiles_per_bag'))} tiles/bag, "
                f"{r.get('precision')})",
                f"{fmt(v.get('pipeline_slides_per_s'))} slides/s",
                f"pure fwd+bwd {fmt(v.get('pure_slides_per_s'))} slides/s",
                fmt(v.get("ratio")),
                f"≥ {GOAL_RATIO_TO_PURE}",
                meets(v.get("ratio"), GOAL_RATIO_TO_PURE),
            )
        )
    return rows


def time_notes(r: dict[str, Any], cores: int | None) -> list[str]:
    """Below :data:`PURE_LIMIT_SHARE` of the pure loop: milliseconds a slide outside the model."""
    notes: list[str] = []
    for agg, v in r.get("results", {}).items():
        ratio = v.get("ratio")
        if ratio is not None and ratio < PURE_LIMIT_SHARE:
            pure, ours = v.get("pure_slides_per_s"), v.get("pipeline_slides_per_s")
            extra_ms = (1 / ours - 1 / pure) * 1000 if pure and ours else None
            notes.append(
                f"**MIL training {agg}** at {ratio:.2f} of the pure loop: "
                f"{fmt(extra_ms)} ms a slide outside the model's forward + backward + "
                "step — the Trainer's loop and hooks, and the bag data path (cached bag → "
                "BagDataset sampling → padded, masked batch; a bag of "
                f"{fmt(r.get('tiles_per_bag'))} × {r.get('dim')} float32 is "
                f"{(r.get('tiles_per_bag') or 0) * (r.get('dim') or 0) * 4 / 2**20:.0f} MiB "
                "to copy)."
            )
    return notes


SPEC = Benchmark(
    name="finetune_speed",
    what="MIL training slides/s on bags of 10,000 tiles vs pure forward+backward",
    quick=["--tiles", "2000", "--slides", "2", "--epochs", "2"],
    cpu=["--device", "cpu"],
    gpu=["--device", "cuda", "--precision", "bf16-mixed"],
    order=60,
    goals=(f"≥ {GOAL_RATIO_TO_PURE} × the pure forward+backward loop, for each aggregator",),
    speed_rows=speed_rows,
    time_notes=time_notes,
)


if __name__ == "__main__":
    main()
