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


# -- site-grouped folds (--cv.group site) ------------------------------------------------------


def _site_labels(n_sites: int = 12, per_site: int = 3, seed: int = 0) -> Labels:
    """TCGA-style slides: ``per_site`` patients in each of ``n_sites`` sites, every patient a
    tumour slide and every second one a normal slide; sites read from the barcodes."""
    from histcode.finetune.labels import table_from_slide_ids

    rng = np.random.default_rng(seed)
    slides = []
    for s in range(n_sites):
        for p in range(per_site):
            patient = f"TCGA-{chr(65 + s)}{s % 10}-{s * 100 + p:04d}"
            slides.append(f"{patient}-01A-01-TS1")
            if p % 2 == 0 or rng.random() < 0.3:
                slides.append(f"{patient}-11A-01-TS1")
    table = table_from_slide_ids(slides)
    n = len(slides)
    return Labels(
        slides,
        table["patient_id"].tolist(),
        slides,
        table["tumour"].to_numpy(),
        ["G"],
        rng.normal(size=(n, 1)),
        sites=table["site"].tolist(),
    )


def test_site_groups_keep_each_site_in_one_test_fold() -> None:
    labels = _site_labels(n_sites=12)
    assert labels.sites[0] == labels.slide_ids[0][5:7]  # barcode characters 6-7
    folds = make_folds(labels, folds=3, val_fraction=0.2, seed=1, group="site")
    site = np.asarray(labels.sites)
    pid = np.asarray(labels.patient_ids)
    tested_sites: list[str] = []
    for fold in folds:
        assert fold.group == "site"
        train, val, test = (set(site[getattr(fold, k)]) for k in ("train", "val", "test"))
        assert not test & train and not test & val  # a fold's test sites are unseen
        assert fold.val_group == "site" and not train & val  # 8 training sites: enough
        tested_sites += sorted(test)
        ptrain, pval, ptest = (set(pid[getattr(fold, k)]) for k in ("train", "val", "test"))
        assert not ptrain & pval and not ptrain & ptest and not pval & ptest
    assert sorted(tested_sites) == sorted(set(labels.sites))  # every site in exactly one
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested.tolist()) == list(range(len(labels)))
    # patient grouping (the default) does spread sites over test folds
    by_patient = make_folds(labels, folds=3, val_fraction=0.2, seed=1)
    assert sum(len(set(site[f.test])) for f in by_patient) > len(set(labels.sites))


def test_site_grouped_validation_falls_back_to_patients() -> None:
    labels = _site_labels(n_sites=4, per_site=4)
    folds = make_folds(labels, folds=2, val_fraction=0.2, seed=0, group="site")
    site = np.asarray(labels.sites)
    for fold in folds:  # 2 training sites < round(1 / 0.2): validation by patient
        assert fold.val_group == "patient"
        assert not set(site[fold.test]) & set(site[np.concatenate([fold.train, fold.val])])


def test_site_grouping_refuses_too_few_sites() -> None:
    labels = _site_labels(n_sites=3, per_site=4)
    with pytest.raises(ValueError, match=r"5 folds need at least 5 sites; the cohort has 3") as e:
        make_folds(labels, folds=5, group="site")
    assert "--cv.folds 3" in str(e.value) and "--cv.group patient" in str(e.value)
    make_folds(labels, folds=5)  # 12 patients: patient grouping still works


def test_site_grouping_needs_known_sites() -> None:
    labels = _labels(12)  # plain ids, no site column: no site known
    with pytest.raises(ValueError, match=r"'site' column to the labels CSV.*--cv\.group patient"):
        make_folds(labels, folds=3, group="site")
    mixed = _site_labels(n_sites=4, per_site=3)
    mixed.sites[1] = "ZZ"  # the second slide of a patient at another site
    with pytest.raises(ValueError, match="more than one site"):
        make_folds(mixed, folds=3, group="site")


def test_check_folds_catches_site_leaks() -> None:
    labels = _site_labels(n_sites=6)
    folds = make_folds(labels, folds=3, seed=0, group="site")
    leaky = folds[0]
    pid = np.asarray(labels.patient_ids)
    moved = leaky.test[pid[leaky.test] == pid[leaky.test[0]]]  # one test patient, all slides
    leaky.test = np.setdiff1d(leaky.test, moved)
    leaky.train = np.sort(np.concatenate([leaky.train, moved]))  # its site now in train too
    with pytest.raises(LeakageError, match="sites in both train and test"):
        check_folds(folds, labels)


def _one_slide_each(tumour: list[float]) -> Labels:
    ids = [f"p{i}" for i in range(len(tumour))]
    return Labels(ids, ids, ids, np.array(tumour))


def test_cohort_too_small_for_the_folds_names_counts_and_fix() -> None:
    """Not scikit-learn's ``n_splits=… cannot be greater than …``: the counts and --cv.folds."""
    labels = _one_slide_each([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # 3 patients of each class
    with pytest.raises(ValueError) as err:
        make_folds(labels, folds=5, val_fraction=0.2, seed=0)
    message = str(err.value)
    assert "n_splits" not in message
    assert "too small for 5 stratified patient-grouped folds" in message
    assert "tumour: 3 slide(s) of 3 patient(s)" in message
    assert "normal: 3 slide(s) of 3 patient(s)" in message
    assert "--cv.folds 3 or fewer" in message
    assert len(make_folds(labels, folds=3, val_fraction=0.2, seed=0)) == 3  # the fix works


def test_small_training_part_gets_a_larger_validation_share() -> None:
    """5 training patients (3 tumour, 2 normal) cannot be split 5 ways by class: 3 ways is."""
    labels = _one_slide_each([1.0, 1.0, 1.0, 0.0, 0.0])
    train, val = validation_split(np.arange(5), labels, 0.2, seed=0)
    assert len(train) + len(val) == 5 and len(val) >= 1 and len(train) >= 3


def test_labels_module_split_keeps_old_imports() -> None:
    """labels.py became genes / tables / expression / foldchange; the old imports still work."""
    from histcode.finetune import foldchange, genes, labels, tables

    assert labels.read_label_table is tables.read_label_table
    assert labels.resolve_genes is genes.resolve_genes
    assert labels.match_slides is foldchange.match_slides
    assert labels.expression_log2fc is foldchange.expression_log2fc
    assert labels.classify is foldchange.classify
    assert labels.CLASS_NAMES == foldchange.CLASS_NAMES == {-1: "down", 0: "unchanged", 1: "up"}
