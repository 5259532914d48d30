"""SimCLR recipes A/B'd by the tile probe: which recipe gives features that find tumour tiles.

A recipe change only counts when the hard cohort's tile probe shows it. The ceiling benchmark
(:mod:`benchmarks.ceiling`) measures a recipe through ``histcode pretrain``, which reads every
batch's tiles from the slides (minutes per 1,000 steps on a loaded CPU, plus a registry round
trip); this one loads every tile of a tile store into memory once (cached as an ``.npz`` under
``--work``) and trains there, so a recipe costs ~40 s of an idle core per 1,000 steps of 32
tiles at 64 px (50–75 s on 2 cores at load 6–8), and a dozen variants × 3 seeds fit in an
hour.

What it trains is ``histcode pretrain``'s own model: :class:`histcode.pretrain.module.
ContrastiveModule` (the encoder from the zoo, lightly's SimCLR projection head and NT-Xent
loss, the batched :class:`~histcode.pretrain.augment.TileAugmentation`, AdamW with weight
decay on weights only and lightly's warm-up + cosine schedule, from the module's own
``configure_optimizers``), built from a base recipe (the demo's encoder and optimiser from
``histcode.demo._pretrain_config``: the tiny CNN, 64-d, width 16, with a ReLU before the pool
since session 14 (without it: ``norelu_macenko``), projection 32, lr 2e-3,
weight decay 1e-4, 10 warm-up steps, batch 32; with SimCLR's temperature 0.1 and default
augmentations, which the demo used until 2026-11-30) with a variant's overrides
(:data:`VARIANTS`; ``demo`` is what the demo uses now: temperature 0.5, no colour jitter,
grayscale or blur; the demo trains it for 2,000 steps on Macenko-normalised tiles,
``demo_macenko`` with ``--steps 2000``). The only difference from the pipeline is the data
path: each step draws its batch uniformly from all tiles of the store (with replacement)
instead of an epoch's shuffle.

Each run is probed like :mod:`benchmarks.ceiling` probes an encoder (its
:func:`~benchmarks.ceiling.probe_features` and :func:`~benchmarks.ceiling.feature_stats` on
up to ``--tiles-per-slide`` tiles a slide, labelled from the synthetic cohort's truth masks):
patient-grouped linear probe tumour tile AUC, slide ceiling (slides ranked by the mean of
their top 2 % tile probabilities), lymphocyte tile AUC and slide r, effective rank. The same
probe on the encoder's **initial weights** (step 0: the tiny CNN with random weights of that
seed — the baseline a recipe must beat) is a row of its own; the difference from it is paired
by seed. A variant with ``stain: macenko`` trains and is probed on tiles normalised per slide
with :mod:`histcode.stain` (stain matrix estimated from up to 200 tiles of each slide), and
gets its own random-init row on those tiles; it is refused on a store tiled with
``--stain_norm`` (its tiles are normalised already).

The cohort and tile store are made as the ceiling benchmark makes them
(:func:`benchmarks.ceiling.make_cohort`, :func:`~benchmarks.ceiling.make_tiles`: ``histcode
synth`` seed 0, 64 µm tiles) unless ``--tiles`` and ``--cohort`` name existing ones (e.g. the
ceiling's ``benchmarks/out/ceiling/tiles-hard-20p-1.zarr`` and ``cohort-hard-20p``). Seeds
change the encoder's initialisation, the batches and the augmentations; the cohort, the probe's
tiles and folds stay fixed. Finished runs are cached under ``--work`` (``--fresh`` redoes
them). Prints one JSON line: every run, the random-init probes and a per-variant mean ± sd
summary; its ``SPEC`` renders the report section. ``--merge`` adds earlier outputs' runs
(e.g. another cohort) to the summary.

    python -m benchmarks.simclr_recipe [--quick] [--difficulty hard] [--tiles STORE --cohort DIR]
        [--variants base demo temp05 …] [--define NAME='{"temperature": 0.3}'] [--seeds 0 1 2]
        [--steps 1000] [--merge OUT.json …]

Measured on 2 shared CPU cores (hard cohort, 20 patients, 1 µm/px, 1,000 steps, seeds 0–2;
see RESULTS.md): random init tumour tile AUC 0.789 ± 0.004, slide ceiling 0.53 ± 0.08; the
base recipe (the demo's until 11/2026) 0.821 ± 0.033 / 0.67 ± 0.09 (as ``histcode
pretrain`` gives it in the ceiling benchmark); without colour jitter and grayscale 0.884 ±
0.017 / 0.80 ± 0.06, and with
temperature 0.5 as well 0.896 ± 0.021 / 0.82 ± 0.05 — the only changes that beat random init
by more than twice the seed spread (the demo now trains with the latter); temperature alone, a
lower learning rate and Macenko normalisation do not.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from benchmarks.spec import Benchmark, Section, last_json, tail

#: Named recipes: overrides of the base recipe (:func:`demo_recipe`). Keys: ``temperature``, ``lr``,
#: ``weight_decay``, ``warmup_steps``, ``min_lr_ratio``, ``projection_dim``, ``optimizer``
#: (any :class:`ContrastiveModule` argument), ``batch_size``, ``augmentation`` (a dict of
#: :class:`AugmentConfig` fields) and ``stain`` (``"macenko"``). The encoder is the demo's in
#: every recipe (the random-init rows are its initial weights).
#: The demo's recipe on Macenko-normalised tiles (``demo_macenko``), which the architecture
#: variants change only in the encoder.
_DEMO_MACENKO: dict[str, Any] = {
    "temperature": 0.5,
    "augmentation": {"jitter_prob": 0.0, "gray_prob": 0.0, "blur_prob": 0.0},
    "stain": "macenko",
}
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    # what histcode demo trains with (a test holds this to histcode.demo._pretrain_config)
    "demo": {
        "temperature": 0.5,
        "augmentation": {"jitter_prob": 0.0, "gray_prob": 0.0, "blur_prob": 0.0},
    },
    # the demo tiles with Macenko normalisation by default: its recipe on normalised tiles
    "demo_macenko": _DEMO_MACENKO,
    # session 13's architecture A/Bs on normalised tiles: a ReLU before the pool (the demo's
    # since session 14; without it, the demo's encoder until then), with a fourth convolution
    # or width 32 as well
    "norelu_macenko": {**_DEMO_MACENKO, "encoder_kwargs": {"final_relu": False}},
    "relu_macenko": {**_DEMO_MACENKO, "encoder_kwargs": {"final_relu": True}},
    "relu_depth4_macenko": {**_DEMO_MACENKO, "encoder_kwargs": {"final_relu": True, "depth": 4}},
    "relu_width32_macenko": {**_DEMO_MACENKO, "encoder_kwargs": {"final_relu": True, "width": 32}},
    # the demo's recipe until session 12 (with SimCLR's Gaussian blur), on normalised tiles
    "nocolour_macenko": {
        "temperature": 0.5,
        "augmentation": {"jitter_prob": 0.0, "gray_prob": 0.0},
        "stain": "macenko",
    },
    "temp05": {"temperature": 0.5},
    "temp1": {"temperature": 1.0},
    "lr2e-4": {"lr": 2e-4},
    "nocolour": {"augmentation": {"jitter_prob": 0.0, "gray_prob": 0.0}},
    "weakcrop": {"augmentation": {"crop_scale": [0.6, 1.0]}},
    "batch128": {"batch_size": 128},
    "temp05_nocolour": {"temperature": 0.5, "augmentation": {"jitter_prob": 0.0, "gray_prob": 0.0}},
    "temp05_macenko": {"temperature": 0.5, "stain": "macenko"},
}
#: The variants of a full run (the runner's): the base, the one-change A/Bs and the demo's
#: recipe on raw and on Macenko-normalised tiles (``demo`` is ``temp05_nocolour`` without blur).
FULL_VARIANTS = (
    "base", "temp05", "temp1", "lr2e-4", "nocolour", "temp05_nocolour", "temp05_macenko",
    "demo", "nocolour_macenko", "demo_macenko", "norelu_macenko", "relu_depth4_macenko",
    "relu_width32_macenko",
)  # fmt: skip
#: Override keys that are not :class:`ContrastiveModule` arguments.
RECIPE_KEYS = ("batch_size", "augmentation", "stain")
STAINS = ("macenko",)
#: Tiles of a slide its stain matrix is estimated from.
STAIN_TILES = 200
#: Steps at the start and end of training whose mean loss is reported.
FIRST_STEPS, LAST_STEPS = 10, 50
#: A final loss within this share of ln(2B − 1) is "at chance" (a constant embedding's loss).
CHANCE_MARGIN = 0.05
#: Figures of a probe (flat keys of a run's ``probe``) and where the summary takes them.
FIGURES = (
    "tumour_tile_auc",
    "tumour_slide_auc",
    "tumour_slide_auc_mean",
    "lymphocyte_tile_auc",
    "lymphocyte_slide_r",
    "effective_rank",
    "mean_cosine",
)


# -- recipes ------------------------------------------------------------------------------------


def demo_recipe() -> dict[str, Any]:
    """The demo's SimCLR recipe: ``model`` (ContrastiveModule arguments) and ``batch_size``.

    Taken from ``histcode.demo._pretrain_config`` so that ``demo`` follows the demo; the
    arguments it leaves out (temperature, augmentations) are the module's defaults and are
    written out here so that the result records them.
    """
    from histcode.demo import DemoOptions, _pretrain_config
    from histcode.pretrain.module import ContrastiveModule

    options = DemoOptions(
        patients=0, difficulty="", slide_mm=(0, 0), mpp=1.0, tile_size=64, pretrain_steps=1000,
        batch_size=32, epochs=1, folds=3, baseline_encoder="resnet18", aggregator="abmil",
        seed=0,
    )  # fmt: skip
    config = _pretrain_config(options)
    defaults = inspect.signature(ContrastiveModule).parameters
    model = dict(config["model"])
    # the base recipe: the demo's encoder, optimiser and batch with SimCLR's own temperature
    # and augmentations; the demo's choices of these two are the "demo" variant
    model.pop("augmentation", None)
    model["temperature"] = defaults["temperature"].default
    model.setdefault("method", defaults["method"].default)
    return {"model": model, "batch_size": int(config["data"]["batch_size"])}


def demo_choices() -> dict[str, Any]:
    """What the demo's recipe changes from the base: its temperature and augmentations."""
    from histcode.demo import DemoOptions, _pretrain_config

    options = DemoOptions(
        patients=0, difficulty="", slide_mm=(0, 0), mpp=1.0, tile_size=64, pretrain_steps=1000,
        batch_size=32, epochs=1, folds=3, baseline_encoder="resnet18", aggregator="abmil",
        seed=0,
    )  # fmt: skip
    model = _pretrain_config(options)["model"]
    return {"temperature": model["temperature"], "augmentation": model["augmentation"]}


