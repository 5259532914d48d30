"""A whole finetune run: slides and labels → cross-validation → outputs → registry.

:func:`run_finetune` is the Python equivalent of ``histcode finetune``:

1. choose the slides: status ``ok`` in the feature store and labelled (the rest is reported);
2. build the labels (:mod:`histcode.finetune.labels`);
3. patient- or site-grouped cross-validation (:mod:`histcode.finetune.cv`);
4. write ``predictions.csv``, ``metrics.json``, ``folds.json``, ``targets.csv`` and
   ``plots/*.png`` into the output folder;
5. register the selected model(s) with their lineage (encoder ref and feature store).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histcode.featurestore import FeatureStore
from histcode.finetune.labels import (
    Labels,
    build_labels,
    preview,
    read_expression,
    read_gene_list,
    read_label_table,
    table_from_slide_ids,
)
from histcode.finetune.options import (
    CVOptions,
    DataOptions,
    LossOptions,
    ModelOptions,
    OptimOptions,
)
from histcode.lineage import Parent
from histcode.registry import Card, Registry

log = logging.getLogger(__name__)


@dataclass
class SlideSelection:
    """Which slides a run uses, and which it cannot.

    Attributes:
        used: slides with features (status ok) and labels.
        no_features: labelled slides absent from the feature store.
        not_ok: labelled slides whose features are ``empty`` or ``failed`` (id → status).
        no_labels: slides with features but no labels.
    """

    used: list[str]
    no_features: list[str] = field(default_factory=list)
    not_ok: dict[str, str] = field(default_factory=dict)
    no_labels: list[str] = field(default_factory=list)

    def failed(self) -> list[str]:
        """Labelled slides that could not be used: missing, or failed in the store."""
        return sorted(self.no_features + [s for s, st in self.not_ok.items() if st == "failed"])


def select_slides(store: FeatureStore, labelled: list[str] | None) -> SlideSelection:
    """Match labelled slides with the feature store.

    Args:
        store: the feature store.
        labelled: slide ids with labels; ``None`` means every slide of the store.

    Raises:
        ValueError: no slide has both features and labels (names a few ids of each side).
    """
    ids = store.slide_ids()
    status = {sid: store.status(sid) for sid in ids}
    ok = [s for s in ids if status[s] == "ok"]
    if labelled is None:
        labelled = ids
    have = set(labelled)
    selection = SlideSelection(
        used=[s for s in labelled if status.get(s) == "ok"],
        no_features=sorted(s for s in labelled if s not in status),
        not_ok={s: str(status[s]) for s in labelled if s in status and status[s] != "ok"},
        no_labels=sorted(s for s in ok if s not in have),
    )
    if not ok:
        held = f" (it holds {preview(f'{s} ({status[s]})' for s in ids)})" if ids else ""
        raise ValueError(
            f"the feature store {store.path} holds no slide with usable features (status ok)"
            f"{held}: embed slides with `histcode embed --tiles … --out {store.path}`, or pass "
            "another --features"
        )
    if not selection.used:
        raise ValueError(
            f"no slide has both features and labels: the feature store {store.path} holds "
            f"{preview(ok, 4) or 'no usable slide'}; the labels name {preview(labelled, 4)}. "
            "Slide ids must be the slide files' stems in both."
        )
    if selection.no_features:
        log.warning(
            "%d labelled slide(s) have no features (run histcode embed on them): %s",
            len(selection.no_features),
            preview(selection.no_features),
        )
    if selection.not_ok:
        log.warning(
            "%d labelled slide(s) are empty or failed in the feature store: %s",
            len(selection.not_ok),
            preview(f"{s} ({st})" for s, st in selection.not_ok.items()),
        )
    if selection.no_labels:
        log.warning(
            "%d slide(s) with features have no labels and are not used: %s",
            len(selection.no_labels),
            preview(selection.no_labels),
        )
    return selection


def prepare_labels(
    store: FeatureStore,
    labels: Path | None,
    expression: Path | None,
    data: DataOptions,
) -> tuple[Labels, SlideSelection]:
    """Labels of the slides that have features, checked against the tasks.

    Raises:
        ValueError: see :mod:`histcode.finetune.labels`; also a tumour task without both
            tumour and normal slides, or a genes task without any target.
    """
    tasks = list(dict.fromkeys(data.tasks))
    if not tasks and not data.classes:
        raise ValueError(
            "--data.tasks is empty and there is no --data.classes; use [tumour], [genes] or "
            "[tumour, genes], or name categorical columns with --data.classes"
        )
    if data.classes and labels is None:
        raise ValueError(
            f"--data.classes {' '.join(data.classes)} needs --labels, a CSV with those columns"
        )
    if data.genes is not None and data.genes_file is not None:
        raise ValueError("pass --data.genes or --data.genes_file, not both")
    genes = read_gene_list(data.genes_file) if data.genes_file is not None else data.genes
    if labels is not None:
        table = read_label_table(labels, data.classes)
        selection = select_slides(store, table["slide_id"].tolist())
    else:
        ok = [s for s in store.slide_ids() if store.status(s) == "ok"]
        selection = select_slides(store, None)
        table = table_from_slide_ids(ok)
    table = table[table["slide_id"].isin(set(selection.used))].reset_index(drop=True)
    matrix = read_expression(expression) if expression is not None and "genes" in tasks else None
    built = build_labels(
        table,
        matrix,
        genes,
        data.threshold,
        data.units,
        data.pseudocount,
        data.strict_ids,
        with_genes="genes" in tasks,
        source=f"expression matrix {expression}" if expression else "expression matrix",
        genes_source=f"the gene list {data.genes_file}" if data.genes_file else "--data.genes",
        normal_types=data.normal_types,
        log_offset=data.log_offset,
        classes=data.classes,
    )
    if "tumour" in tasks:
        known = built.tumour[built.tumour_mask]
        if len(set(known.tolist())) < 2:
            raise ValueError(
                f"the tumour task needs tumour and normal slides; the {len(known)} labelled "
                f"slide(s) are all {'tumour' if known.size and known[0] == 1 else 'of one kind'}."
                " Add normal slides (TCGA sample types 10–19, or tumour=0), or use --data.tasks "
                "[genes]."
            )
    if "tumour" in tasks:
        from histcode.siteconfounding import site_confounding, site_confounding_warning

        confounding = site_confounding(built.sites, built.tumour)
        warning = site_confounding_warning(confounding, store.attrs.get("stain_norm"))
        if warning:
            log.warning("%s", warning)
    if "genes" in tasks and not built.gene_mask.any():
        raise ValueError("the genes task has no target on any slide with features")
    if "tumour" not in tasks:  # without the tumour task, slides without targets teach nothing
        keep = built.gene_mask.any(1) | built.category_mask.any(1)
        if not keep.all():
            log.info("no tumour task: %d slide(s) without targets left out", (~keep).sum())
            built = built.subset(np.flatnonzero(keep))
    if expression is not None and "genes" not in tasks:
        log.warning("--expression is ignored: 'genes' is not in --data.tasks")
    return built, selection


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def lineage(store: FeatureStore) -> list[Parent]:
    """A model's lineage: the encoder (ref, weights sha256) and the feature store it made.

    Returns:
        ``[Parent("encoder", encoder_ref, sha256), Parent("features", path, attrs=…)]``, the
        feature store's ``attrs`` naming its ``encoder_sha256`` and ``tiles_fingerprint``.
    """
    attrs = store.attrs
    sha = str(attrs.get("encoder_sha256") or "")
    facts = {"encoder_sha256": sha} if sha else {}
    if attrs.get("tiles_fingerprint"):
        facts["tiles_fingerprint"] = str(attrs["tiles_fingerprint"])
    return [
        Parent("encoder", str(attrs.get("encoder_ref", "unknown-encoder")), sha),
        Parent("features", str(store.path.resolve()), "", facts),
    ]


@dataclass
class FinetuneRun:
    """What :func:`run_finetune` produced.

    Attributes:
        out: the output folder.
        labels: the labels of the slides used.
        selection: which slides were used, and which not.
        predictions: out-of-fold predictions (``predictions.csv``).
        metrics: the metrics (``metrics.json`` content, NaN kept as NaN).
        registered: refs of the registered models.
        files: files written.
    """

    out: Path
    labels: Labels
    selection: SlideSelection
    predictions: pd.DataFrame
    metrics: dict[str, Any]
    registered: list[str]
    files: list[Path]

    def result(self) -> dict[str, Any]:
        """The command's main result (its final JSON line)."""
        from histcode.finetune.metrics import jsonable

        m = self.metrics
        auc = m.get("tumour", {}).get("auc", {})
        within = m.get("tumour", {}).get("within_site_auc", {})
        return jsonable(
            {
                "out": str(self.out),
                "slides": len(self.labels),
                "patients": len(set(self.labels.patient_ids)),
                "folds": m.get("folds"),
                "tumour_auc": auc.get("mean"),
                "tumour_auc_sd": auc.get("sd"),
                "tumour_auc_within_site": within.get("auc"),
                "within_site_sites": within.get("sites"),
                "site_only_auc": m.get("tumour", {})
                .get("site_confounding", {})
                .get("site_only_auc"),
                "cv_group": m.get("cv_group"),
                "genes_evaluated": len(self.labels.genes),
                "mean_gene_auc_up": m.get("mean_gene_auc_up"),
                "significant_genes": len(m.get("significant_genes", [])),
                "significant": m.get("significant_genes", [])[:20],
                "registered": self.registered,
                "failed_slides": self.selection.failed(),
                "selection_warnings": m.get("selection_warnings", {}),
            }
        )


