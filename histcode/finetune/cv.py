"""Patient- or site-grouped cross-validation without leakage.

* Outer folds: ``StratifiedGroupKFold`` over patients (stratified by tumour label), so no
  patient's slides are split between training and test. With ``group="site"``
  (``--cv.group site``) the groups are tissue source sites (TCGA barcode characters 6–7, or
  a ``site`` column of the labels CSV): each site is in exactly one test fold, so a model is
  always tested on sites it never trained on and cannot pass a site's stain or scanner
  signature off as tumour detection (Howard et al., Nat Commun 2021). Patients are nested in
  sites, so they never cross folds either.
* Inside each training fold, a grouped validation split chooses the epoch: early stopping
  and the best weights follow the validation loss only. It is grouped by patient; with
  ``group="site"`` it is grouped by site too when the training part has enough sites for it
  (at least ``round(1 / val_fraction)``, 5 at the default 0.2, so that validation is about
  ``val_fraction`` of the sites and training keeps the rest), else by patient — with 3 or 4
  training sites a site-grouped validation would take a third or more of the training data
  and could hold one class only. The epoch is then chosen on unseen sites where the cohort
  allows it, and the choice is recorded per fold (``Fold.val_group``, ``folds.json``).
* The test fold is predicted once, with the selected weights, after training; it is never
  used to select anything.
* :func:`check_folds` proves, for every run, that test folds partition the patients and that
  train, validation and test patients are disjoint; for site-grouped folds also that test
  sites are disjoint across folds and from their fold's train and validation sites (it
  raises :class:`LeakageError`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch

from histcode.finetune.bags import BagDataset, FeatureBags, bag_loader
from histcode.finetune.labels import Labels, preview
from histcode.finetune.metrics import gene_spearman, rank_loss
from histcode.finetune.module import TERMS, MILModule, stack_predictions
from histcode.finetune.options import CVOptions, DataOptions

log = logging.getLogger(__name__)

Group = Literal["patient", "site"]


class LeakageError(RuntimeError):
    """A patient (or, for site-grouped folds, a site) would be in two of train / validation /
    test, or in two test folds."""


@dataclass
class Fold:
    """Row positions (into a :class:`Labels`) of one fold's slides.

    Attributes:
        index: fold number (0-based); ``-1`` for a refit on every patient.
        train: rows trained on.
        val: rows that choose the epoch.
        test: rows predicted once with the chosen weights (empty for a refit).
        group: what the test part is grouped by: ``patient`` or ``site``.
        val_group: what the validation split is grouped by (``site`` only when ``group`` is
            and the training part has enough sites; see the module docstring).
    """

    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    group: Group = "patient"
    val_group: Group = "patient"

    def patients(self, labels: Labels) -> dict[str, list[str]]:
        """Sorted patient ids of each part."""
        pid = np.asarray(labels.patient_ids)
        return {
            part: sorted(set(pid[getattr(self, part)].tolist()))
            for part in ("train", "val", "test")
        }

    def sites(self, labels: Labels) -> dict[str, list[str]]:
        """Sorted tissue source sites of each part (``""``: unknown)."""
        site = np.asarray(labels.sites, dtype=object)
        return {
            part: sorted(set(site[getattr(self, part)].tolist()))
            for part in ("train", "val", "test")
        }


def strata(labels: Labels) -> np.ndarray:
    """Stratification labels: tumour status (``-1`` unknown); with genes and no tumour label,
    whether the slide has a gene target."""
    if labels.tumour_mask.any():
        return np.where(labels.tumour_mask, labels.tumour, -1).astype(int)
    return labels.gene_mask.any(1).astype(int)


def _check_split_sizes(
    y: np.ndarray, groups: np.ndarray, n_splits: int, group: Group, what: str
) -> None:
    """Refuse, naming the counts and the fix, what scikit-learn refuses with its ``n_splits``
    message: fewer groups than splits, or every stratum with fewer slides than splits."""
    n_groups = len(set(groups.tolist()))
    values, slides = np.unique(y, return_counts=True)
    if n_groups >= n_splits and slides.max(initial=0) >= n_splits:
        return
    names = {-1: "unlabelled", 0: "normal", 1: "tumour"}
    counts = ", ".join(
        f"{names.get(int(v), f'stratum {v}')}: {c} slide(s) of "
        f"{len(set(groups[y == v].tolist()))} {group}(s)"
        for v, c in zip(values, slides, strict=True)
    )
    if what == "folds":
        fix = f"Use --cv.folds {max(2, min(n_groups, int(slides.max(initial=0))))} or fewer"
    else:
        fix = (
            "Use --cv.val_fraction 0.5 (2 validation splits) or fewer --cv.folds (larger "
            "training parts)"
        )
    raise ValueError(
        f"the cohort is too small for {n_splits} stratified {group}-grouped {what}: they need "
        f"at least {n_splits} {group}s and one class with at least {n_splits} slides; it has "
        f"{n_groups} {group}(s) ({counts}). {fix}, or add slides."
    )


def _grouped_split(
    rows: np.ndarray,
    labels: Labels,
    n_splits: int,
    seed: int,
    group: Group = "patient",
    what: str = "folds",
) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedGroupKFold

    y = strata(labels)[rows]
    ids = labels.patient_ids if group == "patient" else labels.sites
    groups = np.asarray(ids)[rows]
    _check_split_sizes(y, groups, n_splits, group, what)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has only …" on tiny cohorts
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        return [(rows[a], rows[b]) for a, b in splitter.split(rows, y, groups)]


def check_sites(labels: Labels, folds: int | None = None) -> None:
    """Check that ``labels`` can be grouped by tissue source site.

    Args:
        labels: the cohort.
        folds: the number of outer folds, which needs at least as many sites; ``None`` skips
            that check.

    Raises:
        ValueError: slides without a site (non-TCGA ids and no ``site`` column in the labels
            CSV), a patient with slides from two sites, or fewer sites than folds; each
            message names the slides, patients or counts and says how to fix it.
    """
    unknown = [s for s, site in zip(labels.slide_ids, labels.sites, strict=True) if not site]
    if unknown:
        raise ValueError(
            f"--cv.group site needs the tissue source site of every slide; {len(unknown)} of "
            f"{len(labels)} have none: {preview(unknown)}. Sites are read from TCGA barcodes "
            "(characters 6–7, the XX of TCGA-XX-…); for other ids add a 'site' column to the "
            "labels CSV, or use --cv.group patient."
        )
    by_patient: dict[str, set[str]] = {}
    for p, site in zip(labels.patient_ids, labels.sites, strict=True):
        by_patient.setdefault(p, set()).add(site)
    mixed = [f"{p} ({', '.join(sorted(s))})" for p, s in by_patient.items() if len(s) > 1]
    if mixed:
        raise ValueError(
            f"patients with slides from more than one site: {preview(mixed, 5)}. Site-grouped "
            "folds keep each patient in one site; fix the 'site' column of the labels CSV, or "
            "use --cv.group patient."
        )
    n_sites = len(set(labels.sites))
    if folds is not None and n_sites < folds:
        raise ValueError(
            f"--cv.group site puts each tissue source site in one test fold, so {folds} folds "
            f"need at least {folds} sites; the cohort has {n_sites} "
            f"({preview(sorted(set(labels.sites)))}). Use --cv.folds {n_sites} or fewer"
            f"{'' if n_sites >= 2 else ' (needs 2 sites)'}, or --cv.group patient."
        )


def check_categories(labels: Labels, folds: int) -> None:
    """Check that every class of every categorical task has a patient for each test fold.

    Raises:
        ValueError: a class with fewer patients than folds (some test folds could not hold it,
            and its one-vs-rest AUC would be undefined there); names the task, every class's
            patients and slides, and the fix.
    """
    patients = np.asarray(labels.patient_ids)
    for k, (task, names) in enumerate(labels.categories.items()):
        codes = labels.category_codes[:, k]
        counts = [
            (name, len(set(patients[codes == c].tolist())), int((codes == c).sum()))
            for c, name in enumerate(names)
        ]
        rare = [name for name, n_patients, _ in counts if n_patients < folds]
        if not rare:
            continue
        listed = ", ".join(f"{name}: {p} patient(s), {s} slide(s)" for name, p, s in counts)
        fewest = min(p for _, p, _ in counts)
        fold_fix = f"use --cv.folds {fewest} or fewer, " if fewest >= 2 else ""
        raise ValueError(
            f"categorical task {task!r}: class(es) {', '.join(map(repr, rare))} have fewer "
            f"patients than the {folds} test folds, so some folds cannot test them ({listed}). "
            f"To fix: {fold_fix}leave the rare class's cells empty (or merge it into another "
            "class) in the labels CSV, or add patients."
        )


def validation_group(
    rows: np.ndarray, labels: Labels, val_fraction: float, group: Group = "patient"
) -> Group:
    """What the validation split of ``rows`` is grouped by: ``site`` when ``group`` is
    ``site`` and ``rows`` hold at least ``round(1 / val_fraction)`` sites (5 at 0.2), else
    ``patient`` (see the module docstring for why)."""
    if group != "site":
        return "patient"
    n_sites = len(set(np.asarray(labels.sites)[rows].tolist()))
    return "site" if n_sites >= max(2, round(1 / val_fraction)) else "patient"


def validation_split(
    rows: np.ndarray,
    labels: Labels,
    val_fraction: float,
    seed: int,
    group: Group = "patient",
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (train, validation), ~``val_fraction`` of the groups in
    validation, stratified by tumour label.

    Args:
        rows: the rows to split (a training part).
        labels: the cohort.
        val_fraction: share of the groups in validation.
        seed: seed of the split.
        group: ``patient``, or ``site`` to group by site where the rows have enough sites
            (:func:`validation_group`).

    Returns:
        ``(train, val)``: the rows of each part.

    Raises:
        ValueError: ``val_fraction`` is not in (0, 0.5], or fewer than 2 patients.
    """
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    n_patients = len(set(np.asarray(labels.patient_ids)[rows].tolist()))
    if n_patients < 2:
        raise ValueError(
            f"a validation split needs ≥ 2 patients in the training part, got {n_patients}; "
            "use fewer folds or a larger cohort"
        )
    wanted = max(2, round(1 / val_fraction))
    by = validation_group(rows, labels, val_fraction, group)
    n_splits = min(wanted, n_patients) if by == "patient" else wanted
    if by == "patient":  # a tiny training part: a larger validation share, not a failure
        largest = np.unique(strata(labels)[rows], return_counts=True)[1].max()
        n_splits = max(2, min(n_splits, int(largest)))
    train, val = _grouped_split(rows, labels, n_splits, seed, by, "validation splits")[0]
    return train, val