def recipe_for(overrides: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo's recipe with a variant's overrides: ``model``, ``augmentation`` (the
    AugmentConfig fields that differ from the default), ``batch_size``, ``stain``.

    Raises:
        ValueError: an override that is neither a ContrastiveModule argument nor one of
            :data:`RECIPE_KEYS`, an unknown augmentation field or stain, or a bad value.
    """
    from histcode.pretrain.augment import AugmentConfig
    from histcode.pretrain.module import ContrastiveModule

    base = base or demo_recipe()
    allowed = set(inspect.signature(ContrastiveModule).parameters) - {
        "augmentation", "mpp", "tile_size", "init_from", "registry", "method", "encoder",
    }  # fmt: skip
    unknown = set(overrides) - allowed - set(RECIPE_KEYS)
    if unknown:
        raise ValueError(
            f"unknown recipe keys {sorted(unknown)}: use {list(RECIPE_KEYS)} or a "
            f"ContrastiveModule argument ({sorted(allowed)})"
        )
    augmentation = dict(overrides.get("augmentation") or {})
    fields = set(inspect.signature(AugmentConfig).parameters)
    if bad := set(augmentation) - fields:
        raise ValueError(f"unknown augmentation fields {sorted(bad)}: choose from {sorted(fields)}")
    AugmentConfig(**_augment_kwargs(augmentation)).check()
    stain = overrides.get("stain")
    if stain is not None and stain not in STAINS:
        raise ValueError(f"stain {stain!r}: choose {list(STAINS)} or leave it out")
    batch_size = int(overrides.get("batch_size", base["batch_size"]))
    if batch_size < 2:
        raise ValueError(f"batch_size {batch_size}: NT-Xent needs at least 2 tiles a step")
    model = {**base["model"], **{k: v for k, v in overrides.items() if k not in RECIPE_KEYS}}
    if "encoder_kwargs" in overrides:  # an architecture change: on top of the demo's encoder's
        model["encoder_kwargs"] = {
            **(base["model"].get("encoder_kwargs") or {}),
            **overrides["encoder_kwargs"],
        }
    return {
        "model": model,
        "augmentation": augmentation,
        "batch_size": batch_size,
        "stain": stain,
    }


def _augment_kwargs(augmentation: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in augmentation.items()}


def describe(overrides: dict[str, Any]) -> str:
    """A variant's changes in words (the base recipe's description for none)."""
    parts = []
    for key, value in overrides.items():
        if key == "augmentation":
            parts += [f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in value.items()]
        elif key == "stain":
            parts.append(f"{value.capitalize()}-normalised tiles")
        else:
            parts.append(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts) or "SimCLR's temperature 0.1 and augmentations: the demo until 11/2026"


# -- tiles --------------------------------------------------------------------------------------


def _fingerprint(labels: Any) -> str:
    """What identifies a store's tiles: its path, slides and tile coordinates."""
    index = labels.index
    digest = hashlib.sha256()
    digest.update(str(Path(index.store.path).resolve()).encode())
    digest.update(json.dumps([labels.slide_ids, index.tile_size, index.mpp]).encode())
    digest.update(np.ascontiguousarray(index.coords).tobytes())
    return digest.hexdigest()[:16]