def run_finetune(
    features: Path,
    name: str,
    labels: Path | None = None,
    expression: Path | None = None,
    out: Path | None = None,
    registry: Path | None = None,
    data: DataOptions | None = None,
    model: ModelOptions | None = None,
    loss: LossOptions | None = None,
    optim: OptimOptions | None = None,
    cv: CVOptions | None = None,
    trainer: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
    config_text: str | None = None,
) -> FinetuneRun:
    """Cross-validate, report and register slide models (``histcode finetune`` in Python).

    Args:
        features: the feature store (``histcode embed``).
        name: checkpoint name of the registered model(s) (``NAME@N``).
        labels: labels CSV; ``None`` labels the store's slides from their TCGA barcodes.
        expression: expression matrix (genes × samples) for the genes task.
        out: output folder (default ``runs/finetune/NAME``).
        registry: registry root (default ``$HISTCODE_REGISTRY``, else ``./registry``).
        data, model, loss, optim, cv: option groups (:mod:`histcode.finetune.options`).
        trainer: ``pl.Trainer`` keyword arguments, or a function making fresh ones (called
            once per trained model).
        config_text: the resolved config, written as ``config.yaml``.

    Returns:
        A :class:`FinetuneRun`.

    Raises:
        ValueError, FileNotFoundError: unusable inputs; the message says what and how to fix.
    """
    from histcode.finetune import cv as cvmod
    from histcode.finetune.bags import FeatureBags
    from histcode.finetune.metrics import compute_metrics
    from histcode.finetune.module import MILModule
    from histcode.finetune.options import TRAINER_DEFAULTS
    from histcode.registry import check_name
    from histcode.siteconfounding import site_confounding_warning

    data, model = data or DataOptions(), model or ModelOptions()
    loss, optim, cv = loss or LossOptions(), optim or OptimOptions(), cv or CVOptions()
    check_name(name)
    out = Path(out) if out is not None else Path("runs") / "finetune" / name
    store = FeatureStore(features)
    attrs = store.attrs  # raises if it is not a feature store
    in_dim = int(attrs["embed_dim"])
    if cv.register != "none":  # a wrong --registry fails now, not after the training
        (Registry(registry) if registry is not None else Registry()).check_root()
    built, selection = prepare_labels(store, labels, expression, data)
    tumour = "tumour" in data.tasks
    genes = built.genes

    def make_module() -> MILModule:
        return MILModule(in_dim, tumour, genes, model, loss, optim, built.categories)

    make_module()  # unknown aggregator or option: fail before any training
    if cv.group == "site":  # sites unknown or too few: fail before any training
        cvmod.check_sites(built, cv.folds)

    def trainer_kwargs() -> dict[str, Any]:
        made = trainer() if callable(trainer) else dict(trainer or TRAINER_DEFAULTS)
        made.setdefault("default_root_dir", str(out))
        return made

    out.mkdir(parents=True, exist_ok=True)
    log.info(
        "finetune %s: %d slides, %d patients, tasks %s, %d gene(s), %d folds, aggregator %s%s",
        name,
        len(built),
        len(set(built.patient_ids)),
        "+".join(data.tasks),
        len(genes),
        cv.folds,
        model.aggregator,
        f" ({model.aggregator_options()['branches']} attention)"
        if model.aggregator == "abmil"
        else "",
    )
    bags = FeatureBags(store, cache=data.cache, context=model.tumour_context)
    result = cvmod.run_cv(built, bags, make_module, data, cv, trainer_kwargs, tumour)
    metrics = compute_metrics(
        result.predictions, genes, tumour, cv.alpha, cv.group, built.categories
    )
    if "site_confounding" in metrics.get("tumour", {}):  # the demo's results.md repeats it
        found = metrics["tumour"]["site_confounding"]
        found["warning"] = site_confounding_warning(found, attrs.get("stain_norm"))
    # folds whose validation chose an early epoch for every task (cv.BestState.warning)
    metrics["selection_warnings"] = {
        f"fold {r.fold.index + 1}": r.selection_warning for r in result.folds if r.selection_warning
    }

    refitted = None
    if cv.register == "refit":  # every process trains (distributed strategies need all)
        refitted = cvmod.refit(built, bags, make_module, data, cv, trainer_kwargs())
        log.info("refit on all %d slides: best epoch %d", len(built), refitted.best_epoch)
    files: list[Path] = []
    registered: list[str] = []
    if _is_rank_zero():  # one process writes and registers
        files = _write_outputs(out, result, metrics, built, tumour, config_text)
        if cv.anndata:
            files.append(_write_anndata(out, result, bags, metrics, store))
        if cv.register != "none":
            chosen = (
                [(refitted, {"fold": "refit"})]
                if refitted is not None
                else [(r, {"fold": r.fold.index}) for r in result.folds]
            )
            reg = Registry(registry) if registry is not None else Registry()
            registered = _register(reg, name, chosen, metrics, store, data, out, built)
    return FinetuneRun(out, built, selection, result.predictions, metrics, registered, files)


