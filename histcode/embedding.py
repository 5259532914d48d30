"""Run a frozen encoder over every tile of a tile store and write a feature store.

DataLoader workers decode tiles straight from the slides (uint8, an LRU of open slides per
worker); the accelerator normalises and runs the encoder in batches under autocast (bf16 on
a GPU); features stream to ``features.zarr`` a chunk at a time, so memory stays flat whatever
the slide size. Finished slides are skipped on rerun, a partial slide is redone, and slides
that failed tiling are carried over as failed. ``--shard i/n`` splits the slides between
processes or hosts, which may write one store at once.

Where the stored JPEG tiles are decoded (``--decode``): with ``auto`` (the default), on the
GPU when the encoder runs on CUDA and nvImageCodec is installed (``pip install
'histcode[gpu]'``, or ``'histcode[gpu-cu12]'`` with a torch built for CUDA 12), else in the
workers on the CPU, as always, with the reason logged once and written in the result line
(``decode``, ``decode_reason``). On the device path the workers only read the stored tiles'
bytes (:func:`~histcode.tilereader.read_tile_streams`); each batch carries them once per
stored tile in pinned memory (:class:`~histcode.tilereader.StreamBatch`), and the main
process decodes them in one nvImageCodec call, pastes the tiles into the batch on the device
and box-averages those read from a finer level. Tiles the device path cannot take (slides
OpenSlide reads, windows over a level's edge, stain-normalised stores) are decoded on the
CPU as before. Before embedding, the main process checks the device's decoder on each slide:
a few of its stored tiles (4) are decoded on the device and on the CPU and compared
(:func:`~histcode.tiffjpeg.check_device_decode`); a slide whose pixels differ by more than
two JPEG decoders' rounding is decoded on the CPU with a warning naming it and the
difference (``auto``; counted in the result line's ``decode_fallbacks``), or stops the run
before any slide is embedded (``device``). The device path has not been measured on a GPU
yet; on CPU its plumbing and the check are tested with a stand-in decoder
(``tests/histcode/test_device_decode.py``).

Stain normalisation (``histcode tile --stain_norm``) is applied by the tile reader, so the
tiles embedded are those of the store; what matters is that they are like the tiles the
encoder was pretrained on. A registry encoder's card records its tiles' ``stain_norm``
(``extra.stain_norm``); when it differs from the store's, embedding is **refused** unless
``--allow_stain_mismatch true`` (:func:`check_stain`). Refusing, not warning: the features of
a whole cohort would be computed on colours the encoder never saw — and finetuning,
heatmaps and every figure downstream would inherit that — while a warning scrolls past in
a long run; the fix (retile into another store, or state the override) takes a minute.
Where the card does not record it (cards made before histcode could normalise) and the store
is normalised, embedding goes ahead with a warning, in the log and in the result's
``warnings``: that encoder was most likely pretrained on tiles as scanned, but its card does
not say so. Zoo encoders (random, ImageNet or foundation-model weights) were not pretrained
on a tile store: nothing to compare. The feature store's root attrs record ``stain_norm``
(the tiles'), ``encoder_stain_norm`` (the card's, or null) and ``stain_mismatch`` (true when
embedding went ahead with a stain warning).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from histcode.builders import UnknownNameError
from histcode.commandkit import EXIT_OK, EXIT_PARTIAL, CommandResult, adapter, run_function
from histcode.encoders import Encoder, create_encoder, encoders
from histcode.featurestore import FeatureStore
from histcode.registry import Registry
from histcode.slide import SlideError, open_slide
from histcode.tilereader import (
    StreamBatch,
    TileDataset,
    TileIndex,
    collate_tiles,
    default_workers,
    read_tile_streams,
    sample_stored_tiles,
)
from histcode.tilestore import TileStore

log = logging.getLogger(__name__)


@dataclass
class LoadedEncoder:
    """An encoder ready to embed, and where it came from.

    Attributes:
        module: the encoder, in eval mode.
        ref: ``registry:name@N``, or ``zoo:name`` (random weights, with the seed), or
            ``zoo:name+file:path`` (local weights).
        sha256: identity of the weights (the registry card's, else a hash of the state).
        embed_dim: embedding size ``D``.
        stain_norm: the stain normalisation of the tiles it was pretrained on, as its card
            records (``extra.stain_norm``); None when not recorded (a zoo encoder, or a card
            from before histcode recorded it).
        registered: whether it came from the registry (else the zoo).
    """

    module: Encoder
    ref: str
    sha256: str
    embed_dim: int
    stain_norm: str | None = None
    registered: bool = False


def state_sha256(module: nn.Module) -> str:
    """A hash of a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(
            t.numpy().tobytes()
            if t.dtype != torch.bfloat16
            else t.view(torch.int16).numpy().tobytes()
        )
    return digest.hexdigest()


def load_encoder(
    encoder: str,
    *,
    mpp: float,
    tile_size: int,
    weights: str | None = None,
    registry: Registry | None = None,
    seed: int = 0,
    source: str = "tile store",
) -> LoadedEncoder:
    """Resolve ``--encoder``: a registry ref first, else a zoo name (random or local weights).

    Args:
        encoder: ``name``, ``name@3``, ``name@latest`` in the registry, or a zoo name
            (``resnet50_trunc``, ``timm:…``) for baselines.
        mpp: µm/px of the tiles to embed.
        tile_size: tile side of the tiles to embed.
        weights: a local weights file for a zoo encoder (ImageNet, a foundation model).
        registry: where registry refs are looked up (default root if None).
        seed: seed of random weights for a zoo encoder without ``weights``.
        source: what the tiles come from, for messages.

    Raises:
        ValueError: a registry encoder made for other tiles (says what differs).
        KeyError: neither a registry ref nor a zoo name (lists both).
    """
    registry = registry or Registry()
    in_registry = weights is None and (
        "@" in encoder or (registry.root.is_dir() and encoder in registry.names())
    )
    if in_registry:
        module, card = registry.load(encoder)
        spec = getattr(module, "input_spec", None) or card.input_spec
        if spec is not None:
            spec.check(mpp=mpp, tile_size=tile_size, source=source)
        module.eval()
        return LoadedEncoder(
            module,
            f"registry:{card.name}@{card.version}",
            card.sha256,
            int(module.embed_dim),
            stain_norm=card.extra.get("stain_norm"),
            registered=True,
        )
    name = encoder.removeprefix("zoo:")
    if name not in encoders and not name.startswith("timm:"):
        known = registry.names() if registry.root.is_dir() else []
        raise UnknownNameError(
            f"--encoder {encoder!r} is neither in the registry at {registry.root} (which has: "
            f"{', '.join(known) or 'nothing'}) nor an encoder of the zoo "
            f"({', '.join(encoders.names())}). Pretrain one with `histcode pretrain`, or pass "
            "a zoo name for a baseline."
        )
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"mpp": mpp, "tile_size": tile_size}
    if weights is not None:
        kwargs["weights"] = weights
    module = create_encoder(name, **kwargs).eval()
    if weights is None:
        log.warning(
            "encoder %s has random weights (seed %d): a baseline, not a trained model", name, seed
        )
        ref = f"zoo:{name}#random-seed={seed}"
    else:
        ref = f"zoo:{name}+file:{Path(weights).resolve()}"
    return LoadedEncoder(module, ref, state_sha256(module), int(module.embed_dim))