def make_folds(
    labels: Labels,
    folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    group: Group = "patient",
) -> list[Fold]:
    """Patient- or site-grouped, stratified outer folds, each with an inner validation split.

    Args:
        labels: the cohort.
        folds: number of outer folds (≥ 2).
        val_fraction: share of each training part's patients (or sites) used for validation.
        seed: seed of the splits.
        group: ``patient`` (no patient in two folds) or ``site`` (no tissue source site in
            two test folds, and so no patient either; see the module docstring).

    Returns:
        ``folds`` folds; their test parts partition the slides.

    Raises:
        ValueError: fewer patients than folds (or than folds + 1 for the validation split);
            for ``group="site"``, see :func:`check_sites`.
        LeakageError: never, unless the splitter breaks (checked by :func:`check_folds`).
    """
    if group not in ("patient", "site"):
        raise ValueError(f"cv.group must be 'patient' or 'site', not {group!r}")
    n_patients = len(set(labels.patient_ids))
    if folds < 2:
        raise ValueError(f"cross-validation needs ≥ 2 folds, got {folds}")
    if n_patients < folds + 1:
        raise ValueError(
            f"{folds} patient-grouped folds need more patients than folds; the cohort has "
            f"{n_patients}. Use --cv.folds {max(2, n_patients - 1)} or fewer."
        )
    if group == "site":
        check_sites(labels, folds)
    check_categories(labels, folds)
    rows = np.arange(len(labels))
    out = []
    for k, (trainval, test) in enumerate(_grouped_split(rows, labels, folds, seed, group)):
        train, val = validation_split(trainval, labels, val_fraction, seed + 1 + k, group)
        by = validation_group(trainval, labels, val_fraction, group)
        out.append(Fold(k, np.sort(train), np.sort(val), np.sort(test), group, by))
    if len(out) < folds or any(not len(f.test) for f in out):
        raise ValueError(
            f"the {group}-grouped split left {folds - sum(bool(len(f.test)) for f in out)} of "
            f"{folds} test folds empty; use fewer --cv.folds"
        )
    check_folds(out, labels)
    return out