def _is_rank_zero() -> bool:
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _write_outputs(
    out: Path,
    result: Any,
    metrics: dict[str, Any],
    labels: Labels,
    tumour: bool,
    config_text: str | None,
) -> list[Path]:
    """``config.yaml``, ``predictions.csv``, ``targets.csv``, ``metrics.json``, ``folds.json``
    and ``plots/`` (each file written atomically)."""
    from histcode.finetune.metrics import jsonable
    from histcode.finetune.plots import plot_all

    files: list[Path] = []
    if config_text is not None:
        _write_text(out / "config.yaml", config_text)
        files.append(out / "config.yaml")
    _write_text(out / "predictions.csv", result.predictions.to_csv(index=False))
    _write_text(out / "targets.csv", labels.to_frame().to_csv(index=False))
    _write_text(out / "metrics.json", json.dumps(jsonable(metrics), indent=2) + "\n")
    folds_info = [
        {
            "fold": r.fold.index,
            "best_epoch": r.best_epoch,
            "retrained_with_validation": r.retrained,
            "best_val": r.best_score,
            "val_history": r.history,
            "selection_warning": r.selection_warning,
            "part_epochs": r.part_epochs,
            # what chose the epoch (val_history's metric) and every validation curve
            "selection_monitor": r.monitor,
            "val_curves": r.curves,
            # cv.inner: the patients each inner fold validated on (val_history is the mean
            # of their curves; the fold's model trained on train + val)
            "inner_val_patients": [f.patients(labels)["val"] for f in r.inner] if r.inner else None,
            "slides": {k: len(getattr(r.fold, k)) for k in ("train", "val", "test")},
            "patients": r.fold.patients(labels),
            "group": r.fold.group,
            "val_group": r.fold.val_group,
            "sites": r.fold.sites(labels),
        }
        for r in result.folds
    ]
    _write_text(out / "folds.json", json.dumps(jsonable(folds_info), indent=2) + "\n")
    files += [out / f for f in ("predictions.csv", "targets.csv", "metrics.json", "folds.json")]
    files += plot_all(result.predictions, metrics, labels.genes, tumour, out / "plots")
    return files


