"""``histcode finetune`` end to end through the CLI dispatcher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from histcode import cli
from histcode.finetune.heads import SlideModel, slide_model_builders
from histcode.registry import Registry
from tests.finetune.finetune_cohort import SignalCohort

CONFIGS = Path(__file__).resolve().parents[2] / "histcode" / "configs" / "finetune"


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_listed_in_histcode_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("finetune"))
    assert "attention-MIL" in line


def test_help_and_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["finetune", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--features", "--data.genes", "--model.aggregator", "--trainer.max_epochs"):
        assert option in text
    with pytest.raises(SystemExit) as exit_:
        argv = ["--features", "f.zarr", "--name", "x", "--trainer.max_epochs", "7"]
        cli.main(["finetune", "--config", str(CONFIGS / "deg.yaml"), *argv, "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "aggregator: abmil" in printed and "max_epochs: 7" in printed
    assert "- genes" in printed  # tasks: [tumour, genes]


def test_end_to_end(
    small_signal_cohort: SignalCohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = small_signal_cohort
    out, registry = tmp_path / "run", tmp_path / "registry"
    argv = [
        "finetune",
        "--config", str(CONFIGS / "deg.yaml"),
        "--config", str(CONFIGS / "cpu_smoke.yaml"),
        "--features", str(c.features),
        "--labels", str(c.labels),
        "--expression", str(c.expression),
        "--name", "e2e-deg",
        "--out", str(out),
        "--registry", str(registry),
        "--data.genes", "MYC", "CD8A", "TP53",
        "--cv.folds", "2",
        "--trainer.max_epochs", "2",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["genes_evaluated"] == 3 and result["folds"] == 2
    assert result["registered"] == ["e2e-deg@1"] and result["failed_slides"] == []

    predictions = pd.read_csv(out / "predictions.csv")
    fold_auc = [  # the reported AUC is the mean over the held-out folds, not a pooled one
        roc_auc_score(f["tumour_true"], f["tumour_prob"]) for _, f in predictions.groupby("fold")
    ]
    assert result["tumour_auc"] == pytest.approx(np.mean(fold_auc), abs=1e-6)
    assert len(predictions) == len(c.slides)  # every slide tested once
    for column in ("slide_id", "patient_id", "fold", "tumour_prob", "tumour_true"):
        assert column in predictions
    for suffix in ("log2fc_pred", "log2fc_true", "up_prob", "class_true"):
        assert f"MYC_{suffix}" in predictions
    assert set(predictions["MYC_class_true"].dropna()) <= {"up", "down", "unchanged"}
    by_patient = predictions.groupby("patient_id")["fold"].nunique()
    assert (by_patient == 1).all()  # no patient in two test folds

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tumour"]["auc"]) >= {"mean", "sd", "folds"}
    myc = metrics["genes"]["MYC"]
    assert set(myc["test"]) >= {"pearson_p", "pearson_q", "spearman_q", "pearson_p_folds"}
    assert "pearson_p" not in myc["pooled"]  # pooled figures are descriptive, never tested
    assert metrics["fdr"]["genes_tested"] == 3 and "Stouffer" in metrics["fdr"]["label"]
    assert {p.name for p in (out / "plots").iterdir()} == {
        "tumour_roc.png",
        "genes_auc_up.png",
        "genes_pearson_r.png",
        "log2fc_scatter.png",
    }
    assert (out / "targets.csv").is_file() and (out / "folds.json").is_file()
    config = (out / "config.yaml").read_text()
    assert "max_epochs: 2" in config and "hidden: 64" in config  # smoke override applied
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["result"] == result

    model, card = Registry(registry).load("e2e-deg@1", builders=slide_model_builders())
    assert isinstance(model, SlideModel) and card.architecture == "abmil"
    assert card.parents[0] == "test-encoder@1#sha256=" + "ab" * 32
    assert (
        card.parents[1].startswith("features:") and "tiles_fingerprint=fp-test" in card.parents[1]
    )
    assert card.extra["genes"] == ["MYC", "CD8A", "TP53"] and card.extra["fold"] == "refit"
    assert card.metrics["tumour_auc"]["mean"] == pytest.approx(result["tumour_auc"])
    assert card.metrics["significance_test"] == metrics["fdr"]["label"]


def test_site_grouped_known_signal_end_to_end(
    small_signal_cohort: SignalCohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--cv.group site: each tissue source site (barcode characters 6-7: S1, S2, S3) is in one
    test fold, recorded in folds.json, metrics.json, config.yaml and the registry cards; the
    within-site AUC is reported and every site's predictions come from one fold model."""
    c = small_signal_cohort
    out, registry = tmp_path / "run", tmp_path / "registry"
    argv = [
        "finetune",
        "--config", str(CONFIGS / "tumour.yaml"),
        "--config", str(CONFIGS / "cpu_smoke.yaml"),
        "--features", str(c.features),
        "--name", "by-site",
        "--out", str(out),
        "--registry", str(registry),
        "--model.aggregator", "mean",
        "--cv.group", "site",
        "--cv.register", "folds",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["cv_group"] == "site" and result["folds"] == 3
    assert result["tumour_auc"] >= 0.8  # the known signal, on sites the models never saw
    assert result["within_site_sites"] == 3 and result["tumour_auc_within_site"] >= 0.8

    folds = json.loads((out / "folds.json").read_text())
    tested = [fold["sites"]["test"] for fold in folds]
    assert sorted(s for t in tested for s in t) == ["S1", "S2", "S3"]  # each site once
    for fold in folds:
        assert fold["group"] == "site" and fold["val_group"] == "patient"  # 2 training sites
        assert not set(fold["sites"]["test"]) & set(fold["sites"]["train"] + fold["sites"]["val"])
    predictions = pd.read_csv(out / "predictions.csv")
    assert (predictions["site"] == predictions["slide_id"].str[5:7]).all()
    assert (predictions.groupby("site")["fold"].nunique() == 1).all()
    metrics = json.loads((out / "metrics.json").read_text())
    within = metrics["tumour"]["within_site_auc"]
    assert metrics["cv_group"] == "site" and within["auc"] == result["tumour_auc_within_site"]
    assert all(len(v["folds"]) == 1 for v in within["per_site"].values())  # one model a site
    confounding = metrics["tumour"]["site_confounding"]  # each site has tumours and normals
    assert confounding["confounded"] is False and confounding["warning"] is None
    assert "group: site" in (out / "config.yaml").read_text()
    card = Registry(registry).card("by-site@1")
    assert card.metrics["cv_group"] == "site"
    assert card.metrics["tumour_auc_within_site"]["sites"] == 3
    assert card.metrics["site_only_auc"]["confounded"] is False

    assert cli.main([*argv, "--cv.folds", "4", "--out", str(tmp_path / "four")]) == 2
    err = capsys.readouterr().err
    assert "4 folds need at least 4 sites; the cohort has 3" in err and "--cv.folds 3" in err


def test_a_cohort_whose_normals_come_from_one_site_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every normal slide in site NA (its patients' tumour slides too), the other patients'
    tumour slides in TB: the site alone tells tumour from normal (AUC 0.75), so finetune warns
    before training, names the sites and the fix, and metrics.json keeps the warning."""
    from tests.finetune.finetune_cohort import write_signal_cohort

    c = write_signal_cohort(tmp_path / "cohort", n_patients=30, dim=8, tiles=(8, 16))
    labels = pd.read_csv(c.labels)
    has_normal = set(labels.loc[labels["tumour"] == 0, "patient_id"])
    labels["site"] = ["NA" if p in has_normal else "TB" for p in labels["patient_id"]]
    labels.to_csv(tmp_path / "labels.csv", index=False)
    argv = [
        "finetune",
        "--config", str(CONFIGS / "tumour.yaml"),
        "--config", str(CONFIGS / "cpu_smoke.yaml"),
        "--features", str(c.features),
        "--labels", str(tmp_path / "labels.csv"),
        "--name", "one-site-normals",
        "--out", str(tmp_path / "run"),
        "--model.aggregator", "mean",
        "--trainer.max_epochs", "2",
        "--cv.register", "none",
    ]  # fmt: skip
    with caplog.at_level("WARNING", logger="histcode.finetune"):
        assert cli.main(argv) == 0
    err = caplog.text
    assert "tumour labels follow the tissue source site" in err and "AUC 0.75" in err
    assert "NA 15" in err and "TB" in err and "--stain_norm macenko" in err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    found = metrics["tumour"]["site_confounding"]
    assert found["confounded"] is True and found["tumour_only_sites"] == ["TB"]
    assert found["warning"].startswith("tumour labels follow the tissue source site")


def test_missing_features_exit_1_and_bad_arguments_exit_2(
    small_signal_cohort: SignalCohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = small_signal_cohort
    labels = pd.read_csv(c.labels)
    extra = {"slide_id": "TCGA-S1-0999-01A-01-TS1", "patient_id": "TCGA-S1-0999", "tumour": 1}
    labels = pd.concat([labels, pd.DataFrame([extra])])
    labels.to_csv(tmp_path / "labels.csv", index=False)
    base = [
        "finetune",
        "--config", str(CONFIGS / "tumour.yaml"),
        "--config", str(CONFIGS / "cpu_smoke.yaml"),
        "--features", str(c.features),
        "--name", "partial",
        "--out", str(tmp_path / "run"),
        "--cv.folds", "2",
        "--cv.register", "none",
        "--trainer.max_epochs", "1",
    ]  # fmt: skip
    assert cli.main([*base, "--labels", str(tmp_path / "labels.csv")]) == 1
    result = _last_json(capsys.readouterr().out)
    assert result["failed_slides"] == ["TCGA-S1-0999-01A-01-TS1"] and result["registered"] == []

    assert cli.main([*base, "--model.aggregator", "attention"]) == 2
    assert "unknown aggregator 'attention'" in capsys.readouterr().err
    assert cli.main([*base[:6], str(tmp_path / "nope.zarr"), *base[7:]]) == 2
    assert "not a histcode.features store" in capsys.readouterr().err
    assert cli.main([*base, "--labels", str(tmp_path / "absent.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main([*base, "--cv.monitor", "val/log2fc"]) == 2  # no gene task: never logged
    assert "'val/log2fc' was not logged" in capsys.readouterr().err


def test_imports_stay_light_and_never_touch_pretrain() -> None:
    import subprocess
    import sys

    code = (
        "import sys, histcode.finetune.command as c; assert 'torch' not in sys.modules, 'torch';"
        "import histcode.finetune.pipeline, histcode.finetune.plots, histcode.finetune.cv;"
        "assert not [m for m in sys.modules if m.startswith('histcode.pretrain')], 'pretrain'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
