"""Bags with padding and masks; patient-grouped folds without leakage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histcode.finetune.bags import IGNORE_CLASS, BagDataset, FeatureBags, collate_bags
from histcode.finetune.cv import LeakageError, check_folds, make_folds, validation_split
from histcode.finetune.labels import Labels
from tests.finetune.finetune_cohort import SignalCohort


def _labels(n_patients: int = 20, seed: int = 0) -> Labels:
    rng = np.random.default_rng(seed)
    slides, patients, tumour = [], [], []
    for p in range(n_patients):
        for s in range(int(rng.integers(1, 4))):
            slides.append(f"p{p}-s{s}")
            patients.append(f"p{p}")
            tumour.append(float(s == 0 or rng.random() < 0.3))
    n = len(slides)
    return Labels(slides, patients, slides, np.array(tumour), ["G"], rng.normal(size=(n, 1)))


def test_no_patient_crosses_folds() -> None:
    labels = _labels()
    folds = make_folds(labels, folds=5, val_fraction=0.2, seed=3)
    pid = np.asarray(labels.patient_ids)
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested.tolist()) == list(range(len(labels)))  # every slide tested once
    seen: set[str] = set()
    for fold in folds:
        train, val, test = (set(pid[getattr(fold, k)]) for k in ("train", "val", "test"))
        assert not train & val and not train & test and not val & test
        assert val and train and test
        assert not test & seen  # a patient is in one test fold only
        seen |= test
        assert len(fold.train) + len(fold.val) + len(fold.test) == len(labels)
    assert seen == set(pid)


def test_folds_are_stratified_and_reproducible() -> None:
    labels = _labels(30)
    a = make_folds(labels, folds=3, seed=1)
    b = make_folds(labels, folds=3, seed=1)
    assert all(
        (x.test == y.test).all() and (x.val == y.val).all() for x, y in zip(a, b, strict=True)
    )
    for fold in a:
        assert set(labels.tumour[fold.test].tolist()) == {0.0, 1.0}


def test_check_folds_catches_leaks() -> None:
    labels = _labels(6)
    folds = make_folds(labels, folds=2, seed=0)
    leaky = folds[0]
    leaky.val = np.concatenate([leaky.val, leaky.test[:1]])  # a test patient in validation
    with pytest.raises(LeakageError, match="both val and test"):
        check_folds(folds, labels)


def test_too_few_patients() -> None:
    labels = _labels(4)
    with pytest.raises(ValueError, match=r"--cv\.folds"):
        make_folds(labels, folds=5)
    with pytest.raises(ValueError, match="val_fraction"):
        validation_split(np.arange(len(labels)), labels, 0.9, 0)


def test_collate_pads_and_masks(small_signal_cohort: SignalCohort) -> None:
    labels = _labels(3)
    slides = small_signal_cohort.slides[: len(labels)]
    labels = Labels(slides, labels.patient_ids, slides, labels.tumour, ["G"], labels.log2fc)
    labels.log2fc[0] = np.nan
    bags = FeatureBags(small_signal_cohort.features)
    items = [BagDataset(bags, labels)[i] for i in range(3)]
    batch = collate_bags(items)
    lengths = [len(i.features) for i in items]
    assert batch.features.shape == (3, max(lengths), 16)
    assert batch.mask.sum(1).tolist() == lengths
    assert (batch.features[~batch.mask] == 0).all()
    assert batch.classes[0, 0] == IGNORE_CLASS and torch.isnan(batch.log2fc[0, 0])
    assert batch.slide_ids == slides[:3]


def test_max_tiles_subsamples_training_only(small_signal_cohort: SignalCohort) -> None:
    sid = small_signal_cohort.slides[0]
    labels = Labels([sid], ["p"], [sid], np.array([1.0]))
    bags = FeatureBags(small_signal_cohort.features)
    full = bags[sid]
    train = BagDataset(bags, labels, max_tiles=5)[0]
    assert train.features.shape == (5, full.shape[1])
    rows = {tuple(r) for r in np.round(full, 5).tolist()}
    assert all(tuple(r) in rows for r in np.round(train.features.numpy(), 5).tolist())
    assert BagDataset(bags, labels)[0].features.shape == full.shape
    with pytest.raises(ValueError, match="max_tiles"):
        BagDataset(bags, labels, max_tiles=0)
