"""draw attention and per-gene tile maps of a MIL model over a slide (PNG, montage, GeoJSON).

``histcode heatmap --model REF --features features.zarr --slide PATH --out DIR``

For one slide, the registered slide model scores every tile: its attention (aggregators that
have one) and each tile's contribution to each prediction — the tumour logit and each gene's
log2FC and up-class logit (attention × head on the tile's embedding; for mean/max pooling,
the head applied to each tile). Writes, per map, the scores over the slide thumbnail with a
colour bar; a montage of the top-k and bottom-k tiles of the main map; a GeoJSON of the tiles
with every score as a QuPath measurement; a CSV of the scores. With ``--truth`` (a synthetic
cohort's ``truth/<slide>.npz``) it also reports how well the maps find the true tumour and
lymphocyte regions (AUROC).
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: genes drawn as PNG when --genes is not given, at most this many (all are in the GeoJSON)
DEFAULT_MAX_GENE_MAPS = 8


@dataclass
class SlideMaps:
    """All tile maps of one slide.

    Attributes:
        slide_id: the slide.
        coords: (N, 2) level-0 top-left corners.
        side: level-0 tile side.
        maps: name → (N,) scores (``attention``, ``tumour``, ``<GENE>_log2fc``, ``<GENE>_up``).
        prediction: the slide-level predictions (tumour probability, per-gene log2FC).
        main: the map the montage shows (attention when the model has it, else tumour).
    """

    slide_id: str
    coords: np.ndarray
    side: float
    maps: dict[str, np.ndarray]
    prediction: dict[str, float] = field(default_factory=dict)
    main: str = "attention"


def check_lineage(card: Any, store_attrs: dict[str, Any], model_ref: str, features: Path) -> None:
    """Refuse features from another encoder than the one the model was trained on.

    Raises:
        ValueError: the model's lineage names another encoder (sha256), or the feature
            sizes differ; says how to fix.
    """
    sha = store_attrs.get("encoder_sha256")
    trained_on = [p for p in card.parents if "encoder_sha256=" in p]
    if sha and trained_on and not any(f"encoder_sha256={sha}" in p for p in trained_on):
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


def compute_maps(model: Any, card: Any, features: np.ndarray) -> tuple[dict, dict, str]:
    """Tile maps and slide predictions of one slide.

    Args:
        model: a ``SlideModel`` in eval mode.
        card: its registry card (``extra.genes`` names the gene outputs).
        features: (N, D) tile features.

    Returns:
        (maps, prediction, main map name). Maps: ``attention`` (the tumour task's attention
        for per-task attention), ``tumour`` (contribution to the tumour logit), and per gene
        ``<GENE>_log2fc``, ``<GENE>_up`` (contributions) and, for per-task attention,
        ``<GENE>_attention``.
    """
    import torch

    genes = list(card.extra.get("genes", []))
    x = torch.from_numpy(np.asarray(features, np.float32))[None]
    with torch.no_grad():
        out = model(x)
        scores = model.tile_scores(x)
    branches = out.branch_attention  # (1, tasks, N) for per-task attention, else None
    maps: dict[str, np.ndarray] = {}
    prediction: dict[str, float] = {}
    # mean and linear pooling weigh every tile alike: their "attention" says nothing
    uniform = getattr(model.aggregator, "uniform_pooling", False)
    tumour = model.head.tumour
    if branches is not None:  # per-task attention: the tumour's is "attention", each gene's own
        if tumour:
            maps["attention"] = branches[0, 0].numpy()
        for g, gene in enumerate(genes):
            maps[f"{gene}_attention"] = branches[0, int(tumour) + g].numpy()
    elif out.attention is not None and not uniform:
        maps["attention"] = out.attention[0].numpy()
    if scores.tumour is not None:
        maps["tumour"] = scores.tumour[0].numpy()
        prediction["tumour_prob"] = float(out.tumour_prob[0])
    for g, gene in enumerate(genes):
        if scores.log2fc is not None:
            maps[f"{gene}_log2fc"] = scores.log2fc[0, :, g].numpy()
            prediction[f"{gene}_log2fc"] = float(out.log2fc[0, g])
        if scores.up is not None:
            maps[f"{gene}_up"] = scores.up[0, :, g].numpy()
    main = (
        "attention" if "attention" in maps else ("tumour" if "tumour" in maps else next(iter(maps)))
    )
    return maps, prediction, main


def truth_auroc(
    maps: SlideMaps, mpp0: float, truth_path: Path, genes_roles: dict[str, str]
) -> dict:
    """AUROC of maps against a synthetic truth: attention/tumour vs the tumour mask, and each
    lymphocyte gene's log2FC map vs the lymphocyte mask."""
    from histcode.heatmaps import mask_auroc, tile_labels_from_mask

    truth = np.load(truth_path)
    mask_mpp = float(truth["mask_mpp"])
    tumour = tile_labels_from_mask(maps.coords, maps.side, mpp0, truth["tumour"], mask_mpp)
    lymph = tile_labels_from_mask(maps.coords, maps.side, mpp0, truth["lymphocyte"], mask_mpp)
    result: dict[str, float | None] = {}
    for name in ("attention", "tumour"):
        if name in maps.maps:
            result[f"{name}_vs_tumour_mask"] = mask_auroc(maps.maps[name], tumour)
    for gene, role in genes_roles.items():
        if role == "lymphocyte" and f"{gene}_log2fc" in maps.maps:
            result[f"{gene}_log2fc_vs_lymphocyte_mask"] = mask_auroc(
                maps.maps[f"{gene}_log2fc"], lymph
            )
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def heatmap(
    model: str,
    features: Path,
    slide: str,
    out: Path,
    registry: str | None = None,
    genes: list[str] | None = None,
    top_k: int = 8,
    truth: Path | None = None,
    thumbnail_mpp: float = 8.0,
) -> Any:
    """Draw attention and per-gene tile maps of a MIL model over one slide.

    Writes PNG heatmaps with colour bars (attention, tumour contribution, each gene's log2FC
    contribution), a montage of the top-k and bottom-k tiles, a GeoJSON of the tiles with
    every score (QuPath: File › Import objects) and a CSV of the scores.

    Args:
        model: the slide model's registry ref (from ``histcode finetune``), e.g. ``deg@1``.
        features: the feature store the slide's tiles were embedded into.
        slide: the slide file (or its slide id in the feature store).
        out: output folder.
        registry: registry folder (default: $HISTCODE_REGISTRY, else ./registry).
        genes: genes to draw as PNG (default: up to 8 of the model's genes with the largest
            predicted |log2FC| on this slide); every gene is in the GeoJSON and CSV.
        top_k: tiles in each row of the montage.
        truth: a synthetic cohort's truth file (``truth/<slide>.npz``) to score the maps.
        thumbnail_mpp: µm/px of the thumbnail under the maps.
    """
    import json

    from histcode.cli import CommandResult
    from histcode.featurestore import FeatureStore
    from histcode.finetune.heads import slide_model_builders
    from histcode.heatmaps import draw_heatmap, draw_montage, tiles_geojson, write_geojson
    from histcode.registry import Registry
    from histcode.slide import SlideReader, slide_id
    from histcode.tilereader import SlideGeometry
    from histcode.tilestore import TileStore

    reg = Registry(registry)
    net, card = reg.load(model, builders=slide_model_builders())
    net.eval()
    store = FeatureStore(features)
    attrs = store.attrs
    check_lineage(card, attrs, model, Path(features))
    sid = slide_id(slide) if Path(slide).is_file() else slide
    feats = store.read(sid)
    if feats.status != "ok" or len(feats) == 0:
        raise ValueError(
            f"{features} has no features for {sid} (status {feats.status}: "
            f"{feats.attrs.get('error')}); nothing to draw"
        )
    tiles = TileStore(attrs["tiles"]).read(sid)
    slide_path = Path(slide) if Path(slide).is_file() else tiles.path
    side = float(tiles.attrs["tile_size_level0"])
    maps_, prediction, main = compute_maps(net, card, feats.features)
    maps = SlideMaps(sid, feats.coords, side, maps_, prediction, main)

    model_genes = list(card.extra.get("genes", []))
    if genes:
        unknown = sorted(set(genes) - set(model_genes))
        if unknown:
            raise ValueError(f"{model} predicts no {unknown}; its genes: {model_genes}")
        drawn_genes = list(genes)
    else:
        ranked = sorted(model_genes, key=lambda g: -abs(prediction.get(f"{g}_log2fc", 0.0)))
        drawn_genes = ranked[:DEFAULT_MAX_GENE_MAPS]
    ref = card.ref if getattr(card, "ref", None) else model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with SlideReader(slide_path, mpp_override=tiles.attrs["mpp_level0"]) as reader:
        to_draw = [m for m in ("attention", "tumour") if m in maps.maps]
        to_draw += [f"{g}_log2fc" for g in drawn_genes if f"{g}_log2fc" in maps.maps]
        # per-task attention: the map called "attention" is the tumour task's
        per_task = getattr(net.aggregator, "branches", 1) > 1
        attention_title = "attention of the tumour task" if per_task else "attention"
        for name in to_draw:
            signed = name != "attention"
            title = (
                f"{sid} — {name} "
                f"({'contribution to the slide prediction' if signed else attention_title})"
                f"\nmodel {ref}, features {Path(features).name}"
            )
            path = draw_heatmap(
                reader,
                maps.coords,
                side,
                maps.maps[name],
                out / f"{_safe(sid)}_{_safe(name)}.png",
                title,
                label=name,
                cmap="RdBu_r" if signed else "inferno",
                thumbnail_mpp=thumbnail_mpp,
                centre=0.0 if signed else None,
            )
            written.append(str(path))
        montage = draw_montage(
            reader,
            SlideGeometry.from_tiles(tiles),
            maps.coords,
            maps.maps[main],
            int(attrs["tile_size"]),  # the feature store records the tile store's tile size
            out / f"{_safe(sid)}_montage_{_safe(main)}.png",
            f"{sid} — top and bottom {top_k} tiles by {main} (model {ref})",
            k=top_k,
        )
        written.append(str(montage))
    provenance = {
        "model": ref,
        "features": str(Path(features).resolve()),
        "encoder": attrs.get("encoder_ref"),
    }
    geo = write_geojson(
        tiles_geojson(maps.coords, side, maps.maps, sid, provenance), out / f"{_safe(sid)}.geojson"
    )
    written.append(str(geo))
    csv_path = out / f"{_safe(sid)}_tile_scores.csv"
    tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        names = list(maps.maps)
        w.writerow(["x", "y", *names])
        for i, (x, y) in enumerate(maps.coords):
            w.writerow([int(x), int(y), *(f"{maps.maps[n][i]:.6g}" for n in names)])
    tmp.replace(csv_path)
    written.append(str(csv_path))

    localisation = None
    if truth is not None:
        roles_path = Path(truth).parent.parent / "genes.json"
        roles = {}
        if roles_path.is_file():
            roles = {
                g: v["role"] if isinstance(v, dict) else v
                for g, v in json.loads(roles_path.read_text()).items()
            }
        localisation = truth_auroc(maps, float(tiles.attrs["mpp_level0"]), Path(truth), roles)
    result = {
        "out": str(out),
        "slide_id": sid,
        "model": ref,
        "tiles": len(maps.coords),
        "maps": len(maps.maps),
        "files": len(written),
        "prediction": prediction,
        "localisation_auroc": localisation,
    }
    print(f"wrote {len(written)} files to {out}", file=sys.stderr)
    return CommandResult(out, result, {"files": written})


def main(argv: Sequence[str], prog: str = "histcode heatmap") -> int:
    """``histcode heatmap``."""
    from histcode.cli import run_function

    return run_function(heatmap, argv, prog, "heatmap")