def check_stain(
    loaded: LoadedEncoder, stain_norm: str, tiles: Path | str, allow_mismatch: bool = False
) -> str | None:
    """Check that the tiles' stain normalisation is the one the encoder was pretrained on.

    Args:
        loaded: the encoder (its card's ``stain_norm``).
        stain_norm: the tile store's (``none`` | ``macenko``).
        tiles: the tile store, for messages.
        allow_mismatch: embed despite a recorded mismatch (``--allow_stain_mismatch``).

    Returns:
        A warning to log and report, or None when the two agree (or there is nothing to
        compare: a zoo encoder).

    Raises:
        ValueError: the card records another setting than the store's and ``allow_mismatch``
            is false; the message names both and the fix.
    """
    if not loaded.registered:
        return None
    if loaded.stain_norm is None:
        if stain_norm == "none":
            return None
        return (
            f"the card of {loaded.ref} does not record the stain normalisation of its "
            f"pretraining tiles (made before histcode recorded it: most likely tiles as "
            f"scanned), but {tiles} is stain-normalised ({stain_norm}); its features may be "
            "off. Pretrain an encoder on this store for a sure match."
        )
    if loaded.stain_norm == stain_norm:
        return None
    said = (
        f"the encoder {loaded.ref} was pretrained on tiles with stain_norm "
        f"{loaded.stain_norm!r}, but {tiles} has stain_norm {stain_norm!r}"
    )
    if allow_mismatch:
        return f"{said}; embedding anyway (--allow_stain_mismatch): features may be off"
    raise ValueError(
        f"{said}: its features would describe colours it never saw. Embed tiles made like its "
        f"training tiles (`histcode tile --stain_norm {loaded.stain_norm} --out NEW.zarr`), "
        "or pass --allow_stain_mismatch true to embed these anyway (recorded in the feature "
        "store and the result)."
    )


