"""The LightningModule: a slide model, its multi-task losses and AdamW.

Losses (each masked to the slides that have the target, weighted by :class:`LossOptions`):

* tumour — binary cross-entropy with logits;
* log2fc — Huber (or MSE) of the predicted log2 fold change, tumour slides only;
* classes — cross-entropy of down / unchanged / up per gene, tumour slides only;
* categorical — cross-entropy of each categorical task (``data.classes``: subtype, MSI, …),
  the mean over the tasks, slides without a class masked;
* instance — CLAM's instance loss when the aggregator has one.
* negatives — every tile of a normal slide against "not tumour", with top-share tumour pooling.
* fraction — with tile context, the second tumour scorer's (on the tiles' own features: the
  genes count tumour with it and the tumour map shows it) slide and known-negative
  cross-entropy.

Validation accumulates each loss over the whole validation set and logs ``val/loss`` (the
weighted total) and ``val/<task>`` once per epoch, and with genes ``val/genes_rank`` (one minus
the genes' mean Spearman correlation on the validation slides,
:func:`~histcode.finetune.metrics.gene_rank_loss`); these alone choose the epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from histcode.finetune.bags import IGNORE_CLASS, BagBatch
from histcode.finetune.heads import SlideModel, SlideOutput, build_slide_model, known_negative_loss
from histcode.finetune.metrics import gene_rank_loss
from histcode.finetune.options import LossOptions, ModelOptions, OptimOptions

log = logging.getLogger("histcode.finetune")

TERMS = ("tumour", "log2fc", "classes", "categorical", "instance", "negatives", "fraction")


def gather_objects(local: Any, world_size: int = 1) -> list[Any]:
    """``local`` of every process in rank order (``torch.distributed.all_gather_object``, a
    collective: every process must call it), or ``[local]`` outside a distributed run."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        shares: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(shares, local)
        return shares
    return [local]


def pooled_sums(
    shares: Sequence[dict[str, tuple[float, int]]],
) -> dict[str, tuple[float, int]]:
    """Each loss term's (sum, count) added over processes' validation shares: the means
    of all validation slides, the same on every process, and every term any process saw."""
    out: dict[str, tuple[float, int]] = {}
    for share in shares:
        for name, (total, count) in share.items():
            s, n = out.get(name, (0.0, 0))
            out[name] = (s + total, n + count)
    return out