def _write_anndata(
    out: Path, result: Any, bags: Any, metrics: dict[str, Any], store: FeatureStore
) -> Path:
    """``slides.h5ad``: out-of-fold predictions as ``obs``, held-out embeddings as ``obsm``."""
    from histcode.finetune.h5ad import slide_embeddings, write_slides_h5ad
    from histcode.finetune.metrics import jsonable

    predictions = result.predictions
    embeddings = slide_embeddings(result.folds, bags, predictions["slide_id"].tolist())
    provenance = {
        "encoder_ref": str(store.attrs.get("encoder_ref", "unknown-encoder")),
        "encoder_sha256": str(store.attrs.get("encoder_sha256", "")),
        "features": str(store.path.resolve()),
        "lineage": " | ".join(p.legacy() for p in lineage(store)),
        "run": str(out.resolve()),
    }
    text = json.dumps(jsonable(metrics))
    return write_slides_h5ad(out / "slides.h5ad", predictions, embeddings, text, provenance)


def _register(
    registry: Registry,
    name: str,
    chosen: list[tuple[Any, dict[str, Any]]],
    metrics: dict[str, Any],
    store: FeatureStore,
    data: DataOptions,
    out: Path,
    labels: Labels,
) -> list[str]:
    """Save each chosen model as the next version of ``name``, with CV metrics and lineage.

    The card's ``extra`` lists the patients and slides the model was trained on
    (``trained_patients``, ``trained_slide_ids``) and those that chose its epoch
    (``validation_patients``, ``validation_slide_ids``): every other slide is held out from
    it, which ``histcode heatmap`` reports (and requires before scoring ``--truth``).
    """
    from histcode.finetune.metrics import jsonable

    slides = np.asarray(labels.slide_ids)
    refs = []
    for fold_result, extra in chosen:
        fold = fold_result.fold
        patients = fold.patients(labels)
        # with cv.retrain the model learnt from the validation slides too (they chose its
        # epoch count first)
        trained = np.concatenate([fold.train, fold.val]) if fold_result.retrained else fold.train
        arguments = fold_result.module.model_arguments()
        card = Card(
            kind="mil",
            architecture=arguments.pop("architecture"),
            arguments=arguments,
            metrics=jsonable(_card_metrics(metrics)),
            lineage=lineage(store),
            extra=jsonable(
                {
                    "genes": list(fold_result.module.genes),
                    "tasks": list(data.tasks),
                    "classes": labels.categories,
                    "threshold": data.threshold,
                    "units": data.units,
                    "normal_reference": labels.reference,
                    "run": str(out.resolve()),
                    **extra,
                    "best_epoch": fold_result.best_epoch,
                    "retrained_with_validation": fold_result.retrained,
                    "trained_slides": len(trained),
                    "validation_slides": len(fold.val),
                    "trained_patients": sorted(
                        set(patients["train"])
                        | (set(patients["val"]) if fold_result.retrained else set())
                    ),
                    "validation_patients": patients["val"],
                    "trained_slide_ids": sorted(slides[trained].tolist()),
                    "validation_slide_ids": sorted(slides[fold.val].tolist()),
                }
            ),
        )
        refs.append(registry.save(name, fold_result.module.model, card))
    log.info("registered %s in %s", ", ".join(refs), registry.root)
    return refs


