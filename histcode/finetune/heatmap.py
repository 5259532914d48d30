"""draw attention and per-gene tile maps of a MIL model over a slide (PNG, montage, GeoJSON).

``histcode heatmap --model REF --features features.zarr --slide PATH --out DIR``

For one slide, the registered slide model scores every tile: its attention (aggregators that
have one), drawn as a multiple of uniform (attention × n tiles, 1 = every tile alike), and
each tile's score for each prediction — the tumour logit and each gene's log2FC and up-class
logit. What a tile score is depends on the aggregator, and every output says which
(:data:`TILE_SCORES`): an exact contribution (attention × head on the tile's embedding,
adding up to the slide prediction: abmil, clam_sb, mean, linear), an approximate one (the
transformer's CLS attention × head) or the tile's own prediction (max pooling).

Writes, per map, the slide thumbnail beside the scores over it with a colour bar; a montage
of the top-k and bottom-k tiles of the main map; a GeoJSON of the tiles with every score as a
QuPath measurement; a CSV of the scores. With ``--truth`` (a synthetic cohort's
``truth/<slide>.npz``) it also reports how well the maps find the true tumour and lymphocyte
regions (AUROC).

Maps are honest only on slides the model never saw. The registry card lists the patients
(and slides) a model was trained and validated on; every output says whether this slide was
one of them (``seen_in_training``: true, false, or null when the card does not say), and
``--truth`` refuses to score a seen slide unless ``--allow_in_sample true``.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from histcode.commandkit import CommandResult
from histcode.featurestore import FeatureStore
from histcode.finetune.barcodes import is_tcga, parse_barcode
from histcode.heatmaps import (
    draw_heatmap,
    draw_montage,
    mask_auroc,
    tile_labels_from_mask,
    tiles_geojson,
    write_geojson,
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

TileScoreKind = Literal["exact", "approximate", "own"]

#: what a tile score is, by how it relates to the slide prediction
TILE_SCORES: dict[str, str] = {
    "exact": "each tile's contribution to the slide's {target} (exact: they add up to it, "
    "with the bias)",
    "approximate": "each tile's approximate contribution to the slide's {target} (CLS "
    "attention × the head on the tile; they do not add up to it)",
    "own": "each tile's own {target} (max pooling: the head on each tile; the slide's is "
    "not a sum of these)",
}

#: the card's lists of the patients and slides a model learnt from (``histcode finetune``)
TRAINED_KEYS = ("trained_patients", "validation_patients", "trained_slide_ids",
                "validation_slide_ids")  # fmt: skip


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
        tile_scores: how the tile scores relate to the slide prediction (a key of
            :data:`TILE_SCORES`).
    """

    slide_id: str
    coords: np.ndarray
    side: float
    maps: dict[str, np.ndarray]
    prediction: dict[str, float] = field(default_factory=dict)
    main: str = "attention"
    tile_scores: TileScoreKind = "exact"


@dataclass(frozen=True)
class TrainingRole:
    """Whether a model saw a slide while it was trained.

    Attributes:
        role: ``training`` (its patient's slides were trained on), ``validation`` (they chose
            the epoch), ``held-out``, or ``unknown`` (the card lists no patients).
        seen: True for training and validation, False for held-out, None for unknown.
        reason: one sentence saying why.
    """

    role: Literal["training", "validation", "held-out", "unknown"]
    seen: bool | None
    reason: str


