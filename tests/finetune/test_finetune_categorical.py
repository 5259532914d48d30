"""Categorical tasks (``--data.classes subtype``): labels, head, folds, metrics and maps."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from histcode.finetune.cv import make_folds
from histcode.finetune.heads import build_slide_model
from histcode.finetune.labels import Labels, build_labels, categorical_targets
from histcode.finetune.maps import compute_maps
from histcode.finetune.options import (
    TRAINER_DEFAULTS,
    CVOptions,
    DataOptions,
    ModelOptions,
    OptimOptions,
)
from histcode.finetune.pipeline import FinetuneRun, run_finetune
from histcode.finetune.tables import read_label_table
from tests.finetune.finetune_cohort import SignalCohort, write_signal_cohort


def test_categorical_column_is_read_and_coded(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(
        "slide_id,patient_id,tumour,Subtype\n"
        "a,p1,1,LumA\nb,p2,1,Basal\nc,p3,0,\nd,p4,1,NA\ne,p5,1,LumA\n"
    )
    table = read_label_table(path, ["subtype"])
    assert table["subtype"].tolist() == ["LumA", "Basal", "", "", "LumA"]
    labels = build_labels(table, with_genes=False, classes=["subtype"])
    assert labels.categories == {"subtype": ["Basal", "LumA"]}
    assert labels.category_codes[:, 0].tolist() == [1, 0, -1, -1, 1]
    assert labels.category_names("subtype").tolist() == ["LumA", "Basal", "", "", "LumA"]
    sub = labels.subset([4, 1])
    assert sub.category_codes[:, 0].tolist() == [1, 0] and sub.categories == labels.categories
    assert labels.to_frame()["subtype"].tolist() == ["LumA", "Basal", "", "", "LumA"]


def test_bad_categorical_columns_are_named(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,patient_id,subtype\na,p1,X\nb,p2,X\n")
    with pytest.raises(ValueError, match=r"labels\.csv has no column 'msi'.*subtype"):
        read_label_table(path, ["msi"])
    table = read_label_table(path, ["subtype"])
    with pytest.raises(ValueError, match=r"'subtype' has 1 class\(es\) \(X\)"):
        categorical_targets(table, ["subtype"])
    with pytest.raises(ValueError, match="tumour status, ids or gene targets"):
        categorical_targets(table, ["tumour"])


def test_class_with_too_few_patients_for_the_folds_names_counts() -> None:
    ids = [f"p{i}" for i in range(12)]
    codes = np.array([[0]] * 6 + [[1]] * 4 + [[2]] * 2)
    labels = Labels(
        ids, ids, ids, np.ones(12), categories={"subtype": ["A", "B", "C"]}, category_codes=codes
    )
    with pytest.raises(ValueError) as err:
        make_folds(labels, folds=3)
    message = str(err.value)
    assert "categorical task 'subtype': class(es) 'C'" in message
    assert "A: 6 patient(s), 6 slide(s), B: 4 patient(s)" in message
    assert "--cv.folds 2 or fewer" in message
    assert len(make_folds(labels, folds=2)) == 2


@pytest.mark.parametrize(
    ("aggregator", "options"),
    [("abmil", {"branches": "per_task"}), ("abmil", {"branches": "shared"}), ("mean", {})],
)
def test_class_maps_add_up_to_the_class_logits(aggregator: str, options: dict) -> None:
    torch.manual_seed(0)
    model = build_slide_model(aggregator, 8, 16, 0.0, True, 2, options, n_classes=[3]).eval()
    card = SimpleNamespace(extra={"genes": ["MYC", "CD8A"], "classes": {"subtype": list("ABC")}})
    maps, prediction, _, kind = compute_maps(model, card, np.random.randn(7, 8))
    assert kind == "exact"
    for name in ("subtype_A", "subtype_B", "subtype_C"):
        assert maps[name].shape == (7,)
    assert ("subtype_attention" in maps) == (options.get("branches") == "per_task")
    probs = [prediction[f"subtype_prob_{c}"] for c in "ABC"]
    assert np.isclose(sum(probs), 1.0)
    logits = np.array([maps[f"subtype_{c}"].sum() for c in "ABC"])
    logits += model.head.linear.bias.detach().numpy()[-3:]
    assert np.allclose(np.exp(logits) / np.exp(logits).sum(), probs, atol=1e-5)


def _run(cohort: SignalCohort, labels: Path, out: Path) -> FinetuneRun:
    return run_finetune(
        cohort.features,
        "subtype-abmil",
        labels=labels,
        out=out,
        data=DataOptions(tasks=["tumour"], classes=["subtype"], batch_size=4, max_tiles=None),
        model=ModelOptions(aggregator="abmil", hidden=32, dropout=0.1),
        optim=OptimOptions(lr=1e-3),
        cv=CVOptions(folds=3, patience=8, register="folds"),
        trainer={**TRAINER_DEFAULTS, "max_epochs": 25, "accelerator": "cpu"},
        registry=out / "registry",
    )


@pytest.mark.slow
def test_subtype_is_learned_and_a_shuffled_subtype_is_chance(tmp_path: Path) -> None:
    """A subtype that moves the tumour tiles along its own direction: held-out macro AUC is
    high; the same labels shuffled across patients give chance."""
    cohort = write_signal_cohort(tmp_path / "cohort", n_patients=30, subtypes=3, seed=1)
    run = _run(cohort, cohort.labels, tmp_path / "run")
    m = run.metrics["categories"]["subtype"]
    assert m["classes"] == ["A", "B", "C"]
    assert m["macro_auc"]["mean"] >= 0.85, m["macro_auc"]
    assert m["macro_auc"]["n"] == 3
    frame = pd.read_csv(run.out / "predictions.csv", keep_default_na=False)
    probs = frame[[f"subtype_prob_{c}" for c in "ABC"]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    truth = frame.set_index("slide_id")["subtype_true"]
    assert all(truth[s] == cohort.subtype.get(s, "") for s in truth.index)
    assert {"tumour_prob", "tumour_true"} <= set(frame.columns)  # the existing contract
    from histcode.registry import Registry

    card = Registry(tmp_path / "run" / "registry").card("subtype-abmil@1")
    assert card.extra["classes"] == {"subtype": ["A", "B", "C"]}
    assert card.arguments["n_classes"] == [3]
    assert "subtype_macro_auc" in card.metrics

    table = pd.read_csv(cohort.labels, keep_default_na=False)
    per_patient = table[table["subtype"] != ""].groupby("patient_id")["subtype"].first()
    shuffled = dict(
        zip(per_patient.index, np.random.default_rng(5).permutation(per_patient), strict=True)
    )
    table["subtype"] = [
        shuffled[p] if s else "" for p, s in zip(table["patient_id"], table["subtype"], strict=True)
    ]
    table.to_csv(tmp_path / "shuffled.csv", index=False)
    null = _run(cohort, tmp_path / "shuffled.csv", tmp_path / "null")
    auc = null.metrics["categories"]["subtype"]["macro_auc"]["mean"]
    assert 0.25 <= auc <= 0.7, auc