def _card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The cross-validation estimate for a registry card: mean ± sd of the headline metrics."""
    card: dict[str, Any] = {"cv_folds": metrics.get("folds"), "slides": metrics.get("slides")}
    card["cv_group"] = metrics.get("cv_group")
    for m, v in metrics.get("tumour", {}).items():
        if m not in ("pooled", "within_site_auc", "site_confounding"):
            card[f"tumour_{m}"] = {"mean": v["mean"], "sd": v["sd"]}
    if "within_site_auc" in metrics.get("tumour", {}):
        within = metrics["tumour"]["within_site_auc"]
        card["tumour_auc_within_site"] = {
            "auc": within["auc"],
            "sites": within["sites"],
            "per_site": {s: v["auc"] for s, v in within.get("per_site", {}).items()},
        }
    if "site_confounding" in metrics.get("tumour", {}):
        found = metrics["tumour"]["site_confounding"]
        card["site_only_auc"] = {k: found.get(k) for k in ("site_only_auc", "confounded")}
    for task, m in metrics.get("categories", {}).items():
        card[f"{task}_macro_auc"] = {"mean": m["macro_auc"]["mean"], "sd": m["macro_auc"]["sd"]}
    if "genes" in metrics:
        auc = metrics.get("gene_auc_up", {})
        card["genes_evaluated"] = len(metrics["genes"])
        card["mean_gene_auc_up"] = metrics.get("mean_gene_auc_up")
        card["mean_gene_auc_up_left_out"] = auc.get("left_out", {})
        card["significant_genes"] = metrics.get("significant_genes", [])
        card["significance_test"] = metrics.get("fdr", {}).get("label")
        card["genes"] = {
            g: {
                "auc_up": {
                    "mean": m["auc_up"]["mean"],
                    "sd": m["auc_up"]["sd"],
                    "folds": m["auc_up"]["n"],
                },
                "pearson_r": {"mean": m["pearson_r"]["mean"], "sd": m["pearson_r"]["sd"]},
                "pearson_q": m["test"]["pearson_q"],
            }
            for g, m in metrics["genes"].items()
        }
    return card


__all__ = [
    "FinetuneRun",
    "SlideSelection",
    "lineage",
    "prepare_labels",
    "run_finetune",
    "select_slides",
]