def check_folds(folds: list[Fold], labels: Labels) -> None:
    """Prove that no patient leaks: within a fold train / val / test patients are disjoint;
    across folds test patients are disjoint; every slide is tested once (refits excepted).
    For site-grouped folds (``Fold.group == "site"``), the same of sites: a fold's test sites
    are not among its train or validation sites, no site is in two test folds, and, where the
    validation split is site-grouped, train and validation sites are disjoint.

    Raises:
        LeakageError: naming the patients or sites that leak.
    """
    _check_disjoint(folds, labels, "patient")
    _check_disjoint([f for f in folds if f.group == "site"], labels, "site")
    tested = [i for fold in folds for i in fold.test.tolist()]
    if folds and folds[0].index >= 0 and sorted(tested) != list(range(len(labels))):
        raise LeakageError("the test folds do not cover every slide exactly once")


def _check_disjoint(folds: list[Fold], labels: Labels, what: Group) -> None:
    """Raise :class:`LeakageError` when a patient (or site) is in two parts of a fold or in
    the test parts of two folds; train and validation sites may share a site unless the
    validation split was site-grouped."""
    seen: dict[str, int] = {}
    for fold in folds:
        ids = fold.patients(labels) if what == "patient" else fold.sites(labels)
        parts = {k: set(v) for k, v in ids.items()}
        pairs = [("train", "test"), ("val", "test")]
        if what == "patient" or fold.val_group == "site":
            pairs.insert(0, ("train", "val"))
        for a, b in pairs:
            shared = parts[a] & parts[b]
            if shared:
                raise LeakageError(
                    f"fold {fold.index}: {what}s in both {a} and {b}: {preview(sorted(shared))}"
                )
        for p in parts["test"]:
            if p in seen:
                raise LeakageError(
                    f"{what} {p} is in the test parts of folds {seen[p]} and {fold.index}"
                )
            seen[p] = fold.index


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer chatter (device banners, tips, data-loader advice):
    with one Trainer per fold it would drown the fold summaries."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in (
                ".*does not have many workers.*",
                ".*number of training batches.*",
                ".*LeafSpec.*",
                ".*litlogger.*",
            ):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.setLevel(level)