def training_role(card: Any, sid: str) -> TrainingRole:
    """Whether the model of ``card`` saw slide ``sid`` in training or validation.

    A slide counts as seen when it, or another slide of its patient (TCGA barcodes give the
    patient), was among the model's training or validation slides: validation slides chose
    the epoch, so they are not held out either. Everything else is held out — a fold model's
    test fold and slides outside the run. Cards written before the lists were recorded say
    nothing, and then neither does this (``unknown``).

    Args:
        card: the model's registry card (``extra`` as :func:`histcode.finetune.pipeline.
            run_finetune` writes it).
        sid: the slide id.
    """
    extra = getattr(card, "extra", {}) or {}
    ref = getattr(card, "ref", None) or "the model"
    if "trained_patients" not in extra:
        return TrainingRole(
            "unknown",
            None,
            f"the card of {ref} does not list the patients it was trained on (registered "
            "before histcode recorded them): cannot tell whether it saw this slide",
        )
    patient = parse_barcode(sid).patient if is_tcga(sid) else None
    for role, slides_key, patients_key in (
        ("training", "trained_slide_ids", "trained_patients"),
        ("validation", "validation_slide_ids", "validation_patients"),
    ):
        what = "trained on" if role == "training" else "chose its epoch on"
        if sid in set(extra.get(slides_key, [])):
            return TrainingRole(role, True, f"{ref} {what} this slide")  # type: ignore[arg-type]
        if patient is not None and patient in set(extra.get(patients_key, [])):
            return TrainingRole(  # type: ignore[arg-type]
                role, True, f"{ref} {what} slides of this slide's patient {patient}"
            )
    fold = extra.get("fold")
    where = f"fold {fold}'s test patients" if isinstance(fold, int) else "outside its run"
    unchecked = (
        "" if patient else "; its patient cannot be read from the slide id (not a TCGA barcode)"
    )
    return TrainingRole(
        "held-out",
        False,
        f"{ref} neither trained nor validated on this slide or its patient ({where}){unchecked}",
    )


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


def compute_maps(
    model: Any, card: Any, features: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, float], str, TileScoreKind]:
    """Tile maps and slide predictions of one slide.

    Args:
        model: a ``SlideModel`` in eval mode.
        card: its registry card (``extra.genes`` names the gene outputs).
        features: (N, D) tile features.

    Returns:
        (maps, prediction, main map name, tile score kind). Maps: ``attention`` (the tumour
        task's attention for per-task attention; sums to 1), ``tumour`` (tile scores of the
        tumour logit), and per gene ``<GENE>_log2fc``, ``<GENE>_up`` (tile scores) and, for
        per-task attention, ``<GENE>_attention``; per categorical task (``extra.classes`` of
        the card) ``<task>_<class>`` (each class's contribution map: tile scores of its
        logit) and, for per-task attention, ``<task>_attention``. The kind
        (:data:`TILE_SCORES`) is read off the numbers: ``own`` when the aggregator has no
        attention (the head on each tile), ``exact`` when every slide output equals its
        tiles' scores plus the head's bias, else ``approximate``.
    """
    import torch

    genes = list(card.extra.get("genes", []))
    categories: dict[str, list[str]] = dict(card.extra.get("classes") or {})
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
        for k, task in enumerate(categories):
            maps[f"{task}_attention"] = branches[0, int(tumour) + len(genes) + k].numpy()
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
    for k, (task, classes) in enumerate(categories.items()):
        probs = torch.softmax(out.category_logits[k][0].float(), -1)
        for c, name in enumerate(classes):
            maps[f"{task}_{name}"] = scores.categories[k][0, :, c].numpy()
            prediction[f"{task}_prob_{name}"] = float(probs[c])
    main = (
        "attention" if "attention" in maps else ("tumour" if "tumour" in maps else next(iter(maps)))
    )
    return maps, prediction, main, _tile_score_kind(model, out, scores)


def _tile_score_kind(model: Any, out: Any, scores: Any) -> TileScoreKind:
    """``own``, ``exact`` or ``approximate``: how tile scores relate to the slide outputs."""
    if out.attention is None and out.branch_attention is None:
        return "own"  # tile_scores adds the bias to each tile: its own prediction
    bias = model.head.split(model.head.linear.bias.detach())
    pairs = [
        (scores.tumour, out.tumour_logit, bias.tumour_logit),
        (scores.log2fc, out.log2fc, bias.log2fc),
        (scores.up, None if out.gene_logits is None else out.gene_logits[..., 2],
         None if bias.gene_logits is None else bias.gene_logits[..., 2]),
    ]  # fmt: skip
    for k, tiles in enumerate(getattr(scores, "categories", None) or []):
        pairs.append((tiles, out.category_logits[k], bias.category_logits[k]))
    for tiles, slide, b in pairs:
        if tiles is None or slide is None:
            continue
        total = tiles.sum(1) + b  # (1,) or (1, G)
        if not np.allclose(total.numpy(), slide.numpy(), rtol=1e-3, atol=1e-4):
            return "approximate"
    return "exact"