def load_pixels(labels: Any, work: Path) -> tuple[np.ndarray, Path]:
    """``(N, 3, S, S)`` uint8 pixels of every tile of the store, in ``TileIndex`` order.

    Read from the slides once (``TileDataset``, as ``histcode embed`` reads them) and cached
    as ``work/pixels/<store>-<fingerprint>.npz``; the fingerprint (store path, slides, tile
    coordinates) makes a changed store read again.

    Returns:
        The pixels and the cache file.
    """
    from histcode.tilereader import TileDataset

    index = labels.index
    cache = work / "pixels" / f"{Path(index.store.path).name}-{_fingerprint(labels)}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            pixels = z["pixels"]
        if len(pixels) == len(index):
            return pixels, cache
    dataset = TileDataset(index)
    pixels = np.stack([dataset[i].numpy() for i in range(len(index))])
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial.npz")
    np.savez(partial, pixels=pixels)
    partial.replace(cache)
    return pixels, cache


def stain_normalised(
    pixels: np.ndarray, labels: Any, cache: Path, stain: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """The tiles normalised per slide (``stain``: ``macenko``, :mod:`histcode.stain`); cached
    beside the pixels.

    Each slide's stain matrix is estimated from up to :data:`STAIN_TILES` of its tiles (drawn
    with seed 0) and applied to all of them, mapped to Macenko's reference. A slide whose
    estimate fails (too little tissue) keeps its tiles as they are; it is listed.

    Returns:
        The normalised pixels and ``{"slides": {slide: StainParams dict}, "failed": {slide:
        error}}``.
    """
    from histcode import stain as stains

    if stain not in STAINS:
        raise ValueError(f"stain {stain!r}: choose {list(STAINS)}")
    path = cache.with_name(cache.name.replace(".npz", f".{stain}.npz"))
    if path.is_file():
        with np.load(path) as z:
            out, record = z["pixels"], json.loads(str(z["record"]))
        if len(out) == len(pixels):
            return out, record
    out = np.empty_like(pixels)
    record: dict[str, Any] = {"method": stain, "reference": stains.REFERENCE.to_dict()}
    record["slides"], record["failed"] = {}, {}
    rng = np.random.default_rng(0)
    for s, slide in enumerate(labels.slide_ids):
        rows = labels.index.slide_range(s)
        tiles = pixels[rows.start : rows.stop]
        pick = rng.choice(len(tiles), min(len(tiles), STAIN_TILES), replace=False)
        try:
            params = stains.estimate_macenko(tiles[np.sort(pick)])
        except ValueError as err:
            record["failed"][slide] = str(err)
            out[rows.start : rows.stop] = tiles
            print(f"simclr_recipe: {slide}: left as it is: {err}", file=sys.stderr)
            continue
        record["slides"][slide] = params.to_dict()
        out[rows.start : rows.stop] = stains.normalise(tiles, params)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, pixels=out, record=json.dumps(record))
    partial.replace(path)
    return out, record


# -- training and probing -------------------------------------------------------------------


def initial_encoder(recipe: dict[str, Any], seed: int, mpp: float, tile_size: int) -> Any:
    """The encoder a run with ``seed`` starts from: the zoo's, built right after
    ``torch.manual_seed(seed)`` (as :func:`build_module` builds it)."""
    import torch

    from histcode.encoders import create_encoder

    model = recipe["model"]
    torch.manual_seed(seed)
    return create_encoder(
        model["encoder"], **(model.get("encoder_kwargs") or {}), mpp=mpp, tile_size=tile_size
    )


def build_module(recipe: dict[str, Any], seed: int, mpp: float, tile_size: int) -> Any:
    """``histcode pretrain``'s :class:`ContrastiveModule` for ``recipe``, seeded with ``seed``."""
    import torch

    from histcode.pretrain.augment import AugmentConfig
    from histcode.pretrain.module import ContrastiveModule

    torch.manual_seed(seed)
    augmentation = AugmentConfig(**_augment_kwargs(recipe["augmentation"]))
    return ContrastiveModule(
        **recipe["model"], mpp=mpp, tile_size=tile_size, augmentation=augmentation
    )