def _weights_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s state dict (kept in memory, no checkpoint file)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class BestState(pl.Callback):
    """Keeps the weights of the best validation epoch in memory (no checkpoint files).

    Args:
        monitor: logged validation metric, lower is better.
        smooth: epochs the metric is averaged over before the best is chosen (the epoch and
            the ``smooth - 1`` before it; 1: each epoch's own value). ``history`` keeps the
            raw values, ``best`` the smoothed one.
        missing_ok: an epoch whose monitor was not logged gets NaN in ``history`` instead of
            an error (an inner fold too small to rank the genes: :meth:`averaged` ranks them
            on the pooled folds).
        keep_weights: copy the weights at each new best (False where only the epoch
            matters: inner folds, the total under ``select per_task``).
    """

    def __init__(
        self,
        monitor: str | dict[str, float] = "val/loss",
        smooth: int = 1,
        missing_ok: bool = False,
        keep_weights: bool = True,
    ) -> None:
        self.monitor = monitor
        self.missing_ok = missing_ok
        self.keep_weights = keep_weights
        self.smooth = max(1, int(smooth))
        self.best: float = math.inf
        self.best_epoch: int = -1
        self.state: dict[str, torch.Tensor] | None = None
        self.history: list[float] = []
        #: each epoch's logged validation metrics (``val/<name>``)
        self.logged: list[dict[str, float]] = []

    @property
    def tasks(self) -> dict[str, list[float]]:
        """Each logged validation metric but the total (``val/<task>``), its values in epoch
        order (an epoch that did not log it left out): the curves :meth:`warning` reads and
        ``folds.json`` records."""
        out: dict[str, list[float]] = {}
        for epoch in self.logged:
            for name, value in epoch.items():
                if name != "val/loss":
                    out.setdefault(name, []).append(value)
        return out

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.logged.append(
            {n: float(v) for n, v in trainer.callback_metrics.items() if n.startswith("val/")}
        )
        value = self._value(trainer.callback_metrics)
        if value is None and self.missing_ok:
            self.history.append(math.nan)
            return
        if value is None:
            raise ValueError(
                f"monitor {self.monitor!r} was not logged (logged: "
                f"{', '.join(sorted(trainer.callback_metrics))}); choose a metric of the tasks "
                "being trained (val/genes_rank needs 3 or more validation slides with fold "
                "changes)"
            )
        self.history.append(float(value))
        value = float(np.mean(self.history[-self.smooth :]))
        if value < self.best or self.best_epoch < 0:
            self.best, self.best_epoch = value, trainer.current_epoch
            if self.keep_weights:
                self.state = _weights_copy(pl_module)

    @classmethod
    def averaged(
        cls, states: list[BestState], pooled: dict[str, list[float]] | None = None
    ) -> BestState:
        """The mean of several runs' validation curves, epoch by epoch, and its best epoch
        (``cv.inner``): the curves of models validated on different patients, averaged over
        the epochs every run reached (``logged``: each metric's mean where every run logged
        it). It holds no weights.

        Args:
            states: the runs' trackers, same monitor.
            pooled: metrics computed once per epoch on all runs' validation slides together
                (``val/genes_rank`` on every inner fold's predictions), which replace the
                runs' own values of them in the monitor and the curves.
        """
        first = states[0]
        out = cls(first.monitor, first.smooth)
        run = min(len(s.history) for s in states)
        pooled = {k: v[:run] for k, v in (pooled or {}).items() if len(v) >= run}
        monitor = first.monitor
        if isinstance(monitor, dict) and set(pooled) & set(monitor):

            def rest(s: BestState, e: int) -> float:
                value = s._value({k: v for k, v in s.logged[e].items() if k not in pooled})
                return value or 0.0

            out.history = [
                float(np.mean([rest(s, e) for s in states]))
                + sum(w * pooled[k][e] for k, w in monitor.items() if k in pooled)
                for e in range(run)
            ]
        elif isinstance(monitor, str) and monitor in pooled:
            out.history = list(pooled[monitor])
        else:
            out.history = np.mean([s.history[:run] for s in states], axis=0).tolist()
        for e in range(run):  # each metric every run logged at this epoch, their mean
            names = set.intersection(*(set(s.logged[e]) for s in states)) - set(pooled)
            epoch = {k: float(np.mean([s.logged[e][k] for s in states])) for k in sorted(names)}
            out.logged.append(epoch | {k: v[e] for k, v in pooled.items()})
        smoothed = [np.mean(out.history[max(0, e - out.smooth + 1) : e + 1]) for e in range(run)]
        out.best_epoch = int(np.argmin(smoothed))
        out.best = float(smoothed[out.best_epoch])
        return out

    def _value(self, logged: Any) -> float | None:
        """The monitor's value: one logged metric, or the weighted sum of those logged of a
        ``{metric: weight}`` monitor (a task whose loss had no labelled slide this epoch is
        left out); None when nothing of it was logged."""
        if isinstance(self.monitor, str):
            value = logged.get(self.monitor)
            return None if value is None else float(value)
        found = [(float(logged[k]), w) for k, w in self.monitor.items() if k in logged]
        return sum(v * w for v, w in found) if found else None

    def stalled(self, patience: int) -> bool:
        """``patience`` validation epochs or more since the best one."""
        return len(self.history) - 1 - self.best_epoch >= patience

    def warning(self) -> str | None:
        """Say so when one task's validation loss chose an early epoch for every task.

        The monitor sums the tasks' losses over a few validation patients. A validation slide
        the tumour scorer gets wrong from its warm start on gives a tumour loss that only
        grows with training, and it then picks an epoch near the first for the gene heads too,
        while their own validation loss keeps falling (measured: easy demo seed 0 on one torch
        thread, fold 3: ``val/tumour`` 3.0 → 4.9 while ``val/log2fc`` fell 0.44 → 0.08; epoch
        1 chosen, that fold's tumour-burden genes r 0.25 against 0.66 and 0.74 in the others).

        Returns:
            A sentence naming the epoch, the rising and the falling tasks, or None when the
            chosen epoch is not in the first tenth of those run or no other task fell by half
            after it.
        """
        run = len(self.history)
        if run < 10 or self.best_epoch >= run // 10:
            return None
        at, end = self.best_epoch, run - 1
        moved = {k: (v[at], v[end]) for k, v in self.tasks.items() if len(v) == run}
        fell = {k: ab for k, ab in moved.items() if ab[0] > 0 and ab[1] < 0.5 * ab[0]}
        rose = {k: ab for k, ab in moved.items() if ab[1] > ab[0]}
        if not fell:
            return None

        def listing(items: dict[str, tuple[float, float]]) -> str:
            return ", ".join(f"{k} {a:.3g} → {b:.3g}" for k, (a, b) in items.items())

        return (
            f"validation ({self.monitor}) chose {at + 1} of {run} epochs for every task, "
            f"but after epoch {at} {listing(fell)} kept falling"
            + (f" while {listing(rose)} rose" if rose else "")
            + ": one task's validation slides decided for all. A few validation patients "
            "can do this; more of them (--cv.inner 5: every training patient validates "
            "once), --cv.select per_task (each part of the model at its own epoch) or "
            "--cv.monitor set to the task you care about (e.g. val/log2fc) choose better"
        )


@dataclass
class FoldResult:
    """What one fold produced.

    Attributes:
        fold: the split.
        best_epoch: the epoch chosen on validation (0-based).
        best_score: its validation ``monitor`` value.
        history: validation ``monitor`` per epoch.
        module: the trained module with the chosen weights.
        predictions: test predictions (:meth:`MILModule.predict_step`, stacked); empty for a
            refit.
        retrained: the module was trained afresh on the training and validation slides for
            ``best_epoch + 1`` epochs (``cv.retrain``).
        selection_warning: :meth:`BestState.warning` (one task's validation chose an early
            epoch while another's kept falling), or None.
        part_epochs: with ``cv.select per_task``, the epoch (0-based) each part of the model
            was taken from (:func:`selection_parts`); ``best_epoch`` is then the genes'.
        inner: with ``cv.inner``, the inner folds whose averaged validation curves chose the
            epoch (``history`` is that average); None otherwise.
        monitor: what chose the epoch (``history``'s metric): a logged metric, or
            ``{metric: weight}`` summed (``cv.genes_metric rank``); with ``per_task`` each
            part's.
        curves: every validation metric per epoch (``val/<term>``; with ``cv.inner`` the
            inner folds' mean, ``val/genes_rank`` ranked on their pooled slides).
    """

    fold: Fold
    best_epoch: int
    best_score: float
    history: list[float]
    module: MILModule
    predictions: dict[str, Any] = field(default_factory=dict)
    retrained: bool = False
    selection_warning: str | None = None
    part_epochs: dict[str, int] | None = None
    inner: list[Fold] | None = None
    monitor: Any = None
    curves: dict[str, list[float]] = field(default_factory=dict)