def _collate(
    items: list[tuple[torch.Tensor, int, str, Any]],
) -> tuple[torch.Tensor, torch.Tensor, list, StreamBatch | None]:
    tiles, idx, errors, streams = zip(*items, strict=True)
    on_device = [(k, s) for k, s in enumerate(streams) if s is not None]
    batch = StreamBatch.from_tiles(on_device) if on_device else None
    return collate_tiles(tiles), torch.tensor(idx), list(errors), batch


class _SafeTiles(TileDataset):
    """Tiles plus their flat index, read error ("" when fine) and, for the slides marked in
    ``device_slides``, their stored JPEG tiles to decode on the device
    (:func:`read_tile_streams`; then the tile itself is left zero) or None (decoded here). A
    damaged tile fails its slide, not the run."""

    def __init__(self, index: TileIndex, device_slides: np.ndarray | None = None) -> None:
        super().__init__(index)
        self.device_slides = device_slides

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str, Any]:  # type: ignore[override]
        size = self.index.tile_size
        try:
            if self.device_slides is not None:
                s, geometry, reader = self.reader_of(i)
                if self.device_slides[s] and self.index.normalisers[s] is None:
                    streams = read_tile_streams(reader, geometry, self.index.coords[i], size)
                    if streams is not None:
                        return torch.zeros(3, size, size, dtype=torch.uint8), i, "", streams
            return super().__getitem__(i), i, "", None
        except SlideError as err:
            return torch.zeros(3, size, size, dtype=torch.uint8), i, str(err), None


def choose_decode(decode: str, dev: torch.device, stain_norm: str = "none") -> tuple[bool, str]:
    """Whether ``histcode embed`` decodes stored JPEG tiles on the device, and why not.

    Args:
        decode: ``auto`` (on the device where it can), ``cpu`` or ``device`` (refuse
            otherwise).
        dev: the device the encoder runs on.
        stain_norm: the tile store's stain normalisation (it runs on the CPU, on decoded
            tiles, so a normalised store is decoded there).

    Returns:
        (on the device, the reason when not).

    Raises:
        ValueError: ``decode`` is none of the three, or ``device`` where it cannot be; the
            message says what to install or change.
    """
    if decode not in ("auto", "cpu", "device"):
        raise ValueError(f"--decode {decode!r}: expected auto, cpu or device")
    if decode == "cpu":
        return False, "--decode cpu"
    if stain_norm != "none":
        why = (
            f"the tile store is stain-normalised ({stain_norm}), which runs on the CPU on "
            "decoded tiles"
        )
    else:
        from histcode.tiffjpeg import device_decoder_available

        why = device_decoder_available(dev)[1]
    if why and decode == "device":
        from histcode.tiffjpeg import nvimgcodec_hint

        hint = nvimgcodec_hint(torch.version.cuda)
        install = "" if hint in why else f"Install nvImageCodec ({hint}) and "
        raise ValueError(
            f"--decode device: {why}. {install}run on a CUDA device (--device cuda), or pass "
            "--decode auto to decode on the device only where it can."
        )
    return not why, why


