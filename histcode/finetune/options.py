"""Typed options of ``histcode finetune``: each group is a dataclass, a section of the YAML.

``histcode/configs/finetune/*.yaml`` set them (``data:``, ``model:``, ``loss:``, ``optim:``,
``cv:``, plus ``trainer:`` — every argument of ``pytorch_lightning.Trainer``); on the command line
they are ``--data.genes``, ``--model.aggregator``, ``--trainer.max_epochs`` and so on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Task = Literal["tumour", "genes"]


@dataclass
class DataOptions:
    """Labels, genes and bags.

    Args:
        tasks: what to predict: ``tumour`` (tumour vs normal) and/or ``genes`` (per-gene
            log2 fold change and up / down class); may be empty when ``classes`` is not.
        classes: categorical columns of the labels CSV (``subtype``, ``msi``, ``stage``), each
            a classification task of its own: a softmax over the column's values (empty cells
            are masked), per-class one-vs-rest AUC and macro AUC in ``metrics.json``.
        genes: genes to model; unset: the shipped driver-gene list, keeping the genes that
            the expression matrix has.
        genes_file: a text file with one gene a line (instead of ``genes``).
        threshold: ``|log2FC| ≥ threshold`` is up / down, below is unchanged.
        units: ``tpm`` (TPM, FPKM, RSEM or other normalised linear values, used as is),
            ``counts`` (raw counts, scaled to CPM over each sample's gene rows) or ``log2tpm``
            (log2(x + log_offset), e.g. UCSC Xena matrices: un-logged first). ``tpm`` and
            ``counts`` refuse a matrix that looks log-transformed.
        log_offset: what was added before the log, for ``log2tpm`` (1; Xena's log2(x + 0.001)
            files: 0.001).
        pseudocount: added before the fold-change ratio (in TPM / CPM units).
        normal_types: TCGA sample types whose samples form the normal reference of the fold
            changes: solid tissue normal (11) by default; blood (10), buccal (12), EBV cell
            line (13) and bone marrow (14) normals only when listed.
        strict_ids: tumour slides without an expression column are an error; ``false``: warn
            and keep them for the tumour task only.
        batch_size: bags per batch (padded to the largest, with a mask).
        max_tiles: at most this many random tiles of a bag per training step (``null``: all);
            validation and test always use every tile.
        num_workers: DataLoader workers (0: bags are read once and cached in memory).
        cache: keep bags in memory after the first read.
    """

    tasks: list[Task] = field(default_factory=lambda: ["tumour"])
    classes: list[str] = field(default_factory=list)
    genes: list[str] | None = None
    genes_file: Path | None = None
    threshold: float = 1.0
    units: Literal["tpm", "counts", "log2tpm"] = "tpm"
    log_offset: float = 1.0
    pseudocount: float = 1.0
    normal_types: list[int] = field(default_factory=lambda: [11])
    strict_ids: bool = True
    batch_size: int = 4
    max_tiles: int | None = 4096
    num_workers: int = 0
    cache: bool = True


@dataclass
class ModelOptions:
    """The slide model: an aggregator and a multi-task head.

    Args:
        aggregator: ``abmil`` (gated attention), ``clam_sb``, ``mean``, ``max``,
            ``transformer``, or ``linear`` (the naive baseline: a linear model on the mean of
            the raw features).
        hidden: slide embedding size.
        dropout: dropout of the aggregator and the head.
        attention: for abmil, ``per_task`` (every task — tumour and each gene — pools the
            tiles with its own attention branch over a shared tile layer, so the tumour
            attention is not pulled towards the tissue the genes follow, and each gene's map
            shows its own hotspots) or ``shared`` (one attention for every task, Ilse et al.).
            The other aggregators pool once for all tasks.
        gene_pooling: with per-task abmil, how each gene's branch weighs the tiles:
            ``softmax`` attention (the weights sum to 1: *where* the gene's tissue is, but
            not *how much* of it the slide has), ``sigmoid`` attention divided by the number
            of tiles (a gated mean: where, and how much), or ``mean`` (every tile 1/n: the
            slide value is the mean of the tiles' contributions, additive in the tissue's
            composition, as bulk expression is a sum over the sample's cells). The tumour
            task keeps softmax attention.
        composition: add to every gene's outputs a linear path from the mean of the
            standardised tile features (``heads.CompositionPath``): the naive baseline's model
            inside the slide model, which keeps how much of each tissue a slide has (bulk
            expression is a sum over the sample's cells); maps stay exact.
        tumour_pooling: where the tumour logit comes from: ``attention`` (the aggregator's
            slide embedding, like every other task) or ``top_share`` (each tile gets its own
            tumour logit from a linear scorer; the slide's is the mean of its highest
            ``tumour_top_share`` of them, and every tile of a normal training slide is a known
            negative — loss ``negatives``; see ``heads.TopShareTumourPath``). Top-share
            pooling is built for focal tumour (a few per cent of the tissue), where slide-label
            attention has too little to go on; with per-task abmil the tumour map then shows
            the tiles the slide's logit averages.
        tumour_top_share: share of a slide's tiles the ``top_share`` tumour logit averages
            (at least one tile).
        tumour_fraction_genes: with ``top_share``, add to every gene's outputs a term linear
            in the slide's estimated tumour fraction (the mean of its tiles' tumour
            probabilities; ``heads.TumourFractionPath``): bulk expression of a gene made by
            tumour cells follows the tumour's share of the tissue. Maps stay exact.
        tumour_context: with ``top_share``, the tumour scorer reads each tile's features
            with its 3 × 3 neighbourhood's mean, both also minus the slide's median tile
            (``histcode.finetune.context``: 4 D inputs, made from the feature store's tile
            corners whenever the model reads a slide, maps included); the aggregator and the
            genes keep the tile's own features. A focus spans neighbouring tiles, and what
            the whole slide shares (stain cast, scanner, site) is taken away.
        tumour_map: with ``tumour_context``, whose tile logits the tumour map shows:
            ``own``, the second top-share scorer's on the tiles' own features (trained on the
            same labels, loss ``fraction``; the genes' tumour fraction reads it either way),
            or ``context``, the tumour scorer's, on the context features. Use ``context`` with
            ``tumour_warm_start``: the warm-started context scorer's tile logits found tumour
            on held-out slides at AUROC 0.80 against 0.68 for a warm-started own-feature
            scorer (hard demo, seeds 0–2; 0.97 vs 0.95 easy), while from random starts they
            found it at 0.50 and 0.34 (``benchmarks/RESULTS.md``, "The tumour map").
        tumour_relative: with ``tumour_context``, the tumour scorer reads only the two
            views relative to the slide's median tile (the tile's and its neighbourhood's),
            not their absolute values, which carry the slide's stain cast, scanner and site.
            Where normal slides come from some sites only (as in TCGA), the absolute
            features let the scorer learn the site instead of tumour. Measured on three
            30-patient hard cohorts with every normal slide from one of three sites
            (``histcode synth --normal_sites 1``): tumour AUC within that site 0.58 ± 0.29
            against 0.48 ± 0.15 (one seed 0.52 → 0.85, two unchanged near or below chance);
            unconfounded hard cohorts unchanged (0.73); but on the easy demo the tumour map
            fell from 0.96 to 0.68 ± 0.32 (``benchmarks/RESULTS.md``, "Site confounding"),
            so the demo leaves it off.
        tumour_warm_start: with ``top_share``, before each fold's model trains, fit its
            tumour scorer alone from this many starting directions made from tumour tiles of
            the training slides and start from the one of lowest training loss
            (``histcode.finetune.warmstart``); 0 starts from random weights. The top-share
            objective is not convex: from random starts the scorer settles far above the loss
            of the tumour direction, which it keeps once started there.
        options: further keyword arguments of the aggregator, e.g. ``{k: 8}`` for clam_sb,
            ``{layers: 1, heads: 4}`` for transformer, ``{gated: false}`` for abmil.
    """

    aggregator: str = "abmil"
    hidden: int = 128
    dropout: float = 0.25
    attention: Literal["per_task", "shared"] = "per_task"
    gene_pooling: Literal["softmax", "sigmoid", "mean"] = "softmax"
    composition: bool = False
    tumour_pooling: Literal["attention", "top_share"] = "attention"
    tumour_top_share: float = 0.05
    tumour_fraction_genes: bool = False
    tumour_context: bool = False
    tumour_map: Literal["own", "context"] = "own"
    tumour_relative: bool = False
    tumour_warm_start: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.attention not in ("per_task", "shared"):
            raise ValueError(
                f"model.attention must be 'per_task' or 'shared', not {self.attention!r}"
            )
        if self.gene_pooling not in ("softmax", "sigmoid", "mean"):
            raise ValueError(
                "model.gene_pooling must be 'softmax', 'sigmoid' or 'mean', not "
                f"{self.gene_pooling!r}"
            )
        if self.tumour_pooling not in ("attention", "top_share"):
            raise ValueError(
                "model.tumour_pooling must be 'attention' or 'top_share', not "
                f"{self.tumour_pooling!r}"
            )
        if self.tumour_fraction_genes and self.tumour_pooling != "top_share":
            raise ValueError(
                "model.tumour_fraction_genes needs model.tumour_pooling top_share (it reads the "
                "top-share tumour scorer's tile probabilities)"
            )
        if self.tumour_context and self.tumour_pooling != "top_share":
            raise ValueError(
                "model.tumour_context gives the top-share tumour scorer its tiles' context: it "
                "needs model.tumour_pooling top_share"
            )
        if self.tumour_map not in ("own", "context"):
            raise ValueError(
                f"model.tumour_map must be 'own' or 'context', not {self.tumour_map!r}"
            )
        if self.tumour_map == "context" and not self.tumour_context:
            raise ValueError(
                "model.tumour_map context maps the tumour scorer's tile logits on the tiles' "
                "context: it needs model.tumour_context true (without it there is one scorer, "
                "on the tiles' own features: leave tumour_map at 'own')"
            )
        if self.tumour_relative and not self.tumour_context:
            raise ValueError(
                "model.tumour_relative keeps the slide-relative half of the tile context "
                "features: it needs model.tumour_context true"
            )
        if self.tumour_warm_start and self.tumour_pooling != "top_share":
            raise ValueError(
                "model.tumour_warm_start starts the top-share tumour scorer: it needs "
                "model.tumour_pooling top_share"
            )
        if self.tumour_warm_start < 0:
            raise ValueError(
                f"model.tumour_warm_start must be 0 (a random start) or a number of starts, not "
                f"{self.tumour_warm_start}"
            )
        if not 0 < self.tumour_top_share <= 1:
            raise ValueError(
                f"model.tumour_top_share must be in (0, 1] (a share of a slide's tiles, e.g. "
                f"0.05), not {self.tumour_top_share}"
            )

    def aggregator_options(self) -> dict[str, Any]:
        """``options`` plus, for abmil, its attention ``branches`` (``attention``)."""
        options = dict(self.options)
        if self.aggregator == "abmil":
            options.setdefault("branches", self.attention)
            if options["branches"] == "per_task":
                options.setdefault("gene_pooling", self.gene_pooling)
        return options


@dataclass
class LossOptions:
    """Weights of the task losses (a weight of 0 switches a loss off).

    Args:
        tumour: binary cross-entropy of tumour vs normal.
        log2fc: regression of log2 fold change (masked: tumour slides only).
        classes: cross-entropy of the down / unchanged / up class (masked).
        categorical: cross-entropy of each ``data.classes`` task (masked where empty).
        instance: CLAM instance loss (clam_sb only).
        negatives: with ``model.tumour_pooling: top_share``, binary cross-entropy of every
            tile of a normal slide against "not tumour" (``heads.known_negative_loss``).
        fraction: with ``model.tumour_context``, the slide and known-negative cross-entropy
            of the second tumour scorer, on the tiles' own features (the genes count tumour
            with it and the tumour map shows it).
        regression: ``huber`` or ``mse`` for the log2FC regression.
        huber_delta: where the Huber loss turns from quadratic to linear (log2 units).
    """

    tumour: float = 1.0
    log2fc: float = 1.0
    classes: float = 0.5
    categorical: float = 1.0
    instance: float = 0.3
    negatives: float = 1.0
    fraction: float = 1.0
    regression: Literal["huber", "mse"] = "huber"
    huber_delta: float = 1.0


@dataclass
class OptimOptions:
    """AdamW.

    Args:
        lr: learning rate.
        weight_decay: decoupled weight decay.
        tumour_path_lr_scale: with ``model.tumour_pooling: top_share``, the tumour scorer's
            learning rate as a multiple of ``lr`` (a single linear layer needs larger steps
            than the attention and MLP layers to leave its random start).
    """

    lr: float = 2e-4
    weight_decay: float = 1e-2
    tumour_path_lr_scale: float = 10.0


@dataclass
class CVOptions:
    """Patient- or site-grouped cross-validation, model selection and registration.

    Args:
        folds: outer folds; each fold's test patients are never used for training or
            selection.
        group: what the folds keep together: ``patient`` (no patient in two folds) or
            ``site`` (each tissue source site — TCGA barcode characters 6–7, or the labels
            CSV's ``site`` column — in exactly one test fold, so models are tested on sites
            they never saw and a site's stain or scanner signature cannot pass for tumour
            detection). ``site`` needs at least ``folds`` sites; its validation split is
            site-grouped too where a training part has ``round(1 / val_fraction)`` sites or
            more, else patient-grouped.
        val_fraction: share of each training fold's patients held out as validation, which
            alone chooses the epoch (early stopping and best weights).
        seed: seed of the splits, the initialisation and the shuffling.
        monitor: validation metric that selects the epoch (lower is better):
            ``val/loss`` (weighted total), ``val/tumour``, ``val/log2fc``, ``val/classes``,
            ``val/categorical`` or ``val/genes_rank`` (1 − the genes' mean Spearman
            correlation on the validation slides).
        patience: epochs without improvement of ``monitor`` before stopping.
        select: how validation chooses the epoch. ``total``: one epoch for the whole model,
            on ``monitor``. ``per_task``: with top-share tumour pooling, the tumour scorer
            (the tumour logit and map) is taken at the epoch of its own validation losses
            (tumour + known negatives) and the rest of the model (gene and categorical heads,
            the scorer the genes read) at the epoch of the gene and categorical losses;
            training stops once both have gone ``patience`` epochs without improving, and
            ``retrain`` trains for the later of the two and keeps each part's weights at its
            own epoch. A validation part of 2-3 patients can hold a slide the tumour scorer
            gets wrong from the start, whose loss only rises and, summed, stops the gene
            heads after an epoch (RESULTS.md, "One thread, one validation slide"). Models
            with one part (attention pooling for the tumour, genes reading the tumour scorer
            itself) use ``total``. With the genes' loss on one validation split, measured on 7
            demo runs, it mended the one fold the summed loss stopped after an epoch
            (tumour-burden genes 0.25 → 0.66), but the genes' loss alone is noisier on 2-3
            validation patients and chose epoch 2 and 6 in two other folds (lymphocyte genes
            0.92 → 0.87 and 0.86 → 0.61 in those runs). The demo uses it since session 17,
            with ``inner 5`` and ``genes_metric rank_signal`` (below).
        genes_metric: what chooses the genes' epoch. ``loss``: their validation losses
            (log2fc and class), in the total or in their part's (``select per_task``).
            ``rank``: ``val/genes_rank``, one minus the mean over genes of the Spearman
            correlation of predicted and true log2FC on the validation slides, replaces
            those losses (weighted as the log2fc loss); with ``inner`` it is ranked once per
            epoch on all inner folds' slides together (every training patient's out-of-fold
            prediction). A gene head that fits noise swings wider every epoch: its squared
            error rises and pulls the summed loss's epoch early although the other genes
            still improve, while its rank correlation stays near 0 at any amplitude. Needs
            enough validation tumour slides to rank (``inner``; a validation split of 2-3
            patients gives a coarse curve, under 3 slides it is refused). With ``inner 5``
            and ``select per_task`` on 7 demo runs it mended the two easy
            folds the summed loss stopped early (lymphocyte genes 0.81 → 0.89, 0.72 → 0.87)
            but on hard cohorts, where most genes carry no signal a model can learn, the mean
            rank is flat and chose epochs 2-22 in five of nine folds (hard lymphocyte genes
            0.90 → 0.84; RESULTS.md, "Choosing the genes' epoch by their rank").
            ``rank_signal`` (needs ``inner``): the same, ranked only over the genes whose
            pooled out-of-fold predictions show a signal — their correlation, averaged over
            the epochs, above the one-sided 5 % critical value ``1.645 / sqrt(n - 1)`` for
            the ``n`` pooled slides (all genes when none does); genes with nothing to learn
            then no longer flatten the curve. Chosen on the training part's inner folds, so
            the test fold still chooses nothing. The demo's since session 17, with ``select
            per_task`` and ``inner 5``: on hard cohorts whose normal slides all come from one
            site the summed loss chose epochs 0-9 for the genes in five of nine folds
            (lymphocyte genes 0.77 → 0.94, the naive arm's 0.90); on the easy and hard demos
            +0.02, and one hard noise gene of 24 at q 0.037 (RESULTS.md, same section).
        inner: choose the epoch on this many inner folds instead of one validation split
            (0: the ``val_fraction`` split). The training part (every patient not in the test
            fold) is split into ``inner`` patient-grouped folds (site-grouped as the
            validation split would be); a model is trained on each but one of them and
            validated on the one left out, for every epoch of ``trainer.max_epochs`` (no early
            stopping: the curves are averaged epoch by epoch); the epoch (each part's, with
            ``select per_task``) is the best of the averaged curve, and the fold's model is
            then trained on the whole training part for that many epochs (needs ``retrain``).
            Every training patient validates once, where a ``val_fraction`` split has 2-3
            patients at ~30 patients choose for all; costs ``inner`` trainings of
            ``max_epochs`` per fold.
        smooth: epochs the ``monitor`` is averaged over when choosing the best epoch (that
            epoch and the ones before it; 1: each epoch's own value). A validation part of a
            few patients gives a noisy curve whose lowest single epoch is often a dip of noise.
        retrain: after validation has chosen the epoch, train each fold's model afresh on
            its training *and* validation patients for that many epochs, and test that model
            (the test patients still choose nothing). Costs a second training per fold; pays
            on small cohorts, where the validation share is data the model never learns from.
        alpha: false discovery rate for calling a gene's correlation significant.
        register: what goes to the registry: ``refit`` (one model trained on all patients,
            its epoch chosen on a validation split), ``folds`` (each fold's model), or
            ``none``.
        anndata: also write ``slides.h5ad`` (AnnData for scanpy: ``obs`` the out-of-fold
            predictions and labels of each slide, ``obsm['X_slide']`` its embedding from the
            fold model that held it out); needs ``pip install 'histcode[anndata]'``.
    """

    folds: int = 5
    group: Literal["patient", "site"] = "patient"
    val_fraction: float = 0.2
    seed: int = 0
    monitor: Literal[
        "val/loss", "val/tumour", "val/log2fc", "val/classes", "val/categorical", "val/genes_rank"
    ] = "val/loss"
    patience: int = 30
    select: Literal["total", "per_task"] = "total"
    genes_metric: Literal["loss", "rank", "rank_signal"] = "loss"
    inner: int = 0
    smooth: int = 1
    retrain: bool = False
    alpha: float = 0.05
    register: Literal["refit", "folds", "none"] = "refit"
    anndata: bool = False

    def __post_init__(self) -> None:
        if self.smooth < 1:
            raise ValueError(f"cv.smooth must be 1 or more epochs, not {self.smooth}")
        if self.inner < 0 or self.inner == 1:
            raise ValueError(
                f"cv.inner must be 0 (one validation split) or 2 or more folds, not {self.inner}"
            )
        if self.inner and not self.retrain:
            raise ValueError(
                f"cv.inner {self.inner} chooses the epoch on inner folds, then trains the fold's "
                "model on its whole training part for that many epochs: set --cv.retrain true "
                "(or --cv.inner 0 for one validation split)"
            )
        if self.genes_metric not in ("loss", "rank", "rank_signal"):
            raise ValueError(
                "cv.genes_metric must be 'loss', 'rank' or 'rank_signal', not "
                f"{self.genes_metric!r}"
            )
        if self.genes_metric == "rank_signal" and not self.inner:
            raise ValueError(
                "cv.genes_metric rank_signal picks the genes to rank on the inner folds' "
                "pooled predictions: set --cv.inner 5 --cv.retrain true, or use "
                "--cv.genes_metric rank"
            )
        if self.select not in ("total", "per_task"):
            raise ValueError(f"cv.select must be 'total' or 'per_task', not {self.select!r}")
        if self.group not in ("patient", "site"):
            raise ValueError(f"cv.group must be 'patient' or 'site', not {self.group!r}")
        if self.anndata:
            from histcode.finetune.h5ad import INSTALL_HINT, anndata_available

            if not anndata_available():
                raise ValueError(
                    "cv.anndata is true but the anndata package is not installed; install "
                    f"the extra ({INSTALL_HINT}) or set --cv.anndata false"
                )


#: Defaults of ``trainer:`` where histcode's differ from Lightning's.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 100,
    "accelerator": "auto",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
}

__all__ = [
    "TRAINER_DEFAULTS",
    "CVOptions",
    "DataOptions",
    "LossOptions",
    "ModelOptions",
    "OptimOptions",
    "Task",
]
