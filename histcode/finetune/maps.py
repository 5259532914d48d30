"""Tile maps of a slide model over one slide: attention and each tile's score per prediction.

The finetune stage's half of ``histcode heatmap`` (:mod:`histcode.finetune.heatmap`): it runs
a registered slide model on a slide's tile features and returns plain arrays, one score per
tile; the core draws and writes them (:mod:`histcode.mapdrawing`) and the synthetic cohort
scores them against its truth masks (:mod:`histcode.synth.scoring`).

- :func:`slide_maps` / :func:`compute_maps`: the maps and the slide-level predictions. What a
  tile score is depends on the aggregator (:data:`TILE_SCORES`): an exact contribution
  (attention × head on the tile's embedding, adding up to the slide prediction: abmil,
  clam_sb, mean, linear), an approximate one (the transformer's CLS attention × head) or the
  tile's own prediction (max pooling).
- :func:`training_role`: whether the model saw the slide in training or validation (maps are
  honest only on slides it never saw).
- :func:`map_title`: the title of one map's PNG, saying what the map shows and whether the
  slide was held out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from histcode.barcodes import is_tcga, parse_barcode
from histcode.finetune.context import context_features

TileScoreKind = Literal["exact", "approximate", "own", "top_share", "tile_scorer"]

#: what a tile score is, by how it relates to the slide prediction
TILE_SCORES: dict[str, str] = {
    "exact": "each tile's contribution to the slide's {target} (exact: they add up to it, "
    "with the bias)",
    "approximate": "each tile's approximate contribution to the slide's {target} (CLS "
    "attention × the head on the tile; they do not add up to it)",
    "own": "each tile's own {target} (max pooling: the head on each tile; the slide's is "
    "not a sum of these)",
    "top_share": "each tile's own {target} (top-share pooling: the slide's is the mean of "
    "its highest tiles' own logits)",
    "tile_scorer": "each tile's own {target} by the scorer on the tile's own features (the "
    "slide's comes from a second scorer that also reads the tile's context; the attention "
    "map shows the tiles it averages)",
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
        kinds: maps whose tile scores relate to their prediction otherwise (name → key of
            :data:`TILE_SCORES`): ``tumour`` with top-share tumour pooling.
    """

    slide_id: str
    coords: np.ndarray
    side: float
    maps: dict[str, np.ndarray]
    prediction: dict[str, float] = field(default_factory=dict)
    main: str = "attention"
    tile_scores: TileScoreKind = "exact"
    kinds: dict[str, TileScoreKind] = field(default_factory=dict)

    def kind(self, name: str) -> TileScoreKind:
        """How map ``name``'s tile scores relate to its slide prediction."""
        return self.kinds.get(name, self.tile_scores)


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


def slide_maps(
    model: Any, card: Any, sid: str, coords: np.ndarray, side: float, features: np.ndarray
) -> SlideMaps:
    """All tile maps of one slide (:func:`compute_maps`), with where its tiles lie.

    Args:
        model: a ``SlideModel`` in eval mode.
        card: its registry card (``extra.genes`` names the gene outputs).
        sid: the slide id.
        coords: (N, 2) level-0 top-left corners of its tiles.
        side: level-0 tile side.
        features: (N, D) the tiles' features, in the order of ``coords`` (the feature
            store's); for a model with tile context (card argument ``tumour_context``) the
            context features are made here from them and ``coords``, as training made them.
    """
    if (getattr(card, "arguments", None) or {}).get("tumour_context"):
        features = context_features(features, coords)
    maps, prediction, main, kind = compute_maps(model, card, features)
    kinds: dict[str, TileScoreKind] = {}
    if getattr(model, "tumour_path", None) is not None:
        second = getattr(model, "fraction_scorer", None) is not None  # tile context: two scorers
        shows_second = second and not getattr(model, "map_context", False)
        kinds["tumour"] = "tile_scorer" if shows_second else "top_share"
    return SlideMaps(sid, coords, side, maps, prediction, main, kind, kinds)


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
    top_share = getattr(model, "tumour_path", None) is not None  # its tumour map: own logits
    pairs = [
        (None if top_share else scores.tumour, out.tumour_logit, bias.tumour_logit),
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