def train_fold(
    fold: Fold,
    labels: Labels,
    bags: FeatureBags,
    make_module: Callable[[], MILModule],
    data: DataOptions,
    cv: CVOptions,
    trainer_kwargs: dict[str, Any],
) -> FoldResult:
    """Train on ``fold.train``, choose the epoch on ``fold.val`` (or, with ``cv.inner``, on
    inner folds of both), predict ``fold.test`` once.

    Args:
        fold: the split.
        labels: the cohort.
        bags: the features.
        make_module: builds a fresh, untrained module.
        data: batch size, ``max_tiles``, workers.
        cv: monitor, patience, seed, inner folds.
        trainer_kwargs: keyword arguments of ``pl.Trainer`` (``callbacks`` are added to).

    Returns:
        A :class:`FoldResult`.
    """
    seed = cv.seed + 1000 * (fold.index + 1)

    def fresh(rows: np.ndarray) -> MILModule:
        """A new module, its tumour scorer warm-started on ``rows`` (when configured)."""
        pl.seed_everything(seed, workers=True, verbose=False)
        module = make_module()
        if module.model_options.tumour_warm_start:
            part = labels.subset(rows)
            module.warm_start([bags[s] for s in part.slide_ids], part.tumour, seed)
        return module

    def loader(rows: np.ndarray, train: bool) -> Any:
        dataset = BagDataset(bags, labels.subset(rows), data.max_tiles if train else None)
        return bag_loader(dataset, data.batch_size, train, data.num_workers, seed)

    inner: list[Fold] | None = None
    if cv.inner:
        inner = inner_folds(fold, labels, cv.inner, seed, cv.group)
        fits = [_fit(f.train, f.val, fresh, loader, cv, trainer_kwargs, inner=True) for f in inner]
        chosen = [c for _, _, c in fits]
        pooled = (
            pooled_gene_rank([m for m, _, _ in fits], cv.genes_metric == "rank_signal")
            if cv.genes_metric != "loss"
            else None
        )
        del fits
        selection = _Selection(
            BestState.averaged([c.best for c in chosen], pooled),
            {
                n: BestState.averaged([c.trackers[n] for c in chosen], pooled)
                for n in chosen[0].trackers
            },
            chosen[0].parts,
        )
    else:
        _check_rankable(fold, labels, cv)
        module, trainer, selection = _fit(fold.train, fold.val, fresh, loader, cv, trainer_kwargs)
        if selection.parts is None:
            module.load_state_dict(selection.best.state or {})
        else:
            states = {n: t.state for n, t in selection.trackers.items()}
            module.load_state_dict(_merge_parts(selection.parts, states))
    best, trackers, parts = selection.best, selection.trackers, selection.parts
    part_epochs = {name: t.best_epoch for name, t in trackers.items()} or None
    retrained = bool(cv.inner or (cv.retrain and len(fold.val)))
    if retrained:
        # the chosen weights only chose the epoch count: a fresh module learns from all
        epochs = part_epochs or {"all": best.best_epoch}
        module, trainer = _retrain(fold, fresh, loader, epochs, parts, trainer_kwargs)
    predictions: dict[str, Any] = {}
    if len(fold.test):
        with quiet_lightning():
            predictions = predict(module, loader(fold.test, False), trainer)
    module.cpu().eval()
    warning = best.warning() if parts is None else None
    if warning:
        log.warning("fold %d: %s", fold.index + 1, warning)
    chosen_epoch = part_epochs["genes"] if part_epochs else best.best_epoch
    score = trackers["genes"].best if parts is not None else best.best
    return FoldResult(
        fold,
        chosen_epoch,
        score,
        best.history,
        module,
        predictions,
        retrained,
        warning,
        part_epochs,
        inner,
        best.monitor if parts is None else {n: p.monitor for n, p in parts.items()},
        best.tasks,
    )


#: the gene terms of the validation loss, which ``cv.genes_metric rank`` replaces by
#: :data:`GENES_RANK`
GENE_LOSSES = ("val/log2fc", "val/classes")
GENES_RANK = "val/genes_rank"


def _rank_genes(monitor: dict[str, float], module: MILModule) -> dict[str, float]:
    """``monitor`` with the genes' losses replaced by ``val/genes_rank`` (weighted as the
    log2fc loss, or as the class loss when log2fc has no weight)."""
    w = module.loss_options
    out = {k: v for k, v in monitor.items() if k not in GENE_LOSSES}
    out[GENES_RANK] = float(w.log2fc or w.classes or 1.0)
    return out


def selection_monitor(module: MILModule, cv: CVOptions) -> str | dict[str, float]:
    """The metric that chooses the whole model's epoch: ``cv.monitor``, or with
    ``cv.genes_metric rank`` and the total loss as monitor, the weighted loss terms with the
    genes' losses replaced by ``val/genes_rank`` (1 − mean Spearman of the genes)."""
    if cv.genes_metric == "loss" or cv.monitor != "val/loss" or not module.genes:
        return cv.monitor
    w = module.loss_options
    terms = {f"val/{t}": float(getattr(w, t)) for t in TERMS if getattr(w, t) > 0}
    return _rank_genes(terms, module)


#: one-sided 5 % normal quantile: ``rank_signal`` keeps a gene whose mean pooled correlation
#: exceeds it / sqrt(n - 1)
SIGNAL_Z = 1.645

#: fewest validation slides with fold changes for ``val/genes_rank`` to be more than coarse
MIN_RANKED = 8


def _check_rankable(fold: Fold, labels: Labels, cv: CVOptions) -> None:
    """``cv.genes_metric rank`` on one validation split: refuse fewer than 3 validation
    slides with fold changes (nothing to rank), warn below :data:`MIN_RANKED` (a coarse
    curve).

    Raises:
        ValueError: fewer than 3 such slides, with the fix.
    """
    if cv.genes_metric == "loss" or labels.log2fc is None:
        return
    n = int(np.isfinite(labels.log2fc[fold.val]).any(axis=1).sum())
    fix = "--cv.inner 5 ranks every training patient once"
    if n < 3:
        raise ValueError(
            f"fold {fold.index + 1}: --cv.genes_metric rank needs 3 or more validation slides "
            f"with fold changes to rank the genes on; this fold's validation split has {n}. "
            f"{fix} (with --cv.retrain true), or use --cv.genes_metric loss"
        )
    if n < MIN_RANKED:
        log.warning(
            "fold %d: --cv.genes_metric rank ranks the genes on %d validation slides with "
            "fold changes, a coarse curve; %s",
            fold.index + 1,
            n,
            fix,
        )


