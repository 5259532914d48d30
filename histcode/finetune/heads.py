"""Multi-task heads and the slide model: one aggregator, one head for every task.

One model predicts the tumour logit and, for every gene at once, the log2 fold change
(regression) and the class down / unchanged / up — not one model per gene. The head is a
single linear layer on the slide embedding, so for attention pooling each tile's share of a
slide prediction is exact: ``prediction = bias + Σ_i attention_i · W h_i``
(:meth:`SlideModel.tile_scores`, the input of heatmaps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histcode.builders import Builders
from histcode.finetune.aggregators import (
    FeatureScaler,
    MILOutput,
    aggregators,
    create_aggregator,
    full_mask,
    uniform_weights,
)
from histcode.finetune.context import CONTEXT_FACTOR

#: Order of the per-gene class logits: index = class code + 1 (see ``labels.CLASS_NAMES``).
GENE_CLASSES = ("down", "unchanged", "up")


@dataclass
class HeadOutput:
    """Raw outputs of :class:`MultiTaskHead` for leading dims ``*`` (``B`` or ``B, N``).

    Attributes:
        tumour_logit: (*) tumour logit, or None without the tumour task.
        log2fc: (*, G) predicted log2 fold change, or None without genes.
        gene_logits: (*, G, 3) logits of down / unchanged / up, or None without genes.
        category_logits: one (*, K_c) tensor of class logits per categorical task (empty
            without them).
    """

    tumour_logit: Tensor | None
    log2fc: Tensor | None
    gene_logits: Tensor | None
    category_logits: list[Tensor] = field(default_factory=list)


@dataclass
class SlideOutput(HeadOutput):
    """What :class:`SlideModel` returns for a batch of bags.

    Attributes:
        attention: (B, N) tile attention of the aggregator (None for max pooling).
        instance_logits: (B, N) tile logits of an instance classifier (CLAM), or None.
        embedding: (B, H) slide embeddings.
        branch_attention: (B, T, N) each task's attention (per-task abmil), else None.
        tumour_tile_logits: (B, N) each tile's own tumour logit with top-share tumour
            pooling (:class:`TopShareTumourPath`), else None.
        fraction_logit, fraction_tile_logits: (B,) and (B, N): with tile context, the slide
            and tile logits of the second tumour scorer, on the tiles' own features (loss
            ``fraction``): the genes count tumour with it and the tumour map shows it; else
            None.
    """

    attention: Tensor | None = None
    instance_logits: Tensor | None = None
    embedding: Tensor | None = None
    branch_attention: Tensor | None = None
    tumour_tile_logits: Tensor | None = None
    fraction_logit: Tensor | None = None
    fraction_tile_logits: Tensor | None = None

    @property
    def tumour_prob(self) -> Tensor | None:
        """(B,) probability of tumour."""
        return None if self.tumour_logit is None else torch.sigmoid(self.tumour_logit)

    @property
    def up_prob(self) -> Tensor | None:
        """(B, G) probability that each gene is up-regulated (≥ threshold)."""
        return None if self.gene_logits is None else torch.softmax(self.gene_logits, -1)[..., 2]

    @property
    def up_logits(self) -> Tensor | None:
        """(B, G) logit of up vs the rest, ``log p(up) - log(1 - p(up))``."""
        if self.gene_logits is None:
            return None
        log_p = torch.log_softmax(self.gene_logits, -1)
        return log_p[..., 2] - torch.logsumexp(log_p[..., :2], -1)


class MultiTaskHead(nn.Module):
    """Linear heads on a slide embedding: tumour logit, per-gene log2FC and class logits, and
    the class logits of each categorical task.

    Args:
        in_dim: embedding size ``H``.
        tumour: predict tumour vs normal.
        n_genes: number of genes ``G`` (0 for none).
        dropout: dropout on the embedding.
        n_classes: number of classes of each categorical task (``subtype``, ``msi``, …).
    """

    def __init__(
        self,
        in_dim: int,
        tumour: bool = True,
        n_genes: int = 0,
        dropout: float = 0.0,
        n_classes: Sequence[int] = (),
    ):
        super().__init__()
        self.n_classes = [int(k) for k in n_classes]
        if not tumour and n_genes < 1 and not self.n_classes:
            raise ValueError("a head needs a task: tumour=True, n_genes ≥ 1 or n_classes")
        if any(k < 2 for k in self.n_classes):
            raise ValueError(f"a categorical task needs ≥ 2 classes, got {self.n_classes}")
        self.tumour, self.n_genes = tumour, n_genes
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, int(tumour) + 4 * n_genes + sum(self.n_classes))
        # the task of each output: 0 = tumour (when predicted), then one per gene (its
        # log2FC and its three class logits), then one per categorical task (its class
        # logits) — the attention branch of per-task pooling
        t = int(tumour)
        task = (
            [0] * t
            + [t + g for g in range(n_genes)]
            + [t + g for g in range(n_genes) for _ in range(3)]
            + [t + n_genes + c for c, k in enumerate(self.n_classes) for _ in range(k)]
        )
        self.register_buffer(
            "task_of_output", torch.tensor(task, dtype=torch.long), persistent=False
        )

    def split(self, raw: Tensor) -> HeadOutput:
        """Split raw outputs (*, 1 + 4G + ΣK) into a :class:`HeadOutput`."""
        g, t = self.n_genes, int(self.tumour)
        start = t + 4 * g
        categories = []
        for k in self.n_classes:
            categories.append(raw[..., start : start + k])
            start += k
        return HeadOutput(
            tumour_logit=raw[..., 0] if self.tumour else None,
            log2fc=raw[..., t : t + g] if g else None,
            gene_logits=raw[..., t + g : t + 4 * g].unflatten(-1, (g, 3)) if g else None,
            category_logits=categories,
        )

    def forward(self, embedding: Tensor) -> HeadOutput:
        """Embeddings (*, H) → :class:`HeadOutput` with leading dims ``*``."""
        return self.split(self.linear(self.dropout(embedding)))

    def forward_per_task(self, embeddings: Tensor) -> HeadOutput:
        """One embedding per task (B, T, H) → :class:`HeadOutput` with leading dim ``B``.

        Each output reads its own task's embedding: the tumour logit from task 0's, a gene's
        log2FC and class logits from that gene's, a categorical task's logits from its own.
        """
        raw = self.linear(self.dropout(embeddings))  # (B, T, outputs)
        index = self.task_of_output.expand(raw.shape[0], 1, -1)
        return self.split(raw.gather(1, index).squeeze(1))


@dataclass
class TileScores:
    """Each tile's contribution to the slide's raw outputs (for heatmaps).

    For attention and mean pooling, ``attention_i · W h_i`` — summed over a bag's tiles
    plus the head's bias it gives the slide's logits exactly; for max pooling, each tile's own
    prediction ``W h_i + b``; for the transformer, CLS attention × ``W h_i`` (approximate).

    Attributes:
        tumour: (B, N) contribution to the tumour logit, or None.
        log2fc: (B, N, G) contribution to the predicted log2FC, or None.
        up: (B, N, G) contribution to the up-class logit, or None.
        categories: one (B, N, K_c) tensor per categorical task: each tile's contribution to
            each class logit (empty without them).
    """

    tumour: Tensor | None
    log2fc: Tensor | None
    up: Tensor | None
    categories: list[Tensor] = field(default_factory=list)


class CompositionPath(nn.Module):
    """A linear path from the mean of the standardised tile features to the gene outputs.

    Bulk expression is a sum over the cells of the sample, so a gene that follows a tissue's
    share of the slide is a linear function of the *mean* tile feature — the model of the
    naive baseline (``linear`` aggregator). Attention normalises that share away (it
    chooses where to look, not how much there is), and a tile MLP shared with the tumour task
    need not keep it. This path adds ``W · mean_i(x̂_i)`` to each gene's log2FC and class
    logits, ``x̂`` the features standardised with the training tiles' statistics; each tile
    contributes exactly ``W x̂_i / n`` to the slide output, so the maps stay exact.

    Args:
        in_dim: tile feature size ``D``.
        outputs: gene outputs ``4G`` (log2FC, then three class logits per gene).
    """

    def __init__(self, in_dim: int, outputs: int) -> None:
        super().__init__()
        self.scale = FeatureScaler(in_dim)
        self.linear = nn.Linear(in_dim, outputs, bias=False)  # the head has the biases
        nn.init.zeros_(self.linear.weight)  # starts as the attention model alone

    def tiles(self, features: Tensor, mask: Tensor) -> Tensor:
        """Each tile's contribution (B, N, 4G): ``W x̂_i / n``, 0 on padding."""
        x = self.scale(features, mask)
        return self.linear(x) * uniform_weights(mask, x.dtype)[..., None]

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        """Features (B, N, D), mask (B, N) → gene outputs (B, 4G)."""
        return self.tiles(features, mask).sum(1)