def optimiser(module: Any, steps: int, batch_size: int) -> tuple[Any, Any]:
    """The module's own optimiser and schedule (``configure_optimizers``) for ``steps``.

    ``configure_optimizers`` asks the Lightning trainer for the run's length (and, with
    ``scale_lr``, the batch); a stand-in with those figures is attached for the call only.
    """
    module._trainer = SimpleNamespace(
        estimated_stepping_batches=steps,
        world_size=1,
        accumulate_grad_batches=1,
        datamodule=SimpleNamespace(batch_size=batch_size),
    )
    try:
        config = module.configure_optimizers()
    finally:
        module._trainer = None
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def train(
    module: Any, pixels: np.ndarray, steps: int, batch_size: int, seed: int, device: str
) -> dict[str, Any]:
    """SimCLR in memory: each step, ``batch_size`` tiles drawn uniformly (with replacement),
    the module's two augmented views, its loss, an optimiser and scheduler step."""
    import torch

    from histcode.pretrain.collapse import chance_loss

    module.to(device).train()
    opt, scheduler = optimiser(module, steps, batch_size)
    tiles = torch.from_numpy(pixels).to(device)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(tiles), (batch_size,), generator=generator)
        loss = module._loss(module.augment.two_views(tiles[idx.to(device)]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
        losses.append(loss.detach())
    curve = torch.stack(losses).float().cpu().numpy() if losses else np.zeros(0)
    seconds = time.perf_counter() - start
    chance = chance_loss(batch_size)
    temperature = float(module.criterion.temperature)
    final = float(np.mean(curve[-LAST_STEPS:])) if len(curve) else float("nan")
    every = max(1, steps // 20)
    return {
        "steps": steps,
        "batch_size": batch_size,
        "first_loss": round(float(np.mean(curve[:FIRST_STEPS])), 4) if len(curve) else None,
        "final_loss": round(final, 4),
        "min_loss": round(float(curve.min()), 4) if len(curve) else None,
        "chance_loss": round(chance, 4),
        "over_chance": round(final / chance, 4),
        "aligned_loss": round(aligned_loss(batch_size, temperature), 4),
        "finite": bool(np.isfinite(curve).all()),
        "curve": [[i + 1, round(float(curve[i]), 3)] for i in range(every - 1, steps, every)],
        "seconds": round(seconds, 1),
        "lr_peak": float(opt.param_groups[0]["initial_lr"]),
    }


def aligned_loss(batch_size: int, temperature: float) -> float:
    """NT-Xent when each tile's two views coincide and different tiles are orthogonal:
    ``ln(1 + (2B − 2)·exp(−1/T))``. Between it and chance (``ln(2B − 1)``) lies the range of
    a loss that learned something; it rises with the temperature (B = 32: 0.003 at T 0.1,
    2.24 at 0.5, 3.17 at 1), so losses over chance do not compare across temperatures."""
    return math.log1p((2 * batch_size - 2) * math.exp(-1.0 / temperature))


def probe(
    encoder: Any, pixels: np.ndarray, labels: Any, sampled: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """The ceiling benchmark's probe of ``encoder`` on the sampled tiles (CPU, eval mode)."""
    from benchmarks import ceiling

    x = ceiling.embed(encoder.cpu(), pixels[sampled])
    tasks = ceiling.probe_features(x, labels, sampled, args.folds, args.probe_c, args.top)
    stats = ceiling.feature_stats(x, seed=0)
    tumour, lymph = tasks.get("tumour", {}), tasks.get("lymphocyte", {})
    return {
        "tumour_tile_auc": tumour.get("tile_auc"),
        "tumour_slide_auc": tumour.get("slide_auc_top"),
        "tumour_slide_auc_mean": tumour.get("slide_auc_mean"),
        "lymphocyte_tile_auc": lymph.get("tile_auc"),
        "lymphocyte_slide_r": lymph.get("slide_r_fraction"),
        "effective_rank": stats["effective_rank"],
        "mean_cosine": stats["mean_cosine"],
        "dead_dims": stats["dead_dims"],
        "dim": stats["dim"],
        "tumour_tile_auc_per_fold": tumour.get("tile_auc_per_fold"),
        "errors": {t: v["error"] for t, v in tasks.items() if "error" in v} or None,
    }


def _key(what: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path, fresh: bool, make: Any, *args: Any) -> dict[str, Any]:
    """``make(*args)``, kept as JSON at ``path`` and reused unless ``fresh`` (failures are not
    kept)."""
    if path.is_file() and not fresh:
        return {**json.loads(path.read_text()), "cached": True}
    entry = make(*args)
    if entry.get("status") == "ok":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entry))
    return {**entry, "cached": False}


def random_init_entry(
    recipe: dict[str, Any], seed: int, pixels: np.ndarray, ctx: dict[str, Any]
) -> dict[str, Any]:
    """The probe of the encoder's initial weights for ``seed`` (on the recipe's tiles)."""
    labels, args = ctx["labels"], ctx["args"]
    start = time.perf_counter()
    encoder = initial_encoder(recipe, seed, labels.index.mpp, labels.index.tile_size)
    return {
        "cohort": ctx["cohort_label"],
        "seed": seed,
        "stain": recipe["stain"],
        "encoder": recipe["model"]["encoder"],
        "encoder_kwargs": recipe["model"].get("encoder_kwargs"),
        "status": "ok",
        "probe": probe(encoder, pixels, labels, ctx["sampled"], args),
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_entry(
    variant: str,
    overrides: dict[str, Any],
    recipe: dict[str, Any],
    seed: int,
    pixels: np.ndarray,
    ctx: dict[str, Any],
) -> dict[str, Any]:
    """One variant × seed: train, probe; a failure is recorded, not raised."""
    import torch

    labels, args = ctx["labels"], ctx["args"]
    mpp, tile_size = labels.index.mpp, labels.index.tile_size
    entry: dict[str, Any] = {
        "cohort": ctx["cohort_label"],
        "variant": variant,
        "overrides": overrides,
        "recipe": recipe,
        "seed": seed,
        "steps": args.steps,
        "device": args.device,
        "load_average": _load(),
    }
    start = time.perf_counter()
    try:
        module = build_module(recipe, seed, mpp, tile_size)
        first = initial_encoder(recipe, seed, mpp, tile_size).state_dict()
        same = all(torch.equal(v, module.encoder.state_dict()[k]) for k, v in first.items())
        if not same:
            raise RuntimeError(
                "the module's encoder does not start from initial_encoder's weights: the "
                "random-init row would not be this run's step 0"
            )
        # what the module was built with, read back from it
        entry["effective"] = {
            "temperature": float(module.criterion.temperature),
            "augmentation": module.augmentation.to_dict(),
            "batch_size": recipe["batch_size"],
        }
        entry["pretrain"] = train(
            module, pixels, args.steps, recipe["batch_size"], seed, args.device
        )
        entry["effective"]["lr"] = entry["pretrain"].pop("lr_peak")
        if not entry["pretrain"]["finite"]:
            raise FloatingPointError(
                f"the loss was not finite (final {entry['pretrain']['final_loss']})"
            )
        entry["probe"] = probe(module.encoder, pixels, labels, ctx["sampled"], args)
        entry["status"] = "ok"
    except Exception as err:  # a failed run is a row of the table, not the end
        entry.update(status="failed", error=f"{type(err).__name__}: {err}")
    entry["seconds"] = round(time.perf_counter() - start, 1)
    return entry


# -- summary ----------------------------------------------------------------------------------


def mean_sd(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample sd of the defined values (sd None for fewer than 2), and the values."""
    ok = [float(v) for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": round(float(np.mean(ok)), 4) if ok else None,
        "sd": round(float(np.std(ok, ddof=1)), 4) if len(ok) > 1 else None,
        "n": len(ok),
        "values": [None if v is None else round(float(v), 4) for v in values],
    }


def _arch(encoder_kwargs: dict[str, Any] | None) -> str:
    """An encoder's arguments as a key (runs pair with the initial weights of the same
    architecture)."""
    return json.dumps(encoder_kwargs or {}, sort_keys=True)


def _init_id(entry: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a random-init probe: cohort, stain, seed and architecture."""
    return (entry["cohort"], entry["stain"], entry["seed"], _arch(entry.get("encoder_kwargs")))


def summarise(
    runs: list[dict[str, Any]], random_init: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per cohort × variant × steps, and one per cohort × stain for the initial
    weights: mean ± sd over seeds of every figure; for variants, the difference from the
    random init of the same seed and tiles (paired)."""
    baseline = {
        (r["cohort"], r["stain"], _arch(r.get("encoder_kwargs")), r["seed"]): r["probe"]
        for r in random_init
        if r.get("status") == "ok"
    }
    rows: list[dict[str, Any]] = []
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in random_init:
        if r.get("status") == "ok":
            key = (r["cohort"], "random init", r["stain"], 0, _arch(r.get("encoder_kwargs")))
            groups.setdefault(key, []).append(r)
    for r in runs:
        if r.get("status") == "ok":
            arch = _arch(r["recipe"]["model"].get("encoder_kwargs"))
            key = (r["cohort"], r["variant"], r["recipe"].get("stain"), r["steps"], arch)
            groups.setdefault(key, []).append(r)
    for (cohort, variant, stain, steps, arch), entries in groups.items():
        row: dict[str, Any] = {
            "cohort": cohort,
            "variant": variant,
            "stain": stain,
            "steps": steps,
            "encoder_kwargs": json.loads(arch),
            "seeds": sorted(e["seed"] for e in entries),
        }
        for figure in FIGURES:
            row[figure] = mean_sd([e["probe"].get(figure) for e in entries])
        if steps:
            row["overrides"] = entries[0].get("overrides", {})
            for figure in ("final_loss", "over_chance", "first_loss", "seconds"):
                row[figure] = mean_sd([e["pretrain"].get(figure) for e in entries])
            row["chance_loss"] = entries[0]["pretrain"]["chance_loss"]
            for figure in ("tumour_tile_auc", "tumour_slide_auc"):
                deltas = []
                for e in entries:
                    base = baseline.get((cohort, stain, arch, e["seed"]))
                    mine = e["probe"].get(figure)
                    ok = base is not None and mine is not None and base.get(figure) is not None
                    deltas.append(mine - base[figure] if ok else None)  # type: ignore[index]
                row[f"{figure}_vs_random"] = mean_sd(deltas)
        rows.append(row)
    return rows


def load_result(path: Path) -> dict[str, Any]:
    """The last JSON line of this benchmark in a file its stdout went to.

    Raises:
        ValueError: the file holds none.
    """
    try:
        return last_json(path.read_text(), "simclr_recipe")
    except ValueError:
        raise ValueError(
            f"--merge {path}: no JSON line of benchmarks.simclr_recipe in it"
        ) from None


# -- run ----------------------------------------------------------------------------------------


def _store_info(labels: Any, tiles: Path, cohort: Path, sampled: np.ndarray) -> dict[str, Any]:
    probed = labels.tumour[sampled]
    tumour_slides = labels.slide_tumour == 1
    return {
        "tiles_path": str(tiles),
        "cohort_path": str(cohort),
        "slides": len(labels.slide_ids),
        "normal_slides": int((labels.slide_tumour == 0).sum()),
        "patients": len(set(labels.patient.tolist())),
        "tiles": len(labels.index),
        "tiles_probed": len(sampled),
        "tumour_tiles_probed": int((probed == 1).sum()),
        "mpp": labels.index.mpp,
        "tile_size": labels.index.tile_size,
        "mean_tumour_fraction": round(
            float(np.mean(labels.slide_tumour_fraction[tumour_slides])), 4
        ),
        "store_stain_norm": str(labels.index.store.attrs.get("stain_norm") or "none"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement (see the module docstring); returns the result."""
    from benchmarks import ceiling

    t0 = time.perf_counter()
    load_start = _load()
    args.work.mkdir(parents=True, exist_ok=True)
    variants = {name: VARIANTS.get(name, {}) for name in args.variants} | args.defined
    base = demo_recipe()
    recipes = {name: recipe_for(overrides, base) for name, overrides in variants.items()}
    runs: list[dict[str, Any]] = []
    random_init: list[dict[str, Any]] = []
    cohorts: dict[str, Any] = {}
    stain_records: dict[str, Any] = {}
    if args.seeds and variants:
        cohort = args.cohort or ceiling.make_cohort(
            args.work, args.difficulty, args.patients, args.slide_mm
        )
        tiles = args.tiles or ceiling.make_tiles(
            args.work, cohort, args.difficulty, args.patients, args.mpp
        )
        labels = ceiling.label_tiles(cohort, tiles)
        store_norm = str(labels.index.store.attrs.get("stain_norm") or "none")
        if store_norm != "none" and (stained := [n for n, r in recipes.items() if r["stain"]]):
            raise ValueError(
                f"{tiles} is stain-normalised already (stain_norm {store_norm}): variants "
                f"{stained} would normalise its tiles twice; use a store tiled without "
                "--stain_norm, or leave them out"
            )
        sampled = ceiling.sample_tiles(labels.index, args.tiles_per_slide, 0)
        raw, cache = load_pixels(labels, args.work)
        label = args.label or args.difficulty
        cohorts[label] = _store_info(labels, tiles, cohort, sampled)
        ctx = {"labels": labels, "sampled": sampled, "args": args, "cohort_label": label}
        pixels_of: dict[str | None, np.ndarray] = {None: raw}
        common = {
            "store": _fingerprint(labels),
            "tiles_per_slide": args.tiles_per_slide,
            "folds": args.folds,
            "probe_c": args.probe_c,
            "top": args.top,
        }
        for seed in args.seeds:
            for name, recipe in recipes.items():
                stain = recipe["stain"]
                if stain not in pixels_of:
                    pixels_of[stain], stain_records[stain] = stain_normalised(
                        raw, labels, cache, stain
                    )
                pixels = pixels_of[stain]
                init_key = {**common, "seed": seed, "stain": stain, "model": recipe["model"]}
                arch = recipe["model"].get("encoder_kwargs")
                if not any(
                    r["seed"] == seed and r["stain"] == stain and r.get("encoder_kwargs") == arch
                    for r in random_init
                ):
                    entry = _cached(
                        args.work / "runs" / f"init-{_key(init_key)}.json",
                        args.fresh,
                        random_init_entry,
                        recipe,
                        seed,
                        pixels,
                        ctx,
                    )
                    entry["cohort"] = label
                    random_init.append(entry)
                    _log(f"random init, seed {seed}, stain {stain}", entry)
                run_key = {**init_key, "recipe": recipe, "steps": args.steps, "device": args.device}
                entry = _cached(
                    args.work / "runs" / f"run-{_key(run_key)}.json",
                    args.fresh,
                    run_entry,
                    name,
                    variants[name],
                    recipe,
                    seed,
                    pixels,
                    ctx,
                )
                entry.update(cohort=label, variant=name)
                runs.append(entry)
                _log(f"{name}, seed {seed}", entry)
    merged_seconds = 0.0
    # the machine's load while something trained (not while cached runs were read back)
    trained = any(not r.get("cached") for r in runs + random_init)
    loads = [x for x in (load_start, _load()) if x] if trained else []
    for old in (load_result(path) for path in args.merge):
        seen = {(r["cohort"], r["variant"], r["seed"], r["steps"]) for r in runs}
        runs += [
            r for r in old["runs"] if (r["cohort"], r["variant"], r["seed"], r["steps"]) not in seen
        ]
        seen_init = {_init_id(r) for r in random_init}
        random_init += [r for r in old["random_init"] if _init_id(r) not in seen_init]
        for name, info in old.get("cohorts", {}).items():
            cohorts.setdefault(name, info)
        for name, overrides in old.get("variants", {}).items():
            variants.setdefault(name, overrides)
        merged_seconds += old.get("seconds") or 0
        loads += old.get("load_averages") or []
    return {
        "benchmark": "simclr_recipe",
        "cohorts": cohorts,
        "base_recipe": base,
        "variants": variants,
        "seeds": sorted({r["seed"] for r in runs}),
        "steps": sorted({r["steps"] for r in runs}),
        "device": args.device,
        "threads": args.threads,
        "probe": f"StandardScaler + LogisticRegression(C={args.probe_c}), {args.folds}-fold "
        f"GroupKFold by patient on up to {args.tiles_per_slide} tiles a slide; slide ceiling: "
        f"mean of a slide's top {args.top:.0%} tiles",
        "stain": stain_records,
        "random_init": random_init,
        "runs": runs,
        "summary": summarise(runs, random_init),
        "merged_from": [str(p) for p in args.merge],
        "load_averages": loads,
        "seconds": round(time.perf_counter() - t0 + merged_seconds, 1),
    }


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _log(what: str, entry: dict[str, Any]) -> None:
    if entry.get("status") != "ok":
        print(f"simclr_recipe: {what}: failed: {entry.get('error')}", file=sys.stderr, flush=True)
        return
    p, pre = entry["probe"], entry.get("pretrain") or {}
    loss = f", loss {pre['final_loss']} ({pre['over_chance']} × chance)" if pre else ""
    print(
        f"simclr_recipe: {what}: tumour tile {p['tumour_tile_auc']} slide "
        f"{p['tumour_slide_auc']}, lymphocyte tile {p['lymphocyte_tile_auc']}, erank "
        f"{p['effective_rank']}{loss} ({entry['seconds']} s"
        f"{', cached' if entry.get('cached') else ''})",
        file=sys.stderr,
        flush=True,
    )


def _define(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME='{{\"temperature\": 0.3}}'")
    try:
        overrides = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON: {err}") from None
    if not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object of overrides")
    return name, overrides


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 patients, 100 steps, 1 seed")
    parser.add_argument("--difficulty", default="hard", choices=["hard", "easy"])
    parser.add_argument("--patients", type=int, default=None, help="default 20 (quick 8)")
    parser.add_argument("--slide_mm", type=float, nargs=2, default=(2.5, 2.0), help="the demo's")
    parser.add_argument("--mpp", type=float, default=1.0, help="µm/px of a made tile store")
    parser.add_argument("--tiles", type=Path, default=None, help="an existing tile store")
    parser.add_argument("--cohort", type=Path, default=None, help="its synthetic cohort")
    parser.add_argument("--label", default=None, help="the cohort's name in the table")
    parser.add_argument(
        "--variants", nargs="*", default=None, choices=sorted(VARIANTS),
        help="named recipes (default: base temp05 …, quick: base demo)",
    )  # fmt: skip
    parser.add_argument(
        "--define", type=_define, action="append", default=[], metavar="NAME=JSON",
        help="another recipe: NAME='{\"temperature\": 0.3, \"augmentation\": {…}}'",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="0 1 2 (quick 0)")
    parser.add_argument("--steps", type=int, default=None, help="SimCLR steps: 1000 (quick 100)")
    parser.add_argument("--tiles-per-slide", type=int, default=None, help="600 (quick 200)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--probe-c", type=float, default=0.1, help="inverse L2 strength")
    parser.add_argument("--top", type=float, default=0.02, help="slide score: top share of tiles")
    parser.add_argument("--device", default="cpu", help="where SimCLR trains (probes: CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--work", type=Path, default=None, help="benchmarks/out/simclr_recipe")
    parser.add_argument("--fresh", action="store_true", help="redo cached runs")
    parser.add_argument(
        "--merge", type=Path, nargs="*", default=[],
        help="earlier outputs: their runs join this one's summary (e.g. another cohort)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    q = args.quick
    if (args.tiles is None) != (args.cohort is None):
        parser.error("--tiles and --cohort go together (the store and the cohort it tiles)")
    args.patients = args.patients or (8 if q else 20)
    args.slide_mm = tuple(args.slide_mm)
    if args.variants is None:
        args.variants = [] if args.define else (["base", "demo"] if q else list(FULL_VARIANTS))
    args.defined = dict(args.define)
    if clash := set(args.defined) & set(VARIANTS):
        parser.error(f"--define {sorted(clash)}: a named variant already; choose another name")
    args.seeds = args.seeds if args.seeds is not None else ([0] if q else [0, 1, 2])
    args.steps = args.steps or (100 if q else 1000)
    args.tiles_per_slide = args.tiles_per_slide or (200 if q else 600)
    args.work = args.work or Path("benchmarks/out") / (
        "simclr_recipe-quick" if q else "simclr_recipe"
    )
    try:
        for overrides in args.defined.values():
            recipe_for(overrides)
    except ValueError as err:
        parser.error(f"--define: {err}")
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        result = run(args)
    result["quick"] = q
    print(json.dumps(result), flush=True)
    return result


# -- report ---------------------------------------------------------------------------------


def _pm(stat: dict[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """``mean ± sd`` (just the mean for one seed; "–" without a figure)."""
    if not stat or stat.get("mean") is None:
        return "–"
    mean = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
    return mean if stat.get("sd") is None else f"{mean} ± {stat['sd']:.{digits}f}"


def _row_name(row: dict[str, Any]) -> str:
    if row["variant"] == "random init":
        stain = f", {row['stain'].capitalize()}" if row["stain"] else ""
        base = demo_recipe()["model"].get("encoder_kwargs") or {}
        kwargs = row.get("encoder_kwargs") or base
        arch = ", ".join(f"{k} {v}" for k, v in kwargs.items() if base.get(k) != v)
        return "random init (step 0)" + stain + (f", {arch}" if arch else "")
    return f"{row['variant']} ({describe(row.get('overrides') or {})})"


def recipe_table(r: dict[str, Any]) -> list[str]:
    """The markdown table: one row a cohort × variant, the random-init rows first."""
    lines = [
        "| cohort | recipe | seeds | tumour tile AUC | Δ vs random init | tumour slide AUC "
        "(top 2 %) | lymphocyte tile AUC | effective rank | final loss (× ln(2B−1)) | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cohorts = list(r.get("cohorts") or {})
    rows = sorted(
        r.get("summary", []),
        key=lambda x: (
            cohorts.index(x["cohort"]) if x["cohort"] in cohorts else len(cohorts),
            x["cohort"],
            x["variant"] != "random init",
            bool(x.get("stain")),
            x.get("steps") or 0,
        ),
    )
    for row in rows:
        loss = "–"
        if row.get("final_loss"):
            loss = f"{_pm(row['final_loss'], 2)} ({_pm(row.get('over_chance'), 2)})"
        seconds = row.get("seconds") or {}
        steps = f", {row['steps']} steps" if row.get("steps") else ""
        dim = (r.get("base_recipe") or {}).get("model", {}).get("encoder_kwargs", {})
        rank = _pm(row.get("effective_rank"), 1)
        rank += f" / {dim['embed_dim']}" if "embed_dim" in dim else ""
        lines.append(
            f"| {row['cohort']} | {_row_name(row)}{steps} | {len(row['seeds'])} "
            f"| {_pm(row.get('tumour_tile_auc'))} "
            f"| {_pm(row.get('tumour_tile_auc_vs_random'), signed=True)} "
            f"| {_pm(row.get('tumour_slide_auc'), 2)} "
            f"| {_pm(row.get('lymphocyte_tile_auc'))} | {rank} | {loss} "
            f"| {'–' if seconds.get('mean') is None else round(seconds['mean'])} |"
        )
    for entry in r.get("runs", []):
        if entry.get("status") != "ok":
            lines.append(
                f"| {entry.get('cohort')} | {entry.get('variant')}, seed {entry.get('seed')} "
                f"| failed: {tail(str(entry.get('error')), 120)} | | | | | | | |"
            )
    return lines


def _reading(r: dict[str, Any]) -> list[str]:
    """A few facts read off the summary: the best recipe per cohort, collapses, paired gains."""
    notes = []
    summary = r.get("summary", [])
    for cohort in r.get("cohorts") or sorted({x["cohort"] for x in summary}):
        trained = [x for x in summary if x["cohort"] == cohort and x.get("steps")]
        scored = [x for x in trained if (x.get("tumour_tile_auc") or {}).get("mean") is not None]
        if scored:
            best = max(scored, key=lambda x: x["tumour_tile_auc"]["mean"])
            delta = best.get("tumour_tile_auc_vs_random") or {}
            notes.append(
                f"on {cohort}, the best tumour tile AUC is {best['variant']}'s "
                f"{_pm(best['tumour_tile_auc'])} ({_pm(delta, signed=True)} against the same "
                f"seeds' random init, slide ceiling {_pm(best.get('tumour_slide_auc'), 2)})"
            )
        for x in trained:
            delta = x.get("tumour_tile_auc_vs_random") or {}
            if delta.get("n", 0) > 1 and delta.get("sd") and delta["mean"] > 2 * delta["sd"]:
                notes.append(
                    f"{x['variant']} beats the same seeds' random init on {cohort} by "
                    f"{_pm(delta, signed=True)} tumour tile AUC (mean > 2 sd of the paired "
                    "differences)"
                )
            chance = (x.get("over_chance") or {}).get("mean")
            if chance is not None and abs(chance - 1) <= CHANCE_MARGIN:
                notes.append(
                    f"{x['variant']} on {cohort} ends at chance ({chance:.2f} × ln(2B−1), the "
                    "loss of a constant embedding)"
                )
            elif chance is not None and chance > 1 + CHANCE_MARGIN:
                notes.append(
                    f"{x['variant']} on {cohort} ends above chance ({chance:.2f} × ln(2B−1)): "
                    "its two views of a tile are less alike than two different tiles"
                )
    return notes


def _load_text(r: dict[str, Any]) -> str:
    """The range of the 1-minute load averages recorded at the start of each run and at the
    start and end of each invocation that trained."""
    seen = [*(r.get("load_averages") or []), *(x.get("load_average") for x in r.get("runs", []))]
    ones = [x[0] for x in seen if x]
    if not ones:
        return ""
    return f" (1-minute load average {min(ones):.1f}–{max(ones):.1f} where recorded)"


def recipe_section(entry: dict[str, Any]) -> list[str]:
    """Setup, table and a reading of the recipe A/B."""
    r = entry["result"]
    lines = []
    if r.get("quick"):
        lines += ["*Quick run: a smoke test of the benchmark, not evidence.*", ""]
    cohorts = "; ".join(
        f"{name}: {c.get('patients')} patients, {c.get('slides')} slides ({c.get('normal_slides')} "
        f"normal), tumour {100 * (c.get('mean_tumour_fraction') or 0):.1f} % of a tumour "
        "slide's tissue, "
        f"{c.get('tiles'):,} tiles of {c.get('tile_size')} px at {c.get('mpp'):g} µm/px "
        f"({c.get('tiles_probed'):,} probed, {c.get('tumour_tiles_probed'):,} of them tumour)"
        for name, c in (r.get("cohorts") or {}).items()
    )
    base = r.get("base_recipe") or {}
    model = base.get("model", {})
    lines += [
        f"Synthetic cohorts ({cohorts}). Each recipe trains `histcode pretrain`'s SimCLR module "
        f"in memory on every tile of the store for {', '.join(map(str, r.get('steps', [])))} "
        "steps (batches drawn uniformly); the base is the demo's recipe until 11/2026 "
        f"({model.get('encoder')} "
        f"{model.get('encoder_kwargs')}, projection {model.get('projection_dim')}, "
        f"{model.get('optimizer')} lr {model.get('lr')}, weight decay "
        f"{model.get('weight_decay')}, {model.get('warmup_steps')} warm-up steps then cosine, "
        f"batch {base.get('batch_size')}, temperature {model.get('temperature')}, the default "
        f"augmentations) and each variant changes what its name says. Probe: {r.get('probe')}. "
        f"Random init (step 0): the same probe on the encoder's initial weights; Δ: the "
        f"variant minus the random init of the same seed (paired). Figures are mean ± sd "
        f"over seeds {r.get('seeds')} (initial weights, batches, augmentations; cohort, probe "
        f"tiles and folds fixed). Final loss: mean of the last {LAST_STEPS} steps, and its "
        "share of ln(2B−1), the loss of a constant embedding; the loss of perfectly aligned "
        "views and orthogonal tiles rises with the temperature (batch 32: 0.003 at 0.1, 2.24 at "
        "0.5, 3.17 at 1), so the shares compare only at one temperature. Seconds: training "
        f"only, on {r.get('threads')} thread(s) of the {r.get('device')}{_load_text(r)}.",
        "",
        *recipe_table(r),
    ]
    if notes := _reading(r):
        lines += ["", "Reading: " + "; ".join(notes) + "."]
    return lines


SPEC = Benchmark(
    name="simclr_recipe",
    what="SimCLR recipes A/B'd in memory by the ceiling's tile probe, against random init",
    args=["--variants", *FULL_VARIANTS, "--seeds", "0", "1", "2", "--steps", "1000"],
    quick=["--quick"],
    gpu=["--device", "cuda"],
    timeout=4 * 3600,
    order=95,
    goals=(
        "none: an A/B. A recipe counts when its tumour tile AUC beats the random init of the "
        "same seeds on the hard cohort by more than the seed spread",
    ),
    section=Section(
        "SimCLR recipes: what pretraining adds to the tile features",
        recipe_section,
        order=25,
    ),
)


if __name__ == "__main__":
    main()