def pooled_gene_rank(
    modules: list[MILModule], signal_only: bool = False
) -> dict[str, list[float]] | None:
    """``val/genes_rank`` of each epoch on the inner folds' validation slides pooled: every
    training patient's out-of-fold prediction at that epoch, ranked once per gene (the
    inner folds hold 2-5 patients each, too few to rank on their own).

    Args:
        modules: the inner folds' models after training (their ``val_gene_predictions``).
        signal_only: ``cv.genes_metric rank_signal``: average only the genes whose
            correlation, averaged over the epochs, exceeds the one-sided 5 % critical value
            ``1.645 / sqrt(n - 1)`` of ``n`` pooled slides (all genes when none does).

    Returns:
        ``{"val/genes_rank": [one value per epoch every module ran]}`` (1.0, chance, where no
        gene could be ranked), or None without gene predictions.
    """
    runs = [m.val_gene_predictions for m in modules]
    epochs = min(len(r) for r in runs)
    if not epochs:
        return None
    rhos = []
    for e in range(epochs):
        pred = np.concatenate([r[e][0] for r in runs])
        true = np.concatenate([r[e][1] for r in runs])
        rhos.append(gene_spearman(pred, true))
    matrix = np.vstack(rhos)  # (epochs, G)
    n = int(np.isfinite(true).any(axis=1).sum())  # the same slides every epoch
    keep = np.ones(matrix.shape[1], dtype=bool)
    if signal_only and n > 2:
        with warnings.catch_warnings():  # a gene never ranked: all-NaN column
            warnings.simplefilter("ignore", RuntimeWarning)
            signal = np.nanmean(matrix, axis=0) > SIGNAL_Z / math.sqrt(n - 1)
        if signal.any():
            keep = signal
    values = [rank_loss(row) for row in matrix[:, keep]]
    return {GENES_RANK: [1.0 if v is None else v for v in values]}


def inner_folds(fold: Fold, labels: Labels, k: int, seed: int, group: Group) -> list[Fold]:
    """``cv.inner``: ``k`` grouped, stratified folds of ``fold``'s training part (its training
    and validation slides), each patient (or site) validating once; the test slides stay out.

    Grouped like the validation split (:func:`validation_group`, with a validation share of
    ``1 / k``); a training part with fewer patients, or a class with fewer slides, than ``k``
    gets as many folds as it allows (at least 2).

    Returns:
        Folds whose ``train`` and ``val`` are the inner parts, ``test`` the outer fold's.

    Raises:
        LeakageError: never, unless the splitter breaks (each fold is checked).
    """
    rows = np.sort(np.concatenate([fold.train, fold.val]))
    by = validation_group(rows, labels, 1 / k, group)
    n_splits = k
    if by == "patient":  # a tiny training part: fewer inner folds, not a failure
        largest = np.unique(strata(labels)[rows], return_counts=True)[1].max()
        n_patients = len(set(np.asarray(labels.patient_ids)[rows].tolist()))
        n_splits = max(2, min(k, n_patients, int(largest)))
    splits = _grouped_split(rows, labels, n_splits, seed, by, "inner validation folds")
    out = [Fold(fold.index, np.sort(a), np.sort(b), fold.test, fold.group, by) for a, b in splits]
    for f in out:
        check_folds([Fold(-1, f.train, f.val, f.test, f.group, by)], labels)
    return out


@dataclass
class _Selection:
    """What validation chose: the monitor's tracker, each part's (``cv.select per_task``)."""

    best: BestState
    trackers: dict[str, BestState]
    parts: dict[str, SelectionPart] | None


def _fit(
    train: np.ndarray,
    val: np.ndarray,
    fresh: Callable[[np.ndarray], MILModule],
    loader: Callable[[np.ndarray, bool], Any],
    cv: CVOptions,
    trainer_kwargs: dict[str, Any],
    inner: bool = False,
) -> tuple[MILModule, pl.Trainer, _Selection]:
    """Train a fresh module on ``train``, validating on ``val`` every epoch.

    Args:
        inner: an inner fold of ``cv.inner``: every epoch runs (the curves are averaged epoch
            by epoch), and ``val/genes_rank`` may be missing (its fold's 0-2 tumour slides:
            it is ranked on the folds' pooled slides). False: stop early once the monitor
            (every part's, with ``cv.select per_task``) has gone ``cv.patience`` epochs without
            improving.

    Returns:
        The module (its last epoch's weights), its trainer, and the trackers of the epochs.
    """
    from pytorch_lightning.callbacks import EarlyStopping

    module = fresh(train)
    monitor = selection_monitor(module, cv)
    parts = selection_parts(module, cv.genes_metric) if cv.select == "per_task" else None
    # weights are kept only where they are used: the best epoch's of one validation split
    best = BestState(monitor, cv.smooth, inner, keep_weights=parts is None and not inner)
    trackers = (
        {}
        if parts is None
        else {n: BestState(p.monitor, cv.smooth, inner, not inner) for n, p in parts.items()}
    )
    stop = not inner
    stopping: list[pl.Callback] = []
    if stop and parts is None and isinstance(monitor, str):
        stopping = [EarlyStopping(monitor=monitor, mode="min", patience=cv.patience)]
    elif stop and parts is None:
        stopping = [_StopWhenAllStall([best], cv.patience)]
    elif stop:
        stopping = [_StopWhenAllStall(list(trackers.values()), cv.patience)]
    kwargs = dict(trainer_kwargs)
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), best, *trackers.values(), *stopping]
    with quiet_lightning():
        trainer = pl.Trainer(**kwargs)
        trainer.fit(module, loader(train, True), loader(val, False))
    if not best.history:
        raise RuntimeError(
            "no validation epoch ran; check --trainer.max_epochs and --trainer.limit_val_batches"
        )
    return module, trainer, _Selection(best, trackers, parts)


