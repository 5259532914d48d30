"""MIL aggregators: a bag of tile embeddings → one slide embedding (and tile attention).

Every aggregator is an ``nn.Module`` with one fixed interface::

    out = aggregator(features, mask)   # features (B, N, D); mask (B, N) bool, True = a tile
    out.embedding                      # (B, H) the slide embedding
    out.attention                      # (B, N) pooling weights over valid tiles, or None
    out.instance_logits                # (B, N) tile-level tumour logits (CLAM), or None
    out.tiles                          # (B, N, H) tile embeddings in the space of `embedding`

Every aggregator first standardises the features with the statistics of its training tiles
(:class:`FeatureScaler`, kept in the checkpoint), so it learns alike from encoders whose
features have very different scales. Bags of different sizes are padded to a common ``N``;
padded tiles (``mask`` False) never touch the result, so a batch of padded bags gives the
same outputs as each bag alone.
Aggregators are registered in :data:`aggregators` (``create_aggregator("abmil", in_dim=512)``):

* ``abmil`` — gated attention MIL (Ilse, Tomczak & Welling 2018, "Attention-based deep multiple
  instance learning").
* ``clam_sb`` — CLAM single branch (Lu et al. 2021, "Data-efficient and weakly supervised
  computational pathology on whole-slide images"): gated attention plus an instance classifier
  trained on the top-k / bottom-k attended tiles (:meth:`CLAMSB.instance_loss`).
* ``mean`` and ``max`` — pooling baselines (a tile MLP, then the mean or maximum).
* ``linear`` — the naive baseline: the mean of the raw features and the linear head, i.e. a
  linear model on mean-pooled features.
* ``transformer`` — a small transformer MIL: a CLS token and 1–2 pre-norm self-attention
  layers with a key padding mask; attention is the CLS token's attention in the last layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histcode.builders import Builders

#: The aggregator registry: name → builder taking ``in_dim``, ``hidden``, ``dropout``, options.
aggregators: Builders[nn.Module] = Builders("aggregator")


@dataclass
class MILOutput:
    """What an aggregator returns.

    Attributes:
        embedding: (B, H) slide embeddings.
        attention: (B, N) pooling weights, 0 on padding, summing to 1 over each bag's valid
            tiles (abmil with ``normalise: sigmoid``: at most 1); ``None`` for max pooling.
        instance_logits: (B, N) tile-level logits of an instance classifier (CLAM), or None.
        tiles: (B, N, H) tile embeddings in the space of ``embedding`` (for tile-level scores).
        branch_embeddings: (B, K, H) one slide embedding per attention branch (abmil with
            ``branches`` > 1), else None; ``embedding`` is then their mean.
        branch_attention: (B, K, N) each branch's pooling weights, else None; ``attention``
            is then branch 0's.
    """

    embedding: Tensor
    attention: Tensor | None
    instance_logits: Tensor | None = None
    tiles: Tensor | None = None
    branch_embeddings: Tensor | None = None
    branch_attention: Tensor | None = None


def full_mask(features: Tensor) -> Tensor:
    """(B, N) all-True mask for unpadded ``features`` (B, N, D)."""
    return torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``mask``; exactly 0 on masked entries.

    Args:
        scores: (B, N) scores.
        mask: (B, N) bool, True where a score takes part.

    Returns:
        (B, N) weights summing to 1 over the True entries of each row (0 for an all-False row).
    """
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * mask


#: How abmil turns attention scores into pooling weights (see :class:`AttentionMIL`).
NORMALISE = ("softmax", "sigmoid", "mean")


def uniform_weights(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, N) weights ``1 / n_tiles`` on each bag's valid tiles, 0 on padding (mean pooling)."""
    return mask.to(dtype) / mask.sum(-1, keepdim=True).clamp(min=1)