class TopShareTumourPath(nn.Module):
    """Tumour from the tiles that look most like tumour: a linear tile scorer, top-share pooling.

    Each tile gets its own tumour logit ``t_i = w · x̂_i + b`` (``x̂`` the features
    standardised with the training tiles' statistics); a slide's tumour logit is the mean of
    its highest ``share`` of tile logits (at least one tile). Trained with the slide label
    *and* with every tile of a normal slide as a known negative
    (:func:`known_negative_loss`), this is multiple-instance learning in its original form
    (a bag is positive when some of its instances are): a normal slide says that none of
    its tiles is tumour, a tumour slide only that its top tiles are. Attention pooling,
    trained on slide labels alone, has to find 2–10 % foci among tissue that differs from
    slide to slide in stain and composition; here every normal tile in the training folds
    teaches the scorer what tumour is not.

    Args:
        in_dim: tile feature size ``D`` the scorer reads.
        share: share of a slide's tiles its tumour logit averages (0 < share ≤ 1).
        skip: leading feature columns the scorer does not read: its input is ``(B, N, skip +
            D)`` and it scores the last ``D``. With tile context, ``2 D`` leaves out the
            tiles' absolute features and keeps the ones relative to the slide
            (``tumour_relative``).
    """

    def __init__(self, in_dim: int, share: float = 0.05, skip: int = 0) -> None:
        super().__init__()
        if not 0 < share <= 1:
            raise ValueError(f"tumour top share must be in (0, 1], got {share}")
        self.share = share
        self.skip = int(skip)
        self.scale = FeatureScaler(in_dim)
        self.linear = nn.Linear(in_dim, 1)

    def read(self, features: Tensor) -> Tensor:
        """The columns the scorer reads: ``(…, skip + D)`` → ``(…, D)``."""
        return features[..., self.skip :] if self.skip else features

    def tiles(self, features: Tensor, mask: Tensor) -> Tensor:
        """Features (B, N, skip + D), mask (B, N) → each tile's tumour logit (B, N)."""
        return self.linear(self.scale(self.read(features), mask)).squeeze(-1)

    def weights(self, logits: Tensor, mask: Tensor) -> Tensor:
        """Pooling weights (B, N): ``1 / k`` on a slide's ``k`` highest-scoring valid tiles
        (``k = max(1, round(share · n))``), 0 elsewhere."""
        n = mask.sum(1)
        k = torch.clamp(torch.round(n.to(logits.dtype) * self.share), min=1).to(n.dtype)
        k = torch.minimum(k, n.clamp(min=1))
        ranked = logits.detach().masked_fill(~mask, float("-inf"))
        order = ranked.argsort(1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        chosen = (rank < k[:, None]) & mask
        return chosen.to(logits.dtype) / k[:, None].to(logits.dtype)

    def forward(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Features (B, N, D), mask (B, N) → slide logit (B,), tile logits (B, N) and the
        pooling weights (B, N)."""
        logits = self.tiles(features, mask)
        weights = self.weights(logits, mask)
        return (weights * logits.masked_fill(~mask, 0.0)).sum(1), logits, weights


class TumourFractionPath(nn.Module):
    """Gene outputs linear in the slide's estimated tumour fraction.

    Bulk expression is a sum over the sample's cells, so a gene made by tumour cells follows
    the tumour's share of the tissue (its purity). With top-share pooling every tile has a
    tumour probability ``σ(t_i)`` (:class:`TopShareTumourPath`, trained with normal slides'
    tiles as negatives); their mean over the slide estimates the tumour fraction ``f̂``, and
    this path adds ``w · f̂`` to each gene's log2FC and class logits. Each tile contributes
    exactly ``w σ(t_i) / n``, so the maps stay exact. The tumour logits are detached: the
    genes read the tumour scorer, they do not train it.

    Args:
        outputs: gene outputs ``4G`` (log2FC, then three class logits per gene).
    """

    #: the fraction's scale inside the path. A gene's log2FC moves several units over the
    #: range of tumour fractions, and Adam moves a weight by about its learning rate a step:
    #: from 0, an unscaled weight needs thousands of steps to get there, while the attention
    #: branches fit the same genes (less well) in tens (on the easy demo, tumour-burden genes
    #: r 0.38 with gain 1, 0.54 with the equivalent of gain 5).
    GAIN = 10.0

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(1, outputs, bias=False)  # the head has the biases
        nn.init.zeros_(self.linear.weight)  # starts as the model without it

    def tiles(self, tumour_logits: Tensor, mask: Tensor) -> Tensor:
        """Tile tumour logits (B, N), mask (B, N) → each tile's contribution (B, N, 4G)."""
        p = torch.sigmoid(tumour_logits.detach()) * mask * self.GAIN
        return self.linear((p * uniform_weights(mask, p.dtype))[..., None])

    def forward(self, tumour_logits: Tensor, mask: Tensor) -> Tensor:
        """Tile tumour logits (B, N), mask (B, N) → gene outputs (B, 4G)."""
        return self.tiles(tumour_logits, mask).sum(1)


def known_negative_loss(tile_logits: Tensor, mask: Tensor, tumour: Tensor) -> Tensor | None:
    """Binary cross-entropy of every tile of a normal slide against "not tumour".

    Args:
        tile_logits: (B, N) tile tumour logits (:class:`TopShareTumourPath`).
        mask: (B, N) bool, valid tiles.
        tumour: (B,) slide labels: 1 tumour, 0 normal, NaN unknown.

    Returns:
        Mean over the normal slides of each one's mean tile loss, or None when the batch
        holds no normal slide.
    """
    normal = (tumour == 0) & mask.any(1)
    if not normal.any():
        return None
    per_tile = F.binary_cross_entropy_with_logits(
        tile_logits[normal], torch.zeros_like(tile_logits[normal]), reduction="none"
    )
    m = mask[normal].to(per_tile.dtype)
    return ((per_tile * m).sum(1) / m.sum(1)).mean()


class SlideModel(nn.Module):
    """An aggregator and a multi-task head.

    Args:
        aggregator: a module from :data:`~histcode.finetune.aggregators.aggregators`.
        head: the :class:`MultiTaskHead` on its embedding.
        composition: the :class:`CompositionPath` added to the gene outputs, or None.
        tumour_path: a :class:`TopShareTumourPath` that gives the tumour logit (and, with
            attention pooling, the tumour task's pooling weights) instead of the head, or None.
        fraction: a :class:`TumourFractionPath` on the tumour path's tile logits, added to the
            gene outputs, or None (needs ``tumour_path``).
        own_dim: with tile context (``tumour_context``), the size ``D`` of a tile's own
            features: the model then takes ``(B, N, 4D)`` context features
            (:func:`histcode.finetune.context.context_features`), the tumour path reads all of
            them and the aggregator and the composition path the first ``D`` (the tile's own).
            None: the model takes ``(B, N, D)`` and every part reads them.
        fraction_scorer: with tile context, a second :class:`TopShareTumourPath` on the
            tiles' own features, trained on the tumour labels like the first (loss
            ``fraction``): the fraction path reads its tile probabilities and, unless
            ``map_context``, the tumour map (:meth:`tile_scores`) is its tile logits. From a
            random start the context scorer gives the slide's tumour logit, but what it ranks
            highest is not where tumour is: context features are relative to the slide's
            median tile, itself tumour in a slide that is mostly tumour, and its tile logits
            found tumour at AUROC 0.34 (easy demo) and 0.50 (hard demo) against 0.95 and 0.69
            for a scorer on the tiles' own features; the genes read through it lost their
            tumour-burden signal (r 0.61 → 0.40, easy demo).
        map_context: the tumour map is the tumour path's tile logits (on the context
            features) even with a ``fraction_scorer``: warm-started
            (:mod:`histcode.finetune.warmstart`), the context scorer ranks a slide's tiles
            better than the second scorer does (``ModelOptions.tumour_map``).
    """

    def __init__(
        self,
        aggregator: nn.Module,
        head: MultiTaskHead,
        composition: CompositionPath | None = None,
        tumour_path: TopShareTumourPath | None = None,
        fraction: TumourFractionPath | None = None,
        own_dim: int | None = None,
        fraction_scorer: TopShareTumourPath | None = None,
        map_context: bool = False,
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.head = head
        self.composition = composition
        self.tumour_path = tumour_path if head.tumour else None
        self.fraction = fraction if self.tumour_path is not None and head.n_genes else None
        self.own_dim = own_dim
        self.fraction_scorer = fraction_scorer if self.tumour_path is not None else None
        self.map_context = map_context

    def _own(self, features: Tensor) -> Tensor:
        """The tiles' own features (B, N, D) of the model's input (see ``own_dim``)."""
        return features if self.own_dim is None else features[..., : self.own_dim]

    def _add_gene_tiles(self, raw: Tensor, extra: Tensor) -> Tensor:
        """Tile outputs ``raw`` (B, N, outputs) plus a path's tile contributions ``extra``
        (B, N, 4G) on the gene outputs."""
        t, g4 = int(self.head.tumour), 4 * self.head.n_genes
        return torch.cat([raw[..., :t], raw[..., t : t + g4] + extra, raw[..., t + g4 :]], -1)

    def _add_genes(self, out: HeadOutput, genes: Tensor) -> None:
        """Add a path's gene outputs ``genes`` (B, 4G: log2FC, then the class logits) to
        ``out``'s log2FC (B, G) and class logits (B, G, 3), in place."""
        g = self.head.n_genes
        out.log2fc = out.log2fc + genes[:, :g]  # type: ignore[operator]
        out.gene_logits = out.gene_logits + genes[:, g:].unflatten(-1, (g, 3))  # type: ignore[operator]

    def forward(self, features: Tensor, mask: Tensor | None = None) -> SlideOutput:
        """Predict slides.

        Args:
            features: (B, N, D) tile features, padded.
            mask: (B, N) bool, True for real tiles; ``None`` means no padding.

        Returns:
            :class:`SlideOutput`: tumour logit (B,), log2fc (B, G), gene logits (B, G, 3),
            attention (B, N).
        """
        mask = full_mask(features) if mask is None else mask
        own = self._own(features)
        pooled: MILOutput = self.aggregator(own, mask)
        if pooled.branch_embeddings is not None:
            head = self.head.forward_per_task(pooled.branch_embeddings)
        else:
            head = self.head(pooled.embedding)
        if self.composition is not None and self.head.n_genes:
            self._add_genes(head, self.composition(own, mask))
        out = SlideOutput(
            tumour_logit=head.tumour_logit,
            log2fc=head.log2fc,
            gene_logits=head.gene_logits,
            category_logits=head.category_logits,
            attention=pooled.attention,
            instance_logits=pooled.instance_logits,
            embedding=pooled.embedding,
            branch_attention=pooled.branch_attention,
        )
        if self.tumour_path is not None:
            self._top_share_tumour(out, features, mask)
        return out

    def _own_tumour_tiles(self, features: Tensor, mask: Tensor) -> Tensor:
        """Each tile's own tumour logit (B, N), as the tumour map shows it and the fraction
        path reads it: the second scorer's on the tiles' own features when there is one
        (tile context), else the tumour path's."""
        if self.fraction_scorer is not None:
            return self.fraction_scorer.tiles(self._own(features), mask)
        return self.tumour_path.tiles(features, mask)  # type: ignore[union-attr]

    def _top_share_tumour(self, out: SlideOutput, features: Tensor, mask: Tensor) -> None:
        """Replace ``out``'s tumour logit by the :class:`TopShareTumourPath`'s; with per-task
        attention, the tumour branch's weights by the path's pooling weights (what the tumour
        logit now looks at)."""
        slide, tiles, weights = self.tumour_path(features, mask)  # type: ignore[misc]
        out.tumour_logit = slide
        out.tumour_tile_logits = tiles
        if self.fraction_scorer is not None:
            out.fraction_logit, out.fraction_tile_logits, _ = self.fraction_scorer(
                self._own(features), mask
            )
        if self.fraction is not None:  # set only with genes
            read = tiles if out.fraction_tile_logits is None else out.fraction_tile_logits
            self._add_genes(out, self.fraction(read, mask))
        if out.branch_attention is not None:  # branch 0 is the tumour's (and ``attention``)
            out.branch_attention = torch.cat(
                [weights[:, None].to(out.branch_attention), out.branch_attention[:, 1:]], 1
            )
            out.attention = out.branch_attention[:, 0]

    @torch.no_grad()
    def tile_scores(self, features: Tensor, mask: Tensor | None = None) -> TileScores:
        """Each tile's contribution to the slide predictions (see :class:`TileScores`).

        Args:
            features: (B, N, D) tile features, padded.
            mask: (B, N) bool; padded tiles score 0.

        Returns:
            :class:`TileScores` (raw logit / log2FC units).
        """
        mask = full_mask(features) if mask is None else mask
        pooled: MILOutput = self.aggregator(self._own(features), mask)
        if pooled.tiles is None:
            raise ValueError(f"{type(self.aggregator).__name__} exposes no tile embeddings")
        raw = pooled.tiles @ self.head.linear.weight.T  # (B, N, outputs), no bias
        if pooled.branch_attention is not None:  # each output weighs tiles by its task's branch
            raw = raw * pooled.branch_attention[:, self.head.task_of_output].transpose(1, 2)
        elif pooled.attention is not None:
            raw = raw * pooled.attention[..., None]
        else:
            raw = raw + self.head.linear.bias
        if self.composition is not None and self.head.n_genes:
            raw = self._add_gene_tiles(raw, self.composition.tiles(self._own(features), mask))
        if self.tumour_path is not None:  # each tile's own tumour logit (see TopShareTumourPath)
            own = self._own_tumour_tiles(features, mask)
            if self.fraction is not None:
                raw = self._add_gene_tiles(raw, self.fraction.tiles(own, mask))
            shown = self.tumour_path.tiles(features, mask) if self.map_context else own
            raw = torch.cat([shown[..., None], raw[..., 1:]], -1)
        raw = raw * mask[..., None]
        parts = self.head.split(raw)
        up = None if parts.gene_logits is None else parts.gene_logits[..., 2]
        return TileScores(
            tumour=parts.tumour_logit,
            log2fc=parts.log2fc,
            up=up,
            categories=parts.category_logits,
        )


def build_slide_model(
    architecture: str,
    in_dim: int,
    hidden: int = 128,
    dropout: float = 0.25,
    tumour: bool = True,
    n_genes: int = 0,
    options: dict[str, Any] | None = None,
    composition: bool = False,
    n_classes: Sequence[int] = (),
    tumour_pooling: str = "attention",
    tumour_top_share: float = 0.05,
    tumour_fraction_genes: bool = False,
    tumour_context: bool = False,
    tumour_map: str = "own",
    tumour_relative: bool = False,
) -> SlideModel:
    """A :class:`SlideModel` with the aggregator ``architecture`` (registry card arguments).

    Args:
        architecture: an aggregator name (``abmil``, ``clam_sb``, ``mean``, ``max``,
            ``transformer``).
        in_dim: tile feature size ``D``.
        hidden: embedding size ``H``.
        dropout: dropout of the aggregator and the head.
        tumour: predict tumour vs normal.
        n_genes: number of genes.
        options: further keyword arguments of the aggregator (e.g. ``{"layers": 1}``);
            abmil's ``branches`` is ``shared`` (one attention for all tasks) or ``per_task``
            (one attention branch for tumour and one for each gene); with ``per_task``,
            ``gene_pooling`` (``softmax``, ``sigmoid`` or ``mean``) is how the genes' branches
            weigh their tiles, while the tumour branch keeps ``normalise``.
        composition: add the :class:`CompositionPath` to the gene outputs.
        n_classes: classes of each categorical task (one attention branch each with
            ``per_task``, pooling like the tumour branch).
        tumour_pooling: ``attention`` (the tumour logit from the aggregator's embedding) or
            ``top_share`` (from the :class:`TopShareTumourPath`: each tile scored on its own, the
            slide's logit the mean of its top ``tumour_top_share`` of tiles).
        tumour_top_share: share of a slide's tiles the top-share tumour logit averages.
        tumour_fraction_genes: add the :class:`TumourFractionPath` to the gene outputs
            (needs ``top_share`` tumour pooling and genes).
        tumour_context: the model takes context features (``(B, N, 4D)``,
            :func:`histcode.finetune.context.context_features`) and the top-share tumour path
            reads all of them; everything else reads the tiles' own ``D`` (needs
            ``top_share``).
        tumour_map: with ``tumour_context``, the tile logits the tumour map shows: ``own``,
            the second scorer's on the tiles' own features (the one the genes' tumour
            fraction reads), or ``context``, the tumour scorer's.
        tumour_relative: with ``tumour_context``, the tumour scorer reads only the context
            features relative to the slide's median tile (the last ``2D``), not the tiles'
            absolute features, which carry the slide's stain and site.
    """
    if tumour_pooling not in ("attention", "top_share"):
        raise ValueError(
            f"tumour_pooling must be 'attention' or 'top_share', not {tumour_pooling!r}"
        )
    options = dict(options or {})
    head_tasks = int(tumour) + n_genes + len(n_classes)
    if "branches" in options:
        if architecture != "abmil":
            raise ValueError(f"only abmil has attention branches, not {architecture!r}")
        if options["branches"] not in ("shared", "per_task"):
            raise ValueError(
                f"abmil branches must be 'shared' (one attention for every task) or "
                f"'per_task' (one attention per task), not {options['branches']!r}"
            )
        options["branches"] = head_tasks if options["branches"] == "per_task" else 1
    gene_pooling = options.pop("gene_pooling", None)
    if gene_pooling is not None and n_genes > 0:  # without genes there is nothing to pool
        if architecture == "abmil" and options.get("branches", 1) == head_tasks:
            tumour_normalise = options.get("normalise", "softmax")
            options["normalise"] = (
                [tumour_normalise] * int(tumour)
                + [gene_pooling] * n_genes
                + [tumour_normalise] * len(n_classes)
            )
        elif gene_pooling != "softmax":
            raise ValueError(
                f"gene_pooling {gene_pooling!r} needs abmil with one attention branch per task "
                "(model.attention: per_task); drop gene_pooling, or use per_task"
            )
    aggregator = create_aggregator(architecture, in_dim, hidden=hidden, dropout=dropout, **options)
    head = MultiTaskHead(aggregator.out_dim, tumour, n_genes, dropout, n_classes)
    path = CompositionPath(in_dim, 4 * n_genes) if composition and n_genes else None
    if tumour_context and not (tumour and tumour_pooling == "top_share"):
        raise ValueError(
            "tumour_context feeds the top-share tumour scorer: it needs the tumour task and "
            "tumour_pooling 'top_share'"
        )
    if tumour_relative and not tumour_context:
        raise ValueError(
            "tumour_relative leaves out the absolute half of the tile context features: it "
            "needs tumour_context"
        )
    skip = 2 * in_dim if tumour_relative else 0  # context_features: [x, m, x - med, m - med]
    top = (
        TopShareTumourPath(
            in_dim * (CONTEXT_FACTOR if tumour_context else 1) - skip, tumour_top_share, skip
        )
        if tumour and tumour_pooling == "top_share"
        else None
    )
    if tumour_fraction_genes and (top is None or not n_genes):
        raise ValueError(
            "tumour_fraction_genes reads the top-share tumour scorer's tile probabilities: it "
            "needs tumour_pooling 'top_share', the tumour task and genes"
        )
    fraction = TumourFractionPath(4 * n_genes) if tumour_fraction_genes else None
    counter = TopShareTumourPath(in_dim, tumour_top_share) if tumour_context else None
    own_dim = in_dim if tumour_context else None
    if tumour_map not in ("own", "context") or (tumour_map == "context" and not tumour_context):
        raise ValueError(
            f"tumour_map must be 'own', or 'context' with tumour_context; not {tumour_map!r}"
        )
    return SlideModel(
        aggregator, head, path, top, fraction, own_dim, counter, tumour_map == "context"
    )


def slide_model_builders() -> Builders[SlideModel]:
    """Builders of whole slide models, one per aggregator name, for ``Registry.load``.

    Example:
        >>> model, card = Registry().load("tumour-abmil@1", builders=slide_model_builders())
    """
    builders: Builders[SlideModel] = Builders("MIL slide model")
    for name in aggregators.names():

        def build(_name: str = name, **arguments: Any) -> SlideModel:
            return build_slide_model(_name, **arguments)

        builders.register(name)(build)
    return builders


__all__ = [
    "GENE_CLASSES",
    "CompositionPath",
    "HeadOutput",
    "MultiTaskHead",
    "SlideModel",
    "SlideOutput",
    "TileScores",
    "TopShareTumourPath",
    "TumourFractionPath",
    "build_slide_model",
    "known_negative_loss",
    "slide_model_builders",
]