@dataclass(frozen=True)
class SelectionPart:
    """A part of the slide model whose epoch its own validation losses choose.

    Attributes:
        monitor: ``{val/<term>: loss weight}``, summed.
        prefix: the part's parameter names start with it; None: every parameter no other
            part claims.
    """

    monitor: dict[str, float]
    prefix: str | None


def selection_parts(
    module: MILModule, genes_metric: str = "loss"
) -> dict[str, SelectionPart] | None:
    """The parts ``cv.select per_task`` chooses an epoch for, or None where the model has
    only one.

    With top-share tumour pooling the tumour logit and map come from their own scorer
    (``model.tumour_path``), trained by the tumour and known-negative losses; the gene and
    categorical heads (and the second scorer whose tumour fraction the genes read) are the
    rest. Validation of 2-3 patients can hold a slide the tumour scorer gets wrong from the
    start, whose loss then only rises; summed, it stops the gene heads after an epoch or two
    while their own loss keeps falling (RESULTS.md, "One thread, one validation slide").
    When the genes read the tumour scorer itself (``tumour_fraction_genes`` without tile
    context) the parts are not separable, and None is returned. With ``genes_metric``
    ``rank`` the genes' part is chosen on ``val/genes_rank`` instead of their losses.
    """
    model = module.model
    if getattr(model, "tumour_path", None) is None:
        return None
    if getattr(model, "fraction", None) is not None and model.fraction_scorer is None:
        return None
    w = module.loss_options
    rest = {f"val/{t}": float(getattr(w, t)) for t in ("log2fc", "classes", "categorical")}
    rest = {k: v for k, v in rest.items() if v > 0}
    if not (model.head.n_genes or model.head.n_classes) or not rest:
        return None
    if genes_metric != "loss" and module.genes:
        rest = _rank_genes(rest, module)
    tumour = {"val/tumour": float(w.tumour), "val/negatives": float(w.negatives)}
    return {
        "tumour": SelectionPart({k: v for k, v in tumour.items() if v > 0}, "model.tumour_path."),
        "genes": SelectionPart(rest, None),
    }


def _merge_parts(
    parts: dict[str, SelectionPart], states: dict[str, dict[str, torch.Tensor] | None]
) -> dict[str, torch.Tensor]:
    """One state dict: each prefixed part's parameters from its own state, the rest from the
    part without a prefix."""
    rest = next(n for n, p in parts.items() if p.prefix is None)
    merged = dict(states[rest] or {})
    for name, part in parts.items():
        if part.prefix is not None and states[name] is not None:
            merged.update({k: v for k, v in states[name].items() if k.startswith(part.prefix)})
    return merged


class _StopWhenAllStall(pl.Callback):
    """Early stopping for ``cv.select per_task``: stop once every part has gone
    ``patience`` validation epochs without improving."""

    def __init__(self, trackers: list[BestState], patience: int) -> None:
        self.trackers, self.patience = trackers, patience

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if all(t.history and t.stalled(self.patience) for t in self.trackers):
            trainer.should_stop = True


class _Snapshots(pl.Callback):
    """The module's weights at the end of the given training epochs (0-based)."""

    def __init__(self, epochs: set[int]) -> None:
        self.epochs = epochs
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch in self.epochs:
            self.states[trainer.current_epoch] = _weights_copy(pl_module)