class FeatureScaler(nn.Module):
    """Standardises tile features per dimension with the mean and sd of the training tiles.

    The statistics accumulate over every valid tile seen in training mode (a StandardScaler
    fitted online, padding excluded) and are fixed in eval mode; they are buffers, so they
    travel with the checkpoint. Encoders give features of very different scales (a small
    SimCLR CNN: per-dimension sd 0.03 in one run, 0.06 in another), and unscaled inputs left
    the tile layer learning at a different speed per encoder run — attention was still flat
    after 100 epochs on one run and sharp on another. With fewer than 2 tiles seen (and in
    models saved before the scaler existed) it is the identity. A feature the training tiles
    hold constant is centred but not scaled (see :meth:`statistics`).

    Args:
        dim: feature size ``D``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros(dim, dtype=torch.float64))

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:
        """Features (B, N, D) with mask (B, N) → standardised features (B, N, D)."""
        if self.training:
            with torch.no_grad():
                tiles = features[mask].double()
                self.count += tiles.shape[0]
                self.total += tiles.sum(0)
                self.total_sq += tiles.square().sum(0)
        if self.count < 2:
            return features
        mean, scale = self.statistics()
        return (features - mean.to(features.dtype)) / scale.to(features.dtype)

    def statistics(self) -> tuple[Tensor, Tensor]:
        """The training tiles' mean (D,) and the scale (D,) features are divided by.

        The scale is the sd, except where the training tiles hold the feature (nearly)
        constant — a dead ReLU channel, a constant offset: there it is 1, as scikit-learn's
        ``StandardScaler`` does. Dividing by a variance of ~0 would turn the first held-out tile
        that differs in that channel into an outlier of thousands of sds. "Nearly constant"
        is a variance at most ``1e-10 · E[x²]``: above the float64 rounding of
        ``E[x²] − E[x]²``, far below the resolution of float16/float32 features.
        """
        mean = self.total / self.count.clamp(min=1)
        mean_sq = self.total_sq / self.count.clamp(min=1)
        var = (mean_sq - mean.square()).clamp(min=0)
        constant = var <= 1e-10 * mean_sq  # an all-zero channel too (0 <= 0)
        return mean, torch.where(constant, torch.ones_like(var), var.sqrt())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name, buffer in self.named_buffers(recurse=False):  # models saved before: identity
            state_dict.setdefault(prefix + name, torch.zeros_like(buffer))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _tile_mlp(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))


class GatedAttention(nn.Module):
    """Attention scores of Ilse et al. 2018: ``w^T (tanh(V h) ⊙ sigmoid(U h))``.

    Args:
        dim: tile embedding size ``H``.
        attention_dim: size of the attention layer.
        gated: use the gate (``sigmoid(U h)``); ``False`` gives plain ``w^T tanh(V h)``.
        dropout: dropout on the attention layer.
        branches: independent score vectors ``w`` over the shared layer (CLAM-MB style);
            each gives its own attention over the tiles.
    """

    def __init__(
        self,
        dim: int,
        attention_dim: int,
        gated: bool = True,
        dropout: float = 0.0,
        branches: int = 1,
    ):
        super().__init__()
        self.branches = branches
        self.value = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate = (
            nn.Sequential(nn.Linear(dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout))
            if gated
            else None
        )
        self.score = nn.Linear(attention_dim, branches)

    def forward(self, tiles: Tensor) -> Tensor:
        """Scores of tile embeddings (B, N, H): (B, N) for one branch, else (B, K, N)."""
        a = self.value(tiles)
        if self.gate is not None:
            a = a * self.gate(tiles)
        scores = self.score(a)
        return scores.squeeze(-1) if self.branches == 1 else scores.transpose(1, 2)


class AttentionMIL(nn.Module):
    """Gated attention MIL (Ilse et al. 2018): attention-weighted mean of tile embeddings.

    Args:
        in_dim: tile feature size ``D``.
        hidden: embedding size ``H`` (tile MLP output and slide embedding).
        dropout: dropout after the tile MLP and in the attention layer.
        attention_dim: attention layer size (default ``hidden // 2``).
        gated: gated attention (``True``) or plain tanh attention.
        normalise: ``softmax`` (Ilse et al.: weights sum to 1 over the bag), ``sigmoid``
            (each tile's weight is ``sigmoid(score) / n_tiles``: the embedding keeps *how
            much* of the attended tissue a slide has, which softmax normalises away — for
            targets that follow tissue fractions, such as expression) or ``mean`` (weights
            ``1 / n_tiles``: plain mean pooling, additive in the tissue's composition); with
            branches, a list gives each branch its own (the slide model's ``gene_pooling``).
        branches: attention branches ``K``, each with its own weights over the tiles and its
            own slide embedding (the tile MLP and the attention layer are shared, as in
            CLAM-MB). The slide model gives every task its own branch (abmil option
            ``branches: per_task``), so the tumour attention is not pulled towards the tiles
            the genes need, and each gene can pool the tissue its expression follows.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 128,
        dropout: float = 0.25,
        attention_dim: int | None = None,
        gated: bool = True,
        normalise: str | list[str] = "softmax",
        branches: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(branches, int) or branches < 1:
            raise ValueError(f"abmil branches must be a whole number ≥ 1, not {branches!r}")
        per_branch = [normalise] * branches if isinstance(normalise, str) else list(normalise)
        if len(per_branch) != branches or not set(per_branch) <= set(NORMALISE):
            raise ValueError(
                f"abmil normalise must be one of {NORMALISE}, or a list of one per branch "
                f"({branches}), not {normalise!r}"
            )
        self.normalise, self.branches, self.per_branch = normalise, branches, per_branch
        self.in_dim, self.out_dim = in_dim, hidden
        self.scale = FeatureScaler(in_dim)
        self.tile = _tile_mlp(in_dim, hidden, dropout)
        self.attention = GatedAttention(
            hidden, attention_dim or max(hidden // 2, 1), gated, dropout, branches
        )

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Pool bags.

        Args:
            features: (B, N, D) tile features, padded.
            mask: (B, N) bool, True for real tiles; ``None`` means no padding.

        Returns:
            :class:`MILOutput` with ``embedding`` (B, H), ``attention`` (B, N), ``tiles``
            (B, N, H); with branches also ``branch_embeddings`` (B, K, H) and
            ``branch_attention`` (B, K, N).
        """
        mask = full_mask(features) if mask is None else mask
        tiles = self.tile(self.scale(features, mask))
        scores = self.attention(tiles)  # (B, N), or (B, K, N) for K branches
        if self.branches > 1:
            mask = mask[:, None]
        weights = self._weights(scores, mask)
        if self.branches == 1:
            embedding = torch.einsum("bn,bnh->bh", weights, tiles)
            return MILOutput(embedding=embedding, attention=weights, tiles=tiles)
        per_branch = torch.einsum("bkn,bnh->bkh", weights, tiles)
        return MILOutput(
            embedding=per_branch.mean(1),
            attention=weights[:, 0],
            tiles=tiles,
            branch_embeddings=per_branch,
            branch_attention=weights,
        )

    def _weights(self, scores: Tensor, mask: Tensor) -> Tensor:
        """Pooling weights from scores (B, N), or (B, K, N) with ``mask`` (B, 1, N): each
        branch normalised its own way (``normalise``)."""
        kinds = sorted(set(self.per_branch))
        by_kind = {}
        for kind in kinds:
            if kind == "softmax":
                by_kind[kind] = masked_softmax(scores, mask)
            elif kind == "sigmoid":
                by_kind[kind] = torch.sigmoid(scores) * uniform_weights(mask, scores.dtype)
            else:
                by_kind[kind] = uniform_weights(mask, scores.dtype).expand_as(scores)
        if len(kinds) == 1:
            return by_kind[kinds[0]]
        rows = [by_kind[kind][:, k] for k, kind in enumerate(self.per_branch)]
        return torch.stack(rows, 1)  # (B, K, N)


class CLAMSB(AttentionMIL):
    """CLAM single branch (Lu et al. 2021): gated attention MIL plus an instance classifier.

    The instance classifier scores each tile as tumour evidence. :meth:`instance_loss` trains
    it on pseudo-labels from the attention: in a tumour slide the ``k`` most attended tiles are
    positive and the ``k`` least attended negative; in a normal slide the ``k`` most attended
    tiles are negative (no tile of normal tissue is tumour — CLAM's out-of-class constraint).

    Args:
        in_dim, hidden, dropout, attention_dim, gated: as :class:`AttentionMIL`.
        k: tiles per pseudo-label group (CLAM's ``k_sample``; fewer in bags under ``2k`` tiles).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 128,
        dropout: float = 0.25,
        attention_dim: int | None = None,
        gated: bool = True,
        k: int = 8,
    ) -> None:
        super().__init__(in_dim, hidden, dropout, attention_dim, gated)
        if k < 1:
            raise ValueError(f"CLAM k (tiles per pseudo-label group) must be ≥ 1, got {k}")
        self.k = k
        self.instance = nn.Linear(hidden, 1)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """As :meth:`AttentionMIL.forward`, plus ``instance_logits`` (B, N)."""
        out = super().forward(features, mask)
        out.instance_logits = self.instance(out.tiles).squeeze(-1)
        return out

    def instance_loss(
        self, attention: Tensor, instance_logits: Tensor, mask: Tensor, labels: Tensor
    ) -> Tensor:
        """CLAM's instance-level loss (binary cross-entropy on attention pseudo-labels).

        Args:
            attention: (B, N) this aggregator's attention (``MILOutput.attention``).
            instance_logits: (B, N) its tile logits (``MILOutput.instance_logits``).
            mask: (B, N) bool, valid tiles.
            labels: (B,) float slide labels, 1 tumour, 0 normal, NaN unknown (skipped).

        Returns:
            Scalar loss, mean over the pseudo-labelled tiles (a zero when there are none).
        """
        logits, targets = [], []
        for b in range(labels.shape[0]):
            if torch.isnan(labels[b]):
                continue
            valid = mask[b].nonzero().squeeze(-1)
            k = min(self.k, len(valid) // 2)
            if k < 1:
                continue
            att = attention[b, valid].detach()
            top = valid[torch.topk(att, k).indices]
            if labels[b] > 0.5:
                bottom = valid[torch.topk(-att, k).indices]
                logits += [instance_logits[b, top], instance_logits[b, bottom]]
                targets += [torch.ones(k), torch.zeros(k)]
            else:
                logits.append(instance_logits[b, top])
                targets.append(torch.zeros(k))
        if not logits:
            return instance_logits.sum() * 0.0
        target = torch.cat(targets).to(instance_logits)
        return F.binary_cross_entropy_with_logits(torch.cat(logits), target)


class _PooledTileMLP(nn.Module):
    """Scaled tile features through a tile MLP, for the pooling baselines (mean, max).

    Args:
        in_dim: tile feature size ``D``.
        hidden: embedding size ``H``.
        dropout: dropout after the tile MLP.
    """

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, hidden
        self.scale = FeatureScaler(in_dim)
        self.tile = _tile_mlp(in_dim, hidden, dropout)

    def _tiles(self, features: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The mask (B, N) (all tiles when None) and tile embeddings (B, N, H)."""
        mask = full_mask(features) if mask is None else mask
        return mask, self.tile(self.scale(features, mask))


class MeanMIL(_PooledTileMLP):
    """Mean pooling baseline: the average of tile embeddings (a tile MLP first).

    ``attention`` holds the uniform pooling weights ``1 / n_tiles`` (``uniform_pooling``: they
    say nothing about the tiles, so heatmaps draw no attention map).

    Args:
        in_dim: tile feature size ``D``.
        hidden: embedding size ``H``.
        dropout: dropout after the tile MLP.
    """

    uniform_pooling = True

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Pool bags (B, N, D) with mask (B, N) → :class:`MILOutput`."""
        mask, tiles = self._tiles(features, mask)
        weights = uniform_weights(mask, tiles.dtype)
        embedding = torch.einsum("bn,bnh->bh", weights, tiles)
        return MILOutput(embedding=embedding, attention=weights, tiles=tiles)


class LinearMIL(nn.Module):
    """The naive baseline: the mean of the standardised raw tile features, no tile layer.

    With the linear head on top, the slide model is a linear model on mean-pooled features
    (logistic regression for tumour, linear regression for log2FC) — the baseline every MIL
    model should beat. Features are standardised per dimension with the mean and variance of
    the training tiles (accumulated in training mode, fixed in eval mode — a StandardScaler
    fitted online; without it random-encoder features of very different scales stall the
    optimiser). ``tiles`` are the standardised features, so a tile's contribution to a
    prediction is exactly ``W h_i / n_tiles``; ``attention`` holds the uniform weights.

    Args:
        in_dim: tile feature size ``D`` (also the embedding size).
        hidden: ignored (the embedding is the features' mean); accepted so that every
            aggregator takes the same arguments.
        dropout: ignored (the head's dropout still applies).
    """

    uniform_pooling = True

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        del hidden, dropout
        self.in_dim, self.out_dim = in_dim, in_dim
        self.scale = FeatureScaler(in_dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("count", "total", "total_sq"):  # saved before FeatureScaler: same stats
            if prefix + name in state_dict:
                state_dict[f"{prefix}scale.{name}"] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Pool bags (B, N, D) with mask (B, N) → :class:`MILOutput` with embedding (B, D)."""
        mask = full_mask(features) if mask is None else mask
        tiles = self.scale(features, mask) * mask[..., None]
        weights = uniform_weights(mask, features.dtype)
        embedding = torch.einsum("bn,bnd->bd", weights, tiles)
        return MILOutput(embedding=embedding, attention=weights, tiles=tiles)


class MaxMIL(_PooledTileMLP):
    """Max pooling baseline: the per-feature maximum of tile embeddings (no attention).

    Args:
        in_dim: tile feature size ``D``.
        hidden: embedding size ``H``.
        dropout: dropout after the tile MLP.
    """

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Pool bags (B, N, D) with mask (B, N) → :class:`MILOutput` (``attention`` None)."""
        mask, tiles = self._tiles(features, mask)
        filled = tiles.masked_fill(~mask[..., None], torch.finfo(tiles.dtype).min)
        embedding = filled.amax(dim=1) * mask.any(-1, keepdim=True)
        return MILOutput(embedding=embedding, attention=None, tiles=tiles)


class _Block(nn.Module):
    """Pre-norm transformer layer; can also return the CLS token's attention (B, N)."""

    def __init__(self, dim: int, heads: int, dropout: float, mlp_ratio: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer hidden size {dim} must be divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        inner = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, keep: Tensor, cls_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, H), keep (B, T) bool → (x, CLS attention (B, T) or None)."""
        b, t, h = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .view(b, t, 3, self.heads, h // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn_mask = keep[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, h)))
        x = x + self.drop(self.mlp(self.norm2(x)))
        if not cls_attention:
            return x, None
        scores = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(h // self.heads)
        weights = masked_softmax(scores, keep[:, None, :].expand_as(scores))
        return x, weights.mean(1)


class TransformerMIL(nn.Module):
    """A small transformer MIL: CLS token + 1–2 self-attention layers over the tiles.

    No positional encoding (the bag is a set). The slide embedding is the CLS token's output;
    ``attention`` is the CLS token's attention over the tiles in the last layer (mean over
    heads, renormalised over valid tiles) — a readout for heatmaps, not exact pooling weights.

    Args:
        in_dim: tile feature size ``D``.
        hidden: model width ``H``.
        dropout: dropout in attention and MLP.
        layers: number of transformer layers.
        heads: attention heads (must divide ``hidden``).
        mlp_ratio: MLP width relative to ``hidden``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 128,
        dropout: float = 0.1,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"transformer layers must be ≥ 1, got {layers}")
        self.in_dim, self.out_dim = in_dim, hidden
        self.scale = FeatureScaler(in_dim)
        self.tile = _tile_mlp(in_dim, hidden, dropout)
        self.cls = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.blocks = nn.ModuleList(
            _Block(hidden, heads, dropout, mlp_ratio) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Pool bags (B, N, D) with mask (B, N) → :class:`MILOutput`."""
        mask = full_mask(features) if mask is None else mask
        x = self.tile(self.scale(features, mask))
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        keep = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        attention = None
        for i, block in enumerate(self.blocks):
            x, att = block(x, keep, cls_attention=i == len(self.blocks) - 1)
            attention = att if att is not None else attention
        x = self.norm(x)
        assert attention is not None
        tile_att = attention[:, 1:] * mask
        tile_att = tile_att / tile_att.sum(-1, keepdim=True).clamp(min=1e-12)
        return MILOutput(embedding=x[:, 0], attention=tile_att, tiles=x[:, 1:])


@aggregators.register("abmil")
def _abmil(
    in_dim: int, hidden: int = 128, dropout: float = 0.25, **options: object
) -> AttentionMIL:
    return AttentionMIL(in_dim, hidden, dropout, **options)  # type: ignore[arg-type]


@aggregators.register("clam_sb")
def _clam_sb(in_dim: int, hidden: int = 128, dropout: float = 0.25, **options: object) -> CLAMSB:
    return CLAMSB(in_dim, hidden, dropout, **options)  # type: ignore[arg-type]


@aggregators.register("mean")
def _mean(in_dim: int, hidden: int = 128, dropout: float = 0.25) -> MeanMIL:
    return MeanMIL(in_dim, hidden, dropout)


@aggregators.register("linear")
def _linear(in_dim: int, hidden: int = 128, dropout: float = 0.25) -> LinearMIL:
    return LinearMIL(in_dim, hidden, dropout)


@aggregators.register("max")
def _max(in_dim: int, hidden: int = 128, dropout: float = 0.25) -> MaxMIL:
    return MaxMIL(in_dim, hidden, dropout)


@aggregators.register("transformer")
def _transformer(
    in_dim: int, hidden: int = 128, dropout: float = 0.1, **options: object
) -> TransformerMIL:
    return TransformerMIL(in_dim, hidden, dropout, **options)  # type: ignore[arg-type]


def create_aggregator(name: str, in_dim: int, **kwargs: object) -> nn.Module:
    """Build the aggregator registered as ``name`` (``hidden``, ``dropout`` and its options).

    Raises:
        UnknownNameError: no such aggregator; lists the known ones.
        ValueError: an option the aggregator does not take.
    """
    builder = aggregators.get(name)
    try:
        return builder(in_dim=in_dim, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"aggregator {name!r} does not take these options {sorted(kwargs)}: {err}. See "
            f"the docstring of histcode.finetune.aggregators for each aggregator's options."
        ) from None


__all__ = [
    "CLAMSB",
    "AttentionMIL",
    "FeatureScaler",
    "GatedAttention",
    "LinearMIL",
    "MILOutput",
    "MaxMIL",
    "MeanMIL",
    "TransformerMIL",
    "aggregators",
    "create_aggregator",
    "full_mask",
    "masked_softmax",
    "uniform_weights",
]