class DecodeMismatchError(ValueError):
    """``--decode device``, and the device's decoder gives a slide's stored tiles other pixels
    than the CPU's (the message names the slide and the difference)."""


#: Stored tiles of each slide decoded on the device and on the CPU before the slide is
#: decoded on the device (:func:`_check_device_decoding`).
DECODE_CHECK_TILES = 4


def _check_device_decoding(
    index: TileIndex, decoder: Any, strict: bool, report: EmbedReport
) -> np.ndarray:
    """Which slides the device decodes: those whose sampled stored tiles it decodes to the
    CPU's pixels within decoder rounding (:func:`histcode.tiffjpeg.check_device_decode`).

    The others are decoded on the CPU, each with a warning naming it and the difference,
    recorded in ``report.decode_fallbacks`` (and, counted, in ``report.warnings``); with
    ``strict`` (``--decode device``) the first of them stops the run instead. Slides none of
    whose tiles the device path would take (read by OpenSlide, stain-normalised) are
    decoded on the CPU without a check, and so are slides that cannot be opened or whose
    sampled stored tiles the CPU cannot decode either (the workers then fail them with the
    reason). Costs opening each slide once more and decoding :data:`DECODE_CHECK_TILES`
    stored tiles on each side (the slides are opened and read on 4 threads).

    Raises:
        DecodeMismatchError: ``strict`` and a slide fails the check.
    """
    from concurrent.futures import ThreadPoolExecutor

    from histcode.tiffjpeg import check_device_decode

    on_device = np.zeros(len(index.slides), bool)

    def sample(s: int) -> list[tuple[bytes, np.ndarray]]:
        geometry = index.slides[s]
        if index.normalisers[s] is not None:
            return []
        try:
            with open_slide(geometry.path, mpp_override=geometry.mpp_override) as reader:
                coords = index.coords[index.slide_range(s)]
                picked = sample_stored_tiles(
                    reader, geometry, coords, index.tile_size, DECODE_CHECK_TILES
                )
                return [
                    (
                        reader.stored_stream(geometry.level, k),  # type: ignore[attr-defined]
                        reader.decode_stored(geometry.level, k),  # type: ignore[attr-defined]
                    )
                    for k in picked
                ]
        except (SlideError, OSError, ValueError):
            return []  # the workers read it on the CPU and report what is wrong

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="histcode-decode-check") as pool:
        chunk = 32  # slides sampled ahead of the device's checks (bounds the memory held)
        for first in range(0, len(index.slides), chunk):
            todo = range(first, min(first + chunk, len(index.slides)))
            for s, tiles in zip(todo, pool.map(sample, todo), strict=True):
                if not tiles:
                    continue
                streams, reference = zip(*tiles, strict=True)
                check = check_device_decode(decoder, streams, reference)
                if check.ok:
                    on_device[s] = True
                    continue
                sid = index.slides[s].slide_id
                if strict:
                    raise DecodeMismatchError(
                        f"--decode device: nvImageCodec does not decode the stored JPEG tiles "
                        f"of slide {sid} as libjpeg-turbo (the CPU path's decoder) does: "
                        f"{check.describe()}; its features would not be the CPU path's. Embed "
                        "with --decode cpu, or with --decode auto, which decodes such slides "
                        "on the CPU with a warning. Nothing was embedded."
                    )
                log.warning(
                    "%s: decoded on the CPU, since nvImageCodec's pixels of its stored JPEG "
                    "tiles are not libjpeg-turbo's: %s",
                    sid,
                    check.describe(),
                )
                report.decode_fallbacks.append(
                    {
                        "slide_id": sid,
                        "mean_abs": round(check.mean_abs, 3),
                        "max_abs": check.max_abs,
                        "reason": check.describe(),
                    }
                )
    log.info(
        "checked the device's JPEG decoding on %d slides in %.1f s: %d decoded on the "
        "device, %d fell back to the CPU",
        len(index.slides),
        time.perf_counter() - start,
        int(on_device.sum()),
        len(report.decode_fallbacks),
    )
    if report.decode_fallbacks:
        first = report.decode_fallbacks[0]
        report.warnings.append(
            f"{len(report.decode_fallbacks)} slide(s) decoded on the CPU: nvImageCodec's "
            f"pixels of their stored JPEG tiles were not libjpeg-turbo's (first, "
            f"{first['slide_id']}: {first['reason']}); see decode_fallbacks in summary.json"
        )
        if not on_device.any():
            report.decode = "cpu"
            report.decode_reason = (
                "nvImageCodec's pixels were not libjpeg-turbo's on every slide checked"
            )
    return on_device


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 ≤ i < n."""
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard {shard!r}: expected i/n, e.g. 0/4 (shard 0 of 4)") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {shard!r}: need 0 ≤ i < n")
    return i, n


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here; use --device cpu")
    return torch.device(device)


@dataclass
class EmbedReport:
    """What an embedding run did, slide by slide."""

    store: Path
    encoder_ref: str
    slides: list[dict[str, Any]] = field(default_factory=list)
    tiles_embedded: int = 0
    seconds_embedding: float = 0.0
    stain_norm: str = "none"
    encoder_stain_norm: str | None = None
    warnings: list[str] = field(default_factory=list)
    decode: str = "cpu"
    decode_reason: str = ""
    tiles_decoded_on_device: int = 0
    decode_fallbacks: list[dict] = field(default_factory=list)


def embed_store(
    tiles: Path | str,
    out: Path | str,
    encoder: str,
    weights: str | None = None,
    registry: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    dtype: Literal["float32", "float16"] = "float32",
    device: str = "auto",
    precision: Literal["auto", "32", "bf16"] = "auto",
    shard: str = "0/1",
    seed: int = 0,
    overwrite: bool = False,
    allow_stain_mismatch: bool = False,
    decode: Literal["auto", "cpu", "device"] = "auto",
    progress: bool = True,
) -> EmbedReport:
    """Run a frozen encoder over every tile of a tile store and write features.zarr.

    Tiles are read straight from the slides at the tile store's pyramid level (stain-
    normalised when the store was tiled with --stain_norm); features are streamed to zarr per
    slide. Rerunning skips finished slides and redoes partial ones; slides that failed tiling
    are carried over as failed (exit status 1). An encoder whose card says it was pretrained
    on tiles with another --stain_norm than the store's is refused (see
    --allow_stain_mismatch).

    Args:
        tiles: the tile store (from ``histcode tile``).
        out: the feature store to write (zarr v3 folder, e.g. features.zarr).
        encoder: a registry ref (``name``, ``name@3``, ``name@latest``), or for baselines a
            zoo name (``resnet18``, ``resnet50_trunc``, ``tiny``, ``timm:…``) with random
            weights or the local ``--weights`` file. Registry names win over zoo names.
        weights: local weights file for a zoo encoder (ImageNet or foundation-model weights).
        registry: registry folder (default: $HISTCODE_REGISTRY, else ./registry).
        batch_size: tiles per forward pass.
        workers: DataLoader worker processes decoding tiles (0 reads in the main process;
            default: every core but one on a GPU, half the cores on CPU).
        dtype: storage type of the features.
        device: ``auto`` (a GPU when there is one), ``cpu`` or ``cuda[:N]``.
        precision: ``auto`` (bf16 autocast on a GPU, float32 on CPU), ``32`` or ``bf16``.
        shard: ``i/n`` embeds every n-th slide starting at i; shards may run at once, on
            several hosts, into one store; their union equals an unsharded run.
        seed: seed of the random weights of a zoo encoder without ``--weights``.
        overwrite: replace an existing store's slides (and its encoder).
        allow_stain_mismatch: embed with an encoder pretrained on tiles of another stain
            normalisation than the store's (its card's stain_norm vs the store's): refused
            otherwise, since its features would describe colours it never saw. The mismatch
            is logged, listed under 'warnings' in the result line and recorded in the feature
            store's attrs (stain_mismatch).
        decode: where the stored JPEG tiles of Aperio SVS and generic TIFF slides are
            decoded: ``auto`` on the GPU when the encoder runs on CUDA and nvImageCodec is
            installed (``pip install 'histcode[gpu]'``), else on the CPU with the reason
            logged; ``cpu`` always in the loader's workers; ``device`` on the GPU or refuse.
            Tiles of other slides, and of stain-normalised stores, are decoded on the CPU.
            On the GPU, each slide is checked first: 4 of its stored tiles are decoded there
            and on the CPU, and a slide whose pixels differ by more than decoder rounding
            (mean |Δ| > 3 or max |Δ| > 64 of 255) is decoded on the CPU with a warning
            naming it and the difference (``auto``; counted in the result line's
            decode_fallbacks, listed in summary.json), or stops the run before anything is
            embedded (``device``; exit 2: use --decode cpu or auto). Decoding on the device
            has not been measured on a GPU yet.
        progress: show a progress bar.

    Returns:
        Each slide's status and error, the tiles embedded and the stain settings.
    """
    if batch_size < 1 or (workers is not None and workers < 0):
        raise ValueError(
            f"--batch_size {batch_size} / --workers {workers}: expected batch_size ≥ 1 and "
            "workers ≥ 0 (or leave --workers out for one per core)"
        )
    shard_i, shard_n = parse_shard(shard)
    tile_store = TileStore(tiles)
    root = tile_store.attrs
    if not tile_store.slide_ids():
        raise ValueError(
            f"{tile_store.path} holds no slides (an empty tile store, or an interrupted tiling "
            f"run): tile some with `histcode tile --slides … --out {tile_store.path}`, then "
            "embed again"
        )
    dev = pick_device(device)
    on_device, why = choose_decode(decode, dev, tile_store.stain_norm)
    if not on_device:  # once a run; a warning where a GPU waits for the CPU's decoding
        say = log.warning if dev.type == "cuda" and decode == "auto" else log.info
        say("stored JPEG tiles are decoded on the CPU: %s", why)
    if workers is None:
        workers = default_workers(dev.type == "cuda")
    loaded = load_encoder(
        encoder,
        mpp=root["mpp"],
        tile_size=root["tile_size"],
        weights=weights,
        registry=Registry(registry) if registry else None,
        seed=seed,
        source=str(tile_store.path),
    )
    stain_norm = tile_store.stain_norm
    stain_warning = check_stain(loaded, stain_norm, tile_store.path, allow_stain_mismatch)
    if stain_warning is not None:
        log.warning("%s", stain_warning)
    store = FeatureStore(out)
    attrs = {
        "encoder_ref": loaded.ref,
        "encoder_sha256": loaded.sha256,
        "embed_dim": loaded.embed_dim,
        "input_spec": loaded.module.input_spec.to_dict(),
        "tiles": str(tile_store.path.resolve()),
        "tiles_fingerprint": tile_store.fingerprint(),
        "mpp": root["mpp"],
        "tile_size": root["tile_size"],
        "dtype": dtype,
        "stain_norm": stain_norm,
        "encoder_stain_norm": loaded.stain_norm,
        "stain_mismatch": stain_warning is not None,
    }
    report = EmbedReport(
        store.path,
        loaded.ref,
        stain_norm=stain_norm,
        encoder_stain_norm=loaded.stain_norm,
        warnings=[stain_warning] if stain_warning else [],
        decode="device" if on_device else "cpu",
        decode_reason=why,
    )
    # the run's lock first (a refused run changes nothing), then shards starting together take
    # turns to create or check the root attrs
    with store.lock(f"shard{shard_i}of{shard_n}" if shard_n > 1 else ""):
        with store.setup_lock():
            store.initialise(attrs, overwrite=overwrite and shard_n == 1)
        all_ids = tile_store.slide_ids()
        mine = [sid for k, sid in enumerate(all_ids) if k % shard_n == shard_i]
        todo: list[str] = []
        for sid in mine:
            done = None if overwrite else store.status(sid)
            if done in ("ok", "empty"):
                report.slides.append(
                    {
                        "slide_id": sid,
                        "status": done,
                        "skipped": True,
                        "tiles": int(store.group(sid).attrs.get("n_tiles", 0)),
                        "error": None,
                    }
                )
                continue
            tiles_of = tile_store.read(sid)
            base = {"path": str(tiles_of.path), "error": None}
            if tiles_of.status == "ok":
                todo.append(sid)
            else:  # empty slides and slides that failed tiling are carried over
                error = (
                    None
                    if tiles_of.status == "empty"
                    else (f"tiling failed: {tiles_of.attrs.get('error')}")
                )
                store.write_empty(
                    sid,
                    loaded.embed_dim,
                    dtype,
                    {**base, "status": tiles_of.status, "error": error},
                )
                report.slides.append(
                    {
                        "slide_id": sid,
                        "status": tiles_of.status,
                        "skipped": False,
                        "tiles": 0,
                        "error": error,
                    }
                )
        if todo:
            start = time.perf_counter()
            _embed_slides(
                tile_store,
                store,
                todo,
                loaded,
                report,
                batch_size,
                workers,
                dtype,
                dev,
                precision,
                progress,
                on_device,
                strict=decode == "device",
            )
            report.seconds_embedding = time.perf_counter() - start
    report.slides.sort(key=lambda s: s["slide_id"])
    return report


def _embed_slides(
    tile_store: TileStore,
    store: FeatureStore,
    slide_ids: Sequence[str],
    loaded: LoadedEncoder,
    report: EmbedReport,
    batch_size: int,
    workers: int,
    dtype: str,
    dev: torch.device,
    precision: str,
    progress: bool,
    on_device: bool = False,
    strict: bool = False,
) -> None:
    index = TileIndex(tile_store, slide_ids)
    module = loaded.module.to(dev)
    cuda = dev.type == "cuda"
    if cuda:
        module = module.to(memory_format=torch.channels_last)
    use_bf16 = precision == "bf16" or (precision == "auto" and cuda)
    spec = module.input_spec
    mean = torch.tensor(spec.mean, device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=dev).view(1, 3, 1, 1) * 255
    decoder, device_slides = None, None
    if on_device:
        from histcode.tiffjpeg import DeviceDecoder

        decoder = DeviceDecoder(dev)
        device_slides = _check_device_decoding(index, decoder, strict, report)
    loader = DataLoader(
        _SafeTiles(index, device_slides),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=cuda,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    threads_before = torch.get_num_threads()
    if not cuda and workers:
        # on CPU the encoder gets the cores the decoding workers leave: oversubscribed
        # cores stall torch's threads (measured: 238 vs 174 tiles/s on 2 cores, 1 worker)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - workers))
    try:
        _run_batches(
            loader,
            index,
            module,
            store,
            loaded,
            report,
            dtype,
            dev,
            cuda,
            use_bf16,
            mean,
            std,
            progress,
            decoder,
        )
    finally:
        torch.set_num_threads(threads_before)


def _run_batches(
    loader: DataLoader,
    index: TileIndex,
    module: nn.Module,
    store: FeatureStore,
    loaded: LoadedEncoder,
    report: EmbedReport,
    dtype: str,
    dev: torch.device,
    cuda: bool,
    use_bf16: bool,
    mean: torch.Tensor,
    std: torch.Tensor,
    progress: bool,
    decoder: Any = None,
) -> None:
    """Forward every batch and stream each slide's features to its writer; with a
    ``decoder`` (:class:`histcode.tiffjpeg.DeviceDecoder`), first decode the batch's stored
    JPEG tiles on the device into it."""
    writers: dict[int, Any] = {}
    errors: dict[int, str] = {}
    bar = tqdm(
        total=len(index),
        desc="embedding",
        unit="tile",
        disable=not progress,
        file=sys.stderr,
        smoothing=0.05,
    )

    def finish(s: int) -> None:
        sid = index.slides[s].slide_id
        writer = writers.pop(s)
        base = {"path": index.slides[s].path}
        if s in errors:
            log.error("%s failed: %s", sid, errors[s])
            store.write_empty(
                sid, loaded.embed_dim, dtype, {**base, "status": "failed", "error": errors[s]}
            )
            report.slides.append(
                {
                    "slide_id": sid,
                    "status": "failed",
                    "skipped": False,
                    "tiles": 0,
                    "error": errors[s],
                }
            )
        else:
            writer.close()
            n = len(index.slide_range(s))
            store.commit(writer.group, sid, {**base, "status": "ok", "error": None, "n_tiles": n})
            report.slides.append(
                {"slide_id": sid, "status": "ok", "skipped": False, "tiles": n, "error": None}
            )
        # a failed slide's staging group is dropped with the writer; the lock cleans leftovers

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autocast.*")
        for batch, idx, errs, streams in loader:
            x = batch.to(dev, non_blocking=True)
            if streams is not None:
                failed = streams.paste(x, decoder)
                for position, error in failed.items():
                    errs[position] = errs[position] or error
                report.tiles_decoded_on_device += len(streams) - len(failed)
            x = x.float().sub_(mean).div_(std)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                feats = module(x)
            feats = feats.float().cpu().numpy().astype(dtype, copy=False)
            idx = idx.numpy()
            slide_of = index.slide_of[idx]
            for s in np.unique(slide_of):
                rows = slide_of == s
                if s not in writers:
                    writers[s] = store.writer(
                        index.slides[s].slide_id,
                        index.coords[index.slide_range(s)],
                        loaded.embed_dim,
                        dtype,
                    )
                bad = [e for e, r in zip(errs, rows, strict=True) if r and e]
                if bad and s not in errors:
                    errors[s] = bad[0]
                writer = writers[s]
                if s not in errors:
                    writer.append(feats[rows])
                last = int(idx[rows].max())
                if last == index.slide_range(s)[-1]:
                    finish(s)
            report.tiles_embedded += len(idx)
            bar.update(len(idx))
    bar.close()
    if decoder is not None and report.tiles_decoded_on_device < report.tiles_embedded:
        log.info(
            "%d of %d tiles were decoded on the CPU (slides or levels OpenSlide reads, "
            "slides that failed the decoder check, windows over a level's edge, missing "
            "stored tiles)",
            report.tiles_embedded - report.tiles_decoded_on_device,
            report.tiles_embedded,
        )


def _embed_outcome(report: EmbedReport, shard: str, **_: Any) -> CommandResult:
    """``histcode embed``'s result line, summary details and exit status."""
    counts = Counter(s["status"] for s in report.slides)
    failed = [s["slide_id"] for s in report.slides if s["status"] == "failed"]
    result = {
        "out": str(report.store),
        "encoder": report.encoder_ref,
        "slides": len(report.slides),
        **{k: counts.get(k, 0) for k in ("ok", "empty", "failed")},
        "skipped": sum(s["skipped"] for s in report.slides),
        "tiles_embedded": report.tiles_embedded,
        "tiles_per_s": round(report.tiles_embedded / report.seconds_embedding, 1)
        if report.seconds_embedding
        else None,
        "failed_slides": failed,
        "stain_norm": report.stain_norm,
        "encoder_stain_norm": report.encoder_stain_norm,
        "warnings": report.warnings,
        "decode": report.decode,
        "decode_reason": report.decode_reason or None,
        "tiles_decoded_on_device": report.tiles_decoded_on_device,
        "decode_fallbacks": len(report.decode_fallbacks),
    }
    i, n = parse_shard(shard)
    return CommandResult(
        report.store,
        result,
        {"slides": report.slides, "decode_fallbacks": report.decode_fallbacks},
        EXIT_PARTIAL if failed else EXIT_OK,
        summary_name="summary.json" if n == 1 else f"summary-shard{i}of{n}.json",
    )


#: ``histcode embed``: :func:`embed_store` as a command.
embed = adapter(embed_store, _embed_outcome)


def main(argv: Sequence[str], prog: str = "histcode embed") -> int:
    """``histcode embed``."""
    return run_function(embed, argv, prog, "embed")