def map_title(
    sid: str,
    name: str,
    kind: TileScoreKind,
    per_task: bool,
    n_tiles: int,
    ref: str,
    features: Path,
    role: TrainingRole,
) -> tuple[str, str | None]:
    """The title of one map's PNG and, when the map is not of a held-out slide, a warning.

    Returns:
        (title, warning): the title says what the map shows (:data:`TILE_SCORES`), on
        which slide, by which model, and whether the model saw the slide; the warning (for
        seen or unknown slides, else None) is drawn in red above it.
    """
    if name.endswith("attention"):
        whose = "the tumour task's " if per_task and name == "attention" else ""
        what = (
            "CLS-token attention of the last layer (a readout, not the pooling weights)"
            if kind == "approximate"
            else f"{whose}pooling weight of each tile"
        )
        shown = f"{what}, × {n_tiles} tiles (1 = uniform)"
    else:
        target = {"tumour": "tumour logit"}.get(name)
        if target is None:
            gene, _, part = name.rpartition("_")
            target = {
                "log2fc": f"{gene} log2FC prediction",
                "up": f"{gene} up-class logit",
            }.get(part, f"{name} class logit")  # a categorical task's class: <task>_<class>
        shown = TILE_SCORES[kind].format(target=target)
    seen = {
        True: f"SEEN IN TRAINING ({role.role}) — not a held-out map",
        False: "held out (the model never saw this slide's patient)",
        None: "held out or not: unknown",
    }[role.seen]
    title = f"{sid} — {name}: {shown}\nmodel {ref}, features {features.name}; {seen}"
    warning = None
    if role.seen is not False:
        warning = (
            f"IN-SAMPLE: {role.reason}" if role.seen else f"UNKNOWN WHETHER HELD OUT: {role.reason}"
        )
    return title, warning


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