def _retrain(
    fold: Fold,
    fresh: Callable[[np.ndarray], MILModule],
    loader: Callable[[np.ndarray, bool], Any],
    epochs: dict[str, int],
    parts: dict[str, SelectionPart] | None,
    trainer_kwargs: dict[str, Any],
) -> tuple[MILModule, pl.Trainer]:
    """A fresh module trained on the fold's training *and* validation slides for the number
    of epochs validation chose (``cv.retrain``); the test slides stay untouched. With
    ``parts`` (``cv.select per_task``) it trains for the most any part chose and takes each
    part's weights at the end of its own epoch.

    With ~30 patients, a fifth of each training part set aside to choose the epoch is a
    fifth less to learn from: on the 30-patient hard demo cohort a linear top-share tumour
    scorer trained on all of a fold's training patients ranks held-out slides at AUC 0.62
    against 0.53 when 20 % of them only choose the epoch (seeds 0–2, ``benchmarks/RESULTS.md``).
    """
    rows = np.sort(np.concatenate([fold.train, fold.val]))
    module = fresh(rows)
    kwargs = dict(trainer_kwargs)
    kwargs["max_epochs"] = max(epochs.values()) + 1
    kwargs.pop("max_steps", None)
    kwargs["limit_val_batches"] = 0
    snapshots = _Snapshots(set(epochs.values())) if parts is not None else None
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), *([snapshots] if snapshots else [])]
    with quiet_lightning(), warnings.catch_warnings():
        # no validation loop here on purpose: the epoch count is already chosen
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`")
        trainer = pl.Trainer(**kwargs)
        trainer.fit(module, loader(rows, True))
    if parts is not None and snapshots is not None:
        states = {name: snapshots.states.get(epochs[name]) for name in parts}
        module.load_state_dict(_merge_parts(parts, states))
    return module, trainer


def predict(module: MILModule, loader: Any, trainer: pl.Trainer | None = None) -> dict[str, Any]:
    """Predict every bag of ``loader`` with ``module`` in eval mode, on the module's device.

    Not ``Trainer.predict``: under a distributed strategy that would give each process a
    shard of the test fold; here every process predicts all of it (rank 0 writes the outputs).
    With ``trainer``, its precision (autocast, bf16 weights) applies.

    Returns:
        :meth:`MILModule.predict_step` outputs of all batches, stacked.
    """
    plugin = trainer.strategy.precision_plugin if trainer is not None else None
    module.eval()
    parts = []
    with torch.inference_mode(), plugin.predict_step_context() if plugin else nullcontext():
        for batch in loader:
            batch = batch.to(module.device)
            if plugin is not None:
                batch = plugin.convert_input(batch)
            parts.append(module.predict_step(batch))
    return stack_predictions(parts)


def predictions_frame(labels: Labels, results: list[FoldResult], tumour: bool) -> pd.DataFrame:
    """One row per test slide: ids, fold, then predictions and truth of each task.

    Columns (what ``predictions.csv`` holds): ``slide_id``, ``patient_id``, ``sample_id``,
    ``site`` (tissue source site, ``""`` when unknown), ``fold``, ``tumour_prob``,
    ``tumour_true``, and per gene ``<GENE>_log2fc_pred``, ``<GENE>_log2fc_true``,
    ``<GENE>_up_prob``, ``<GENE>_class_true`` (up / down / unchanged, empty without target),
    and per categorical task ``<task>_prob_<class>`` for each class and ``<task>_true`` (the
    class, empty without).
    """
    names = labels.class_names()
    category_names = {task: labels.category_names(task) for task in labels.categories}
    where = {s: i for i, s in enumerate(labels.slide_ids)}
    rows = []
    for result in results:
        pred = result.predictions
        for i, sid in enumerate(pred.get("slide_ids", [])):
            r = where[sid]
            row: dict[str, Any] = {
                "slide_id": sid,
                "patient_id": labels.patient_ids[r],
                "sample_id": labels.sample_ids[r],
                "site": labels.sites[r],
                "fold": result.fold.index,
            }
            if tumour:
                row["tumour_prob"] = float(pred["tumour_prob"][i])
                row["tumour_true"] = labels.tumour[r]
            for j, gene in enumerate(labels.genes):
                row[f"{gene}_log2fc_pred"] = float(pred["log2fc"][i, j])
                row[f"{gene}_log2fc_true"] = labels.log2fc[r, j]
                row[f"{gene}_up_prob"] = float(pred["up_prob"][i, j])
                row[f"{gene}_class_true"] = names[r, j]
            for task, classes in labels.categories.items():
                probs = pred[f"prob:{task}"][i]
                for c, name in enumerate(classes):
                    row[f"{task}_prob_{name}"] = float(probs[c])
                row[f"{task}_true"] = category_names[task][r]
            rows.append(row)
    frame = pd.DataFrame(rows)
    if len(frame):
        frame = frame.sort_values(["fold", "slide_id"]).reset_index(drop=True)
    return frame


@dataclass
class CVResult:
    """Outer cross-validation results.

    Attributes:
        folds: one :class:`FoldResult` per fold.
        predictions: out-of-fold test predictions (:func:`predictions_frame`).
    """

    folds: list[FoldResult]
    predictions: pd.DataFrame


def run_cv(
    labels: Labels,
    bags: FeatureBags,
    make_module: Callable[[], MILModule],
    data: DataOptions,
    cv: CVOptions,
    trainer_kwargs: dict[str, Any] | Callable[[], dict[str, Any]],
    tumour: bool = True,
) -> CVResult:
    """Patient- or site-grouped k-fold cross-validation (see the module docstring).

    Args:
        labels: the cohort (slides with features and labels).
        bags: their features.
        make_module: builds a fresh, untrained module.
        data: batch and bag options.
        cv: folds, grouping, validation share, seed, monitor, patience.
        trainer_kwargs: ``pl.Trainer`` keyword arguments, or a function making fresh ones
            for each fold (so that callbacks and loggers are not shared between folds).
        tumour: whether the tumour task is trained (for the prediction columns).
    """
    folds = make_folds(labels, cv.folds, cv.val_fraction, cv.seed, cv.group)
    bags.preload(labels.slide_ids)
    results = []
    for fold in folds:
        kwargs = trainer_kwargs() if callable(trainer_kwargs) else copy.copy(trainer_kwargs)
        result = train_fold(fold, labels, bags, make_module, data, cv, kwargs)
        log.info(
            "fold %d/%d: %d train / %s / %d test slides; best epoch %d (%s %.4f)",
            fold.index + 1,
            len(folds),
            len(fold.train) if result.inner is None else len(fold.train) + len(fold.val),
            f"{len(fold.val)} val" if result.inner is None else f"{len(result.inner)} inner folds",
            len(fold.test),
            result.best_epoch,
            _monitor_name(result.monitor) if result.part_epochs is None else "genes' val",
            result.best_score,
        )
        if result.part_epochs:
            log.info(
                "fold %d: epoch of each part (cv.select per_task): %s",
                fold.index + 1,
                result.part_epochs,
            )
        results.append(result)
    return CVResult(results, predictions_frame(labels, results, tumour))


def _monitor_name(monitor: str | dict[str, float]) -> str:
    """``val/loss`` or ``0.5 val/tumour + 1 val/genes_rank + …`` for the log."""
    if isinstance(monitor, str):
        return monitor
    return " + ".join(f"{w:g} {k}" for k, w in monitor.items())


def refit(
    labels: Labels,
    bags: FeatureBags,
    make_module: Callable[[], MILModule],
    data: DataOptions,
    cv: CVOptions,
    trainer_kwargs: dict[str, Any],
) -> FoldResult:
    """Train one model on every patient; a validation split (``val_fraction``, grouped as in
    :func:`validation_split`) chooses its epoch. Its honest performance is the
    cross-validation estimate."""
    rows = np.arange(len(labels))
    if cv.group == "site":
        check_sites(labels)
    train, val = validation_split(rows, labels, cv.val_fraction, cv.seed, cv.group)
    by = validation_group(rows, labels, cv.val_fraction, cv.group)
    fold = Fold(-1, np.sort(train), np.sort(val), np.zeros(0, dtype=np.int64), cv.group, by)
    check_folds([fold], labels)
    return train_fold(fold, labels, bags, make_module, data, cv, trainer_kwargs)


__all__ = [
    "BestState",
    "CVResult",
    "Fold",
    "FoldResult",
    "Group",
    "LeakageError",
    "check_folds",
    "check_sites",
    "inner_folds",
    "make_folds",
    "predict",
    "predictions_frame",
    "quiet_lightning",
    "refit",
    "run_cv",
    "strata",
    "train_fold",
    "validation_group",
    "validation_split",
]