def gather_slides(
    batches: Sequence[tuple[Sequence[str], np.ndarray, np.ndarray]], world_size: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """One validation epoch's gene predictions and targets, every process's slides each once.

    Under DDP each process validates its share of the slides (Lightning's distributed sampler
    pads the shares to one length by repeating slides), so a rank correlation on one process's
    predictions would differ between processes and they could choose different epochs. Here
    the shares are gathered (``torch.distributed.all_gather_object``: the arrays' lengths
    differ) and a slide seen twice is kept once, so every process ranks the same slides.

    Args:
        batches: this process's validation batches: slide ids (B,), predicted and true log2
            fold changes (B, G) each.
        world_size: processes in the run (``Trainer.world_size``); 1 gathers nothing.

    Returns:
        ``(pred, true)``, (S, G) each over the distinct slides (empty, (0, 0), for none).
    """
    local = [
        (sid, p, t)
        for ids, pred, true in batches
        for sid, p, t in zip(ids, pred, true, strict=True)
    ]
    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for share in gather_objects(local, world_size):
        for sid, p, t in share:
            seen.setdefault(sid, (p, t))
    if not seen:
        return np.zeros((0, 0)), np.zeros((0, 0))
    return np.stack([p for p, _ in seen.values()]), np.stack([t for _, t in seen.values()])


class MILModule(pl.LightningModule):
    """Trains a :class:`~histcode.finetune.heads.SlideModel` on bags.

    Args:
        in_dim: tile feature size ``D`` (the feature store's ``embed_dim``).
        tumour: predict tumour vs normal.
        genes: genes of the differential-expression task (empty for none).
        model: aggregator and head options.
        loss: task weights.
        optim: optimiser options.
        categories: categorical task → its class names (``Labels.categories``).
    """

    def __init__(
        self,
        in_dim: int,
        tumour: bool = True,
        genes: list[str] | None = None,
        model: ModelOptions | None = None,
        loss: LossOptions | None = None,
        optim: OptimOptions | None = None,
        categories: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__()
        self.in_dim, self.tumour, self.genes = in_dim, tumour, list(genes or [])
        self.categories = {k: list(v) for k, v in (categories or {}).items()}
        self.model_options = model or ModelOptions()
        self.loss_options = loss or LossOptions()
        self.optim_options = optim or OptimOptions()
        self.model: SlideModel = build_slide_model(**self.model_arguments())
        self._val_sums: dict[str, tuple[float, int]] = {}
        self._val_genes: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        #: each validation epoch's predicted and true log2 fold changes, (S, G) each, of the
        #: validation slides (``cv.inner`` pools them over inner folds: ``val/genes_rank``)
        self.val_gene_predictions: list[tuple[np.ndarray, np.ndarray]] = []

    def model_arguments(self) -> dict[str, Any]:
        """Arguments of :func:`build_slide_model` (the registry card's ``architecture`` and
        ``arguments``)."""
        m = self.model_options
        return {
            "architecture": m.aggregator,
            "in_dim": self.in_dim,
            "hidden": m.hidden,
            "dropout": m.dropout,
            "tumour": self.tumour,
            "n_genes": len(self.genes),
            "options": m.aggregator_options(),
            **({"n_classes": self.n_classes} if self.categories else {}),
            "composition": m.composition,
            **(
                {
                    "tumour_pooling": m.tumour_pooling,
                    "tumour_top_share": m.tumour_top_share,
                    **({"tumour_fraction_genes": True} if m.tumour_fraction_genes else {}),
                    **({"tumour_context": True} if m.tumour_context else {}),
                    **({"tumour_relative": True} if m.tumour_relative else {}),
                    **(
                        {"tumour_map": m.tumour_map}
                        if m.tumour_context and m.tumour_map != "own"
                        else {}
                    ),
                }
                if m.tumour_pooling != "attention"
                else {}
            ),
        }

    def warm_start(self, bags: Sequence[np.ndarray], tumour: np.ndarray, seed: int = 0) -> None:
        """Start the top-share tumour scorer from the best of ``model.tumour_warm_start``
        exemplar starts fitted on these training slides (:mod:`histcode.finetune.warmstart`);
        nothing without a top-share scorer or with ``tumour_warm_start`` 0.

        Args:
            bags: the training slides' features as the model reads them, each ``(n_i, D)``
                (context features with ``tumour_context``).
            tumour: ``(S,)`` their tumour labels, 1, 0 or NaN (unknown: left out).
            seed: seed of the draws and fits.
        """
        starts = self.model_options.tumour_warm_start
        path = self.model.tumour_path
        if not starts or path is None:
            return
        known = ~np.isnan(np.asarray(tumour, dtype=np.float64))
        if len(set(np.asarray(tumour)[known].tolist())) < 2:
            log.warning(
                "tumour scorer warm start skipped: these %d training slides are not of both "
                "classes (tumour and normal); the scorer starts from random weights",
                int(known.sum()),
            )
            return
        from histcode.finetune.warmstart import warm_start

        chosen = warm_start(
            path,
            [b for b, k in zip(bags, known, strict=True) if k],
            np.asarray(tumour)[known],
            starts=starts,
            lr=self.optim_options.lr * self.optim_options.tumour_path_lr_scale,
            weight_decay=self.optim_options.weight_decay,
            seed=seed,
        )
        log.info(
            "tumour scorer warm start: best of %d starts (from %d exemplar tiles), training "
            "loss %.3f (each start: %s)",
            starts,
            chosen.candidates,
            chosen.loss,
            ", ".join(f"{v:.3f}" for v in chosen.losses),
        )

    @property
    def n_classes(self) -> list[int]:
        """Number of classes of each categorical task."""
        return [len(v) for v in self.categories.values()]

    def forward(self, features: Tensor, mask: Tensor | None = None) -> SlideOutput:
        """Bags (B, N, D) with mask (B, N) → :class:`SlideOutput`."""
        return self.model(features, mask)

    # -- losses ---------------------------------------------------------------------------------

    def losses(self, batch: BagBatch, out: SlideOutput) -> dict[str, tuple[Tensor, int]]:
        """Each loss term as ``(mean over its targets, number of targets)``, if present."""
        terms: dict[str, tuple[Tensor, int]] = {}
        w = self.loss_options
        if out.tumour_logit is not None and w.tumour > 0:
            value = self._slide_bce(out.tumour_logit, batch.tumour)
            if value is not None:
                terms["tumour"] = value
        if out.log2fc is not None and w.log2fc > 0:
            known = ~torch.isnan(batch.log2fc)
            if known.any():
                pred, target = out.log2fc[known], batch.log2fc[known]
                value = (
                    F.huber_loss(pred, target, delta=w.huber_delta)
                    if w.regression == "huber"
                    else F.mse_loss(pred, target)
                )
                terms["log2fc"] = (value, int(known.sum()))
        if out.gene_logits is not None and w.classes > 0:
            known = batch.classes != IGNORE_CLASS
            if known.any():
                value = F.cross_entropy(
                    out.gene_logits.reshape(-1, 3),
                    batch.classes.reshape(-1),
                    ignore_index=IGNORE_CLASS,
                )
                terms["classes"] = (value, int(known.sum()))
        if out.category_logits and batch.categories is not None and w.categorical > 0:
            parts = []
            for k, logits in enumerate(out.category_logits):
                target = batch.categories[:, k]
                if (target != IGNORE_CLASS).any():
                    value = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_CLASS)
                    parts.append((value, int((target != IGNORE_CLASS).sum())))
            if parts:
                value = torch.stack([v for v, _ in parts]).mean()
                terms["categorical"] = (value, sum(n for _, n in parts))
        instance_loss = getattr(self.model.aggregator, "instance_loss", None)
        if instance_loss is not None and out.instance_logits is not None and w.instance > 0:
            value = instance_loss(out.attention, out.instance_logits, batch.mask, batch.tumour)
            terms["instance"] = (value, len(batch))
        if out.tumour_tile_logits is not None and w.negatives > 0:
            value = known_negative_loss(out.tumour_tile_logits, batch.mask, batch.tumour)
            if value is not None:
                terms["negatives"] = (value, int((batch.tumour == 0).sum()))
        if out.fraction_logit is not None and w.fraction > 0:
            terms.update(self._fraction_loss(batch, out))
        return terms

    @staticmethod
    def _slide_bce(logit: Tensor, tumour: Tensor) -> tuple[Tensor, int] | None:
        """Binary cross-entropy of slide logits (B,) on the tumour labels (B,; NaN where
        unknown) and the number of known labels; None when no label is known."""
        known = ~torch.isnan(tumour)
        if not known.any():
            return None
        return F.binary_cross_entropy_with_logits(logit[known], tumour[known]), int(known.sum())

    @classmethod
    def _fraction_loss(cls, batch: BagBatch, out: SlideOutput) -> dict[str, tuple[Tensor, int]]:
        """The second tumour scorer's (``SlideModel.fraction_scorer``, with tile context) slide
        and known-negative cross-entropy, one term: it learns tumour as the tumour path does."""
        slide = cls._slide_bce(out.fraction_logit, batch.tumour)  # type: ignore[arg-type]
        if slide is None:
            return {}
        value, known = slide
        negatives = known_negative_loss(out.fraction_tile_logits, batch.mask, batch.tumour)  # type: ignore[arg-type]
        if negatives is not None:
            value = value + negatives
        return {"fraction": (value, known)}

    def total(self, terms: dict[str, tuple[Tensor, int]], out: SlideOutput) -> Tensor:
        """Weighted sum of the loss terms (a zero connected to the graph when none)."""
        weights = {t: getattr(self.loss_options, t) for t in TERMS}
        total = sum((weights[k] * v for k, (v, _) in terms.items()), start=out.embedding.sum() * 0)
        return total  # type: ignore[return-value]

    # -- steps ----------------------------------------------------------------------------------

    def training_step(self, batch: BagBatch, batch_idx: int) -> Tensor:
        out = self(batch.features, batch.mask)
        terms = self.losses(batch, out)
        loss = self.total(terms, out)
        self.log("train/loss", loss, batch_size=len(batch), prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}
        self._val_genes = []

    def validation_step(self, batch: BagBatch, batch_idx: int) -> None:
        out = self(batch.features, batch.mask)
        for name, (value, count) in self.losses(batch, out).items():
            s, n = self._val_sums.get(name, (0.0, 0))
            self._val_sums[name] = (s + float(value) * count, n + count)
        if out.log2fc is not None:
            self._val_genes.append(
                (
                    list(batch.slide_ids),
                    out.log2fc.detach().float().cpu().numpy(),
                    batch.log2fc.float().cpu().numpy(),
                )
            )

    def on_validation_epoch_end(self) -> None:
        # under DDP the terms' sums are added over processes first: each process logs the same
        # terms (a process whose share lacks one would otherwise log fewer, and the synced
        # logs would pair up wrongly) with the means of all validation slides
        sums = pooled_sums(gather_objects(self._val_sums, self.trainer.world_size))
        means = {k: s / n for k, (s, n) in sums.items() if n}
        total = sum(getattr(self.loss_options, k) * v for k, v in means.items())
        # sync_dist: under DDP every process selects the same epoch (equal values already)
        self.log("val/loss", float(total), prog_bar=True, sync_dist=True)
        for k, v in means.items():
            self.log(f"val/{k}", float(v), sync_dist=True)
        if self.genes and not self.trainer.sanity_checking:
            # every process calls the gather (a collective) and then holds the same slides
            pred, true = gather_slides(self._val_genes, self.trainer.world_size)
            if len(pred):
                self.val_gene_predictions.append((pred, true))
                rank = gene_rank_loss(pred, true)
                if rank is not None:  # the same on every process: all or none log it
                    self.log("val/genes_rank", rank, sync_dist=True)

    def predict_step(self, batch: BagBatch, batch_idx: int = 0) -> dict[str, Any]:
        """Predictions of a batch as numpy arrays (``tumour_prob`` (B,), ``log2fc`` (B, G),
        ``up_prob`` (B, G), ``class_prob`` (B, G, 3), ``prob:<task>`` (B, K) per categorical
        task) plus ``slide_ids``."""
        out = self(batch.features, batch.mask)
        result: dict[str, Any] = {"slide_ids": list(batch.slide_ids)}
        if out.tumour_prob is not None:
            result["tumour_prob"] = out.tumour_prob.float().cpu().numpy()
        if out.gene_logits is not None and out.log2fc is not None:
            result["log2fc"] = out.log2fc.float().cpu().numpy()
            result["class_prob"] = torch.softmax(out.gene_logits.float(), -1).cpu().numpy()
            result["up_prob"] = result["class_prob"][..., 2]
        for task, logits in zip(self.categories, out.category_logits, strict=True):
            result[f"prob:{task}"] = torch.softmax(logits.float(), -1).cpu().numpy()
        return result

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; the top-share tumour scorer learns at ``optim.tumour_path_lr_scale`` × lr.

        The scorer is one linear layer on standardised features and starts at a random
        direction; with the slide model's learning rate (sized for the MLP and attention
        layers) its top tiles barely move in 100 epochs of 4-slide batches, and the tumour
        AUC is the AUC of that random direction (0.38 on a 30-patient hard cohort, vs 0.63
        at 10 × lr, seed 0 of the hard demo, measured in a lab script).
        """
        o = self.optim_options
        path = self.model.tumour_path
        if path is None:
            return torch.optim.AdamW(self.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        scaled = [*path.parameters()]
        if self.model.fraction is not None:  # a single weight per output, from 0: same reason
            scaled += [*self.model.fraction.parameters()]
        if self.model.fraction_scorer is not None:  # the same scorer again, same reason
            scaled += [*self.model.fraction_scorer.parameters()]
        own = {id(p) for p in scaled}
        rest = [p for p in self.parameters() if id(p) not in own]
        groups = [
            {"params": rest},
            {"params": scaled, "lr": o.lr * o.tumour_path_lr_scale},
        ]
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


def stack_predictions(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate :meth:`MILModule.predict_step` outputs of several batches."""
    if not parts:
        return {"slide_ids": []}
    out: dict[str, Any] = {"slide_ids": [s for p in parts for s in p["slide_ids"]]}
    for key in parts[0]:
        if key != "slide_ids":
            out[key] = np.concatenate([p[key] for p in parts])
    return out


__all__ = ["TERMS", "MILModule", "stack_predictions"]
