"""draw attention and per-gene tile maps of a MIL model over a slide (PNG, montage, GeoJSON).

``histcode heatmap --model REF --features features.zarr --slide PATH --out DIR``

For one slide, the registered slide model scores every tile: its attention (aggregators that
have one), drawn as a multiple of uniform (attention × n tiles, 1 = every tile alike), and
each tile's score for each prediction — the tumour logit and each gene's log2FC and up-class
logit. What a tile score is depends on the aggregator, and every output says which
(:data:`~histcode.finetune.maps.TILE_SCORES`): an exact contribution (attention × head on
the tile's embedding, adding up to the slide prediction: abmil, clam_sb, mean, linear), an
approximate one (the transformer's CLS attention × head) or the tile's own prediction (max
pooling).

Writes, per map, the slide thumbnail beside the scores over it with a colour bar; a montage
of the top-k and bottom-k tiles of the main map; a GeoJSON of the tiles with every score as a
QuPath measurement; a CSV of the scores. With ``--truth`` (a synthetic cohort's
``truth/<slide>.npz``) it also reports how well the maps find the true tumour and lymphocyte
regions (AUROC).

Maps are honest only on slides the model never saw. The registry card lists the patients
(and slides) a model was trained and validated on; every output says whether this slide was
one of them (``seen_in_training``: true, false, or null when the card does not say), and
``--truth`` refuses to score a seen slide unless ``--allow_in_sample true``.

The command only ties three parts together: :mod:`histcode.finetune.maps` computes the maps
from the model, :mod:`histcode.mapdrawing` (the core) draws and writes them, and
:mod:`histcode.synth.scoring` scores them against a synthetic cohort's truth masks.
:func:`heatmap` runs its steps in order: :func:`open_source` (model, stores, slide, checked),
:func:`_check_truth_allowed`, :func:`_compute`, :func:`_genes_to_draw`, :func:`_draw` (PNGs),
:func:`_write_tables` (GeoJSON, CSV) and :func:`_score_truth`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histcode.commandkit import CommandResult
from histcode.featurestore import FeatureStore
from histcode.finetune.heads import slide_model_builders
from histcode.finetune.maps import SlideMaps, TrainingRole, map_title, slide_maps, training_role
from histcode.mapdrawing import (
    draw_heatmap,
    draw_montage,
    tiles_geojson,
    write_geojson,
    write_tile_scores_csv,
)
from histcode.registry import Registry
from histcode.slide import SlideError, SlideReader, slide_id
from histcode.tilereader import SlideGeometry
from histcode.tilestore import SlideTiles, TileStore

log = logging.getLogger(__name__)

#: genes drawn as PNG when --genes is not given, at most this many (all are in the GeoJSON)
DEFAULT_MAX_GENE_MAPS = 8

#: colour bar label of the attention map
ATTENTION_LABEL = "attention × n tiles (1 = uniform)"


@dataclass(frozen=True)
class MapSource:
    """What one slide's maps are made from, checked: the model, the slide and its stores.

    Attributes:
        net: the slide model, in eval mode.
        card: its registry card.
        model: the model as ``--model`` named it.
        ref: its registry ref (``name@version``).
        features: the feature store.
        store: the open feature store.
        attrs: its root attributes (encoder, tile size, tile store).
        sid: the slide id.
        slide_path: the slide file that was tiled.
        tiles: the slide's tiles in the tile store.
        role: whether the model saw the slide in training.
    """

    net: Any
    card: Any
    model: str
    ref: str
    features: Path
    store: FeatureStore
    attrs: dict[str, Any]
    sid: str
    slide_path: Path
    tiles: SlideTiles
    role: TrainingRole

    @property
    def per_task(self) -> bool:
        """The aggregator has one attention per task (the tumour's is ``attention``)."""
        return getattr(self.net.aggregator, "branches", 1) > 1

    @property
    def seen(self) -> dict[str, Any]:
        """``seen_in_training`` and ``training_role``, as every output states them."""
        return {"seen_in_training": self.role.seen, "training_role": self.role.role}


def check_lineage(card: Any, store_attrs: dict[str, Any], model_ref: str, features: Path) -> None:
    """Refuse features from another encoder than the one the model was trained on.

    The card's lineage (:class:`~histcode.lineage.Parent`) names the feature store the model
    was trained on and its encoder's sha256 (``attrs["encoder_sha256"]``); a card without one
    (trained on features of an unknown encoder) is not refused.

    Raises:
        ValueError: the model's lineage names another encoder (sha256), or the feature
            sizes differ; says how to fix.
    """
    sha = store_attrs.get("encoder_sha256")
    trained_on = [p for p in card.lineage if p.kind == "features" and p.attrs.get("encoder_sha256")]
    if sha and trained_on and all(p.attrs["encoder_sha256"] != sha for p in trained_on):
        raise ValueError(
            f"{model_ref} was trained on features of another encoder than {features}'s "
            f"({store_attrs.get('encoder_ref')}); its lineage: {trained_on[0]}. Embed the "
            "slides with the model's encoder, or pick a model trained on these features."
        )
    in_dim = card.arguments.get("in_dim")
    if in_dim is not None and int(in_dim) != int(store_attrs.get("embed_dim", in_dim)):
        raise ValueError(
            f"{model_ref} takes {in_dim}-d features; {features} holds "
            f"{store_attrs.get('embed_dim')}-d ones"
        )


def resolve_slide(slide: str, store: FeatureStore, tile_store: TileStore) -> tuple[str, Path]:
    """The slide id and the slide file of ``--slide``, checked against the tile store.

    ``--slide`` is a slide file, or a slide id of the feature store (then the file is the
    one the tile store recorded). Either way the file must be the scan that was tiled: its
    fingerprint (:func:`histcode.slide.fingerprint`) must equal the tile store's.

    Raises:
        FileNotFoundError: ``--slide`` is neither a file nor a slide id of the store, or the
            file the tile store recorded is gone.
        ValueError: the file is not the scan that was tiled (another fingerprint), or not a
            slide at all.
    """
    path = Path(slide)
    if path.is_file():
        sid = slide_id(path)
    elif _plain_id(slide) and store.status(slide) is not None:
        sid = slide
    else:
        held = store.slide_ids()
        shown = ", ".join(held[:5]) + (" …" if len(held) > 5 else "")
        raise FileNotFoundError(
            f"--slide {slide}: no such slide file, and no slide id {slide!r} in {store.path} "
            f"(it holds: {shown or 'none'}). Pass the slide file that was tiled, or one of "
            "those slide ids."
        )
    tiles = tile_store.read(sid)  # KeyError naming what the store holds
    if not path.is_file():
        path = tiles.path
        if not path.is_file():
            raise FileNotFoundError(
                f"the tile store {tile_store.path} records {path} for {sid}, but there is no "
                "such file (moved or deleted?); pass --slide with the slide file's current path"
            )
    check_scan(path, tiles, tile_store.path)
    return sid, path


def _plain_id(text: str) -> bool:
    return bool(text) and "/" not in text and "\\" not in text and not text.startswith(".")


def check_scan(path: Path, tiles: SlideTiles, store_path: Path) -> None:
    """Refuse a slide file that is not the scan that was tiled (another fingerprint).

    A tile store written before fingerprints were recorded cannot be checked: a warning.

    Raises:
        ValueError: another fingerprint, or not a slide OpenSlide reads.
    """
    recorded = tiles.attrs.get("fingerprint")
    try:
        with SlideReader(path, mpp_override=tiles.attrs.get("mpp_level0")) as reader:
            actual = reader.fingerprint()
    except SlideError as err:
        raise ValueError(f"--slide: {err}") from None
    if recorded is None:
        log.warning(
            "%s records no fingerprint for %s: cannot check that %s is the scan that was tiled",
            store_path,
            tiles.slide_id,
            path,
        )
    elif actual != recorded:
        raise ValueError(
            f"{path} is not the scan that was tiled as {tiles.slide_id} in {store_path}: its "
            f"fingerprint {actual} differs from the tile store's {recorded} (tiled from "
            f"{tiles.path}). Pass the file that was tiled, or tile and embed this one."
        )


def heatmap(
    model: str,
    features: Path,
    slide: str,
    out: Path,
    registry: str | None = None,
    genes: list[str] | None = None,
    top_k: int = 8,
    truth: Path | None = None,
    allow_in_sample: bool = False,
    thumbnail_mpp: float | None = None,
) -> CommandResult:
    """Draw attention and per-gene tile maps of a MIL model over one slide.

    Writes PNG heatmaps with colour bars (attention as a multiple of uniform, tumour and each
    gene's log2FC tile scores), a montage of the top-k and bottom-k tiles, a GeoJSON of the
    tiles with every score (QuPath: File › Import objects) and a CSV of the scores. Every
    output says whether the model saw the slide in training (``seen_in_training``).

    Args:
        model: the slide model's registry ref (from ``histcode finetune``), e.g. ``deg@1``;
            for honest maps, the fold model that held the slide out (``--cv.register folds``).
        features: the feature store the slide's tiles were embedded into.
        slide: the slide file that was tiled, or its slide id in the feature store.
        out: output folder.
        registry: registry folder (default: $HISTCODE_REGISTRY, else ./registry).
        genes: genes to draw as PNG (default: up to 8 of the model's genes with the largest
            predicted |log2FC| on this slide); every gene is in the GeoJSON and CSV.
        top_k: tiles in each row of the montage.
        truth: a synthetic cohort's truth file (``truth/<slide>.npz``) to score the maps;
            refused for a slide the model saw in training unless ``allow_in_sample``.
        allow_in_sample: score ``--truth`` on a slide the model trained or validated on (the
            AUROC is then an in-sample figure, and the output says so).
        thumbnail_mpp: µm/px of the thumbnail under the maps (default: chosen from the
            slide's size, about 16 px per tile and at most 2048 px).
    """
    source = open_source(model, Path(features), slide, registry)
    _check_truth_allowed(source, truth, allow_in_sample)
    maps = _compute(source)
    drawn_genes = _genes_to_draw(
        genes, list(source.card.extra.get("genes", [])), maps.prediction, model
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = _draw(maps, source, drawn_genes, out, top_k, thumbnail_mpp)
    written += _write_tables(maps, source, out)
    localisation = None if truth is None else _score_truth(maps, source, Path(truth))
    result = {
        "out": str(out),
        "slide_id": source.sid,
        "model": source.ref,
        **source.seen,
        "tiles": len(maps.coords),
        "maps": len(maps.maps),
        "tile_scores": maps.tile_scores,
        "files": len(written),
        "prediction": maps.prediction,
        "localisation_auroc": localisation,
    }
    print(f"wrote {len(written)} files to {out}", file=sys.stderr)
    return CommandResult(out, result, {"files": written, "seen_reason": source.role.reason})


def open_source(model: str, features: Path, slide: str, registry: str | None) -> MapSource:
    """Load the model and find the slide: its features' lineage, its file and its tiles checked.

    Raises:
        ValueError: features of another encoder (:func:`check_lineage`), or a file that is
            not the scan that was tiled (:func:`resolve_slide`).
        FileNotFoundError: no such slide file or slide id.
    """
    net, card = Registry(registry).load(model, builders=slide_model_builders())
    net.eval()
    store = FeatureStore(features)
    attrs = store.attrs
    check_lineage(card, attrs, model, features)
    tile_store = TileStore(attrs["tiles"])
    sid, slide_path = resolve_slide(slide, store, tile_store)
    ref = card.ref if getattr(card, "ref", None) else model
    return MapSource(
        net, card, model, ref, features, store, attrs, sid, slide_path, tile_store.read(sid),
        training_role(card, sid),
    )  # fmt: skip


def _check_truth_allowed(source: MapSource, truth: Path | None, allow_in_sample: bool) -> None:
    """Refuse ``--truth`` on a slide the model saw (unless allowed); warn of a seen slide."""
    role = source.role
    if truth is not None and role.seen and not allow_in_sample:
        raise ValueError(
            f"refusing to score --truth on {source.sid}: {role.reason}, so its AUROC would be an "
            "in-sample figure. Map a held-out slide (with --cv.register folds, the model of "
            "the fold that tested it), or pass --allow_in_sample true to score it anyway."
        )
    if role.seen is not False:
        log.warning("%s: %s", source.sid, role.reason)


def _compute(source: MapSource) -> SlideMaps:
    """The slide's tile maps, from its features in the store.

    Raises:
        ValueError: the store has no features for the slide (embedding failed or empty).
    """
    sid = source.sid
    feats = source.store.read(sid)
    if feats.status != "ok" or len(feats) == 0:
        raise ValueError(
            f"{source.features} has no features for {sid} (status {feats.status}: "
            f"{feats.attrs.get('error')}); nothing to draw"
        )
    side = float(source.tiles.attrs["tile_size_level0"])
    return slide_maps(source.net, source.card, sid, feats.coords, side, feats.features)


def _write_tables(maps: SlideMaps, source: MapSource, out: Path) -> list[str]:
    """The GeoJSON (every score a QuPath measurement, with provenance) and the CSV."""
    provenance = {
        "model": source.ref,
        "features": str(source.features.resolve()),
        "encoder": source.attrs.get("encoder_ref"),
        **source.seen,
        "seen_reason": source.role.reason,
        "tile_scores": maps.tile_scores,
    }
    sid = maps.slide_id
    collection = tiles_geojson(maps.coords, maps.side, maps.maps, sid, provenance, source.seen)
    return [
        str(write_geojson(collection, out / f"{_safe(sid)}.geojson")),
        str(write_tile_scores_csv(maps.coords, maps.maps, out / f"{_safe(sid)}_tile_scores.csv")),
    ]


def _score_truth(maps: SlideMaps, source: MapSource, truth: Path) -> dict[str, float | None]:
    """AUROC of the maps against a synthetic cohort's truth masks (``truth/<slide>.npz``; the
    genes' roles from the cohort's ``genes.json``): attention and tumour vs the tumour mask,
    each lymphocyte gene's log2FC vs the lymphocyte mask."""
    # only with --truth: the synthetic cohort package is not needed to draw maps
    from histcode.synth.cohort import read_gene_roles
    from histcode.synth.scoring import localisation_auroc

    roles = read_gene_roles(truth.parent.parent / "genes.json")
    with np.load(truth) as masks:
        return localisation_auroc(
            maps.coords,
            maps.side,
            float(source.tiles.attrs["mpp_level0"]),
            maps.maps,
            masks["tumour"],
            masks["lymphocyte"],
            float(masks["mask_mpp"]),
            roles,
        )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _genes_to_draw(
    genes: list[str] | None, model_genes: list[str], prediction: dict[str, float], model: str
) -> list[str]:
    """``--genes``, checked; else the model's genes with the largest predicted |log2FC|."""
    if genes:
        unknown = sorted(set(genes) - set(model_genes))
        if unknown:
            raise ValueError(f"{model} predicts no {unknown}; its genes: {model_genes}")
        return list(genes)
    ranked = sorted(model_genes, key=lambda g: -abs(prediction.get(f"{g}_log2fc", 0.0)))
    return ranked[:DEFAULT_MAX_GENE_MAPS]


def _class_maps(maps: SlideMaps) -> list[tuple[str, str]]:
    """(task, class) of the categorical tasks in ``maps.prediction`` (``<task>_prob_<class>``)."""
    pairs = []
    for key in maps.prediction:
        task, sep, name = key.partition("_prob_")
        if sep and task and name:
            pairs.append((task, name))
    return pairs


def _draw(
    maps: SlideMaps,
    source: MapSource,
    drawn_genes: list[str],
    out: Path,
    top_k: int,
    thumbnail_mpp: float | None,
) -> list[str]:
    """The PNGs: attention (× n tiles), tumour and the genes' log2FC maps, and the montage."""
    written: list[str] = []
    n = len(maps.coords)
    sid = maps.slide_id
    tiles = source.tiles

    def title(name: str) -> tuple[str, str | None]:
        return map_title(
            sid, name, maps.kind(name), source.per_task, n, source.ref, source.features,
            source.role,
        )  # fmt: skip

    with SlideReader(source.slide_path, mpp_override=tiles.attrs["mpp_level0"]) as reader:
        for name in _maps_to_draw(maps, drawn_genes):
            attention = name == "attention"
            heading, warning = title(name)
            path = draw_heatmap(
                reader,
                maps.coords,
                maps.side,
                maps.maps[name] * n if attention else maps.maps[name],
                out / f"{_safe(sid)}_{_safe(name)}.png",
                heading,
                label=ATTENTION_LABEL if attention else name,
                cmap="PuOr_r" if attention else "RdBu_r",
                thumbnail_mpp=thumbnail_mpp,
                centre=None if attention else 0.0,
                ratio=attention,
                warning=warning,
            )
            written.append(str(path))
        _, warning = title(maps.main)
        montage = draw_montage(
            reader,
            SlideGeometry.from_tiles(tiles),
            maps.coords,
            maps.maps[maps.main],
            int(source.attrs["tile_size"]),  # the tile store's tile size, as recorded
            out / f"{_safe(sid)}_montage_{_safe(maps.main)}.png",
            f"{sid} — top and bottom {top_k} tiles by {maps.main} (model {source.ref})"
            + (f"\n{warning}" if warning else ""),
            k=top_k,
        )
        written.append(str(montage))
    return written


def _maps_to_draw(maps: SlideMaps, drawn_genes: list[str]) -> list[str]:
    """Attention and tumour, the drawn genes' log2FC, each class of each categorical task."""
    names = [m for m in ("attention", "tumour") if m in maps.maps]
    names += [f"{g}_log2fc" for g in drawn_genes if f"{g}_log2fc" in maps.maps]
    names += [f"{t}_{c}" for t, c in _class_maps(maps) if f"{t}_{c}" in maps.maps]
    return names


def main(argv: Sequence[str], prog: str = "histcode heatmap") -> int:
    """``histcode heatmap``."""
    from histcode.commandkit import run_function

    return run_function(heatmap, argv, prog, "heatmap")