def truth_auroc(
    maps: SlideMaps, mpp0: float, truth_path: Path, genes_roles: dict[str, str]
) -> dict:
    """AUROC of maps against a synthetic truth: attention/tumour vs the tumour mask, and each
    lymphocyte gene's log2FC map vs the lymphocyte mask."""
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
    from histcode.finetune.heads import slide_model_builders

    net, card = Registry(registry).load(model, builders=slide_model_builders())
    net.eval()
    ref = card.ref if getattr(card, "ref", None) else model
    store = FeatureStore(features)
    attrs = store.attrs
    check_lineage(card, attrs, model, Path(features))
    tile_store = TileStore(attrs["tiles"])
    sid, slide_path = resolve_slide(slide, store, tile_store)
    role = training_role(card, sid)
    if truth is not None and role.seen and not allow_in_sample:
        raise ValueError(
            f"refusing to score --truth on {sid}: {role.reason}, so its AUROC would be an "
            "in-sample figure. Map a held-out slide (with --cv.register folds, the model of "
            "the fold that tested it), or pass --allow_in_sample true to score it anyway."
        )
    if role.seen is not False:
        log.warning("%s: %s", sid, role.reason)
    feats = store.read(sid)
    if feats.status != "ok" or len(feats) == 0:
        raise ValueError(
            f"{features} has no features for {sid} (status {feats.status}: "
            f"{feats.attrs.get('error')}); nothing to draw"
        )
    tiles = tile_store.read(sid)
    side = float(tiles.attrs["tile_size_level0"])
    maps_, prediction, main, kind = compute_maps(net, card, feats.features)
    maps = SlideMaps(sid, feats.coords, side, maps_, prediction, main, kind)
    drawn_genes = _genes_to_draw(genes, list(card.extra.get("genes", [])), prediction, model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_task = getattr(net.aggregator, "branches", 1) > 1
    seen = {"seen_in_training": role.seen, "training_role": role.role}
    written = _draw(
        maps, slide_path, tiles, drawn_genes, out, ref, Path(features), role, per_task,
        int(attrs["tile_size"]), top_k, thumbnail_mpp,
    )  # fmt: skip
    provenance = {
        "model": ref,
        "features": str(Path(features).resolve()),
        "encoder": attrs.get("encoder_ref"),
        **seen,
        "seen_reason": role.reason,
        "tile_scores": kind,
    }
    collection = tiles_geojson(maps.coords, side, maps.maps, sid, provenance, seen)
    written.append(str(write_geojson(collection, out / f"{_safe(sid)}.geojson")))
    written.append(str(_write_csv(maps, out / f"{_safe(sid)}_tile_scores.csv")))

    localisation = None
    if truth is not None:
        from histcode.synth.cohort import read_gene_roles

        roles = read_gene_roles(Path(truth).parent.parent / "genes.json")
        localisation = truth_auroc(maps, float(tiles.attrs["mpp_level0"]), Path(truth), roles)
    result = {
        "out": str(out),
        "slide_id": sid,
        "model": ref,
        **seen,
        "tiles": len(maps.coords),
        "maps": len(maps.maps),
        "tile_scores": kind,
        "files": len(written),
        "prediction": prediction,
        "localisation_auroc": localisation,
    }
    print(f"wrote {len(written)} files to {out}", file=sys.stderr)
    return CommandResult(out, result, {"files": written, "seen_reason": role.reason})


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
    slide_path: Path,
    tiles: SlideTiles,
    drawn_genes: list[str],
    out: Path,
    ref: str,
    features: Path,
    role: TrainingRole,
    per_task: bool,
    tile_size: int,
    top_k: int,
    thumbnail_mpp: float | None,
) -> list[str]:
    """The PNGs: attention (× n tiles), tumour and the genes' log2FC maps, and the montage."""
    written: list[str] = []
    n = len(maps.coords)
    sid = maps.slide_id
    with SlideReader(slide_path, mpp_override=tiles.attrs["mpp_level0"]) as reader:
        to_draw = [m for m in ("attention", "tumour") if m in maps.maps]
        to_draw += [f"{g}_log2fc" for g in drawn_genes if f"{g}_log2fc" in maps.maps]
        # each class of each categorical task: its contribution map
        to_draw += [f"{t}_{c}" for t, c in _class_maps(maps) if f"{t}_{c}" in maps.maps]
        for name in to_draw:
            attention = name == "attention"
            title, warning = map_title(
                sid, name, maps.tile_scores, per_task, n, ref, features, role
            )
            path = draw_heatmap(
                reader,
                maps.coords,
                maps.side,
                maps.maps[name] * n if attention else maps.maps[name],
                out / f"{_safe(sid)}_{_safe(name)}.png",
                title,
                label=ATTENTION_LABEL if attention else name,
                cmap="PuOr_r" if attention else "RdBu_r",
                thumbnail_mpp=thumbnail_mpp,
                centre=None if attention else 0.0,
                ratio=attention,
                warning=warning,
            )
            written.append(str(path))
        _, warning = map_title(sid, maps.main, maps.tile_scores, per_task, n, ref, features, role)
        montage = draw_montage(
            reader,
            SlideGeometry.from_tiles(tiles),
            maps.coords,
            maps.maps[maps.main],
            tile_size,  # the feature store records the tile store's tile size
            out / f"{_safe(sid)}_montage_{_safe(maps.main)}.png",
            f"{sid} — top and bottom {top_k} tiles by {maps.main} (model {ref})"
            + (f"\n{warning}" if warning else ""),
            k=top_k,
        )
        written.append(str(montage))
    return written


def _write_csv(maps: SlideMaps, path: Path) -> Path:
    """Every tile's scores (raw: attention sums to 1), written atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        names = list(maps.maps)
        w.writerow(["x", "y", *names])
        for i, (x, y) in enumerate(maps.coords):
            w.writerow([int(x), int(y), *(f"{maps.maps[n][i]:.6g}" for n in names)])
    tmp.replace(path)
    return path


def main(argv: Sequence[str], prog: str = "histcode heatmap") -> int:
    """``histcode heatmap``."""
    from histcode.commandkit import run_function

    return run_function(heatmap, argv, prog, "heatmap")
