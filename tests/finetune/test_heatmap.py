"""histcode heatmap: maps, montage, GeoJSON and CSV of a registered slide model over a slide."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from histcode.cli import main as cli_main
from histcode.embedding import embed_store
from histcode.featurestore import FeatureStore
from histcode.finetune.heads import build_slide_model, slide_model_builders
from histcode.finetune.heatmap import compute_maps
from histcode.finetune.pipeline import lineage
from histcode.registry import Card, Registry

SLIDE = "TCGA-S1-0001-01A-01-TS1"
GENES = ["MYC", "CD8A"]


@pytest.fixture(scope="module")
def registered(small_cohort, tmp_path_factory) -> dict[str, Path]:
    """Features of the small cohort (tiny random encoder) and an abmil model registered on them."""
    root = tmp_path_factory.mktemp("heatmap")
    features = root / "features.zarr"
    embed_store(small_cohort["tiles"], features, "tiny", workers=0, progress=False)
    torch.manual_seed(0)
    model = build_slide_model("abmil", in_dim=32, hidden=16, n_genes=len(GENES))
    arguments = {
        "in_dim": 32,
        "hidden": 16,
        "dropout": 0.25,
        "tumour": True,
        "n_genes": len(GENES),
        "options": {},
    }
    card = Card(
        kind="mil",
        architecture="abmil",
        arguments=arguments,
        parents=lineage(FeatureStore(features)),
        extra={"genes": GENES},
    )
    Registry(root / "registry").save("hm-test", model, card)
    return {"features": features, "registry": root / "registry", "slides": small_cohort["slides"]}


def test_heatmap_writes_maps_geojson_and_csv(registered, tmp_path: Path, capsys) -> None:
    out = tmp_path / "maps"
    code = cli_main(
        [
            "heatmap",
            "--model",
            "hm-test@1",
            "--features",
            str(registered["features"]),
            "--slide",
            str(registered["slides"] / f"{SLIDE}.svs"),
            "--out",
            str(out),
            "--registry",
            str(registered["registry"]),
            "--top_k",
            "4",
        ]
    )
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n = FeatureStore(registered["features"]).read(SLIDE).features.shape[0]
    assert line["tiles"] == n and line["model"] == "hm-test@1"
    for name in ("attention", "tumour", "MYC_log2fc", "CD8A_log2fc", "montage_attention"):
        assert (out / f"{SLIDE}_{name}.png").stat().st_size > 10_000, name
    geo = json.loads((out / f"{SLIDE}.geojson").read_text())
    assert len(geo["features"]) == n and geo["properties"]["model"] == "hm-test@1"
    measurements = geo["features"][0]["properties"]["measurements"]
    assert {"attention", "tumour", "MYC_log2fc", "MYC_up", "CD8A_log2fc"} <= set(measurements)
    with open(out / f"{SLIDE}_tile_scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and float(rows[0]["attention"]) > 0
    assert (out / "summary.json").is_file()


def test_tile_contributions_add_up_to_the_slide_prediction(registered) -> None:
    model, card = Registry(registered["registry"]).load(
        "hm-test",
        builders=slide_model_builders(),
    )
    feats = FeatureStore(registered["features"]).read(SLIDE).features
    maps, prediction, main = compute_maps(model.eval(), card, feats)
    assert main == "attention" and np.isclose(maps["attention"].sum(), 1.0, atol=1e-5)
    bias = model.head.linear.bias.detach().numpy()
    logit = float(np.log(prediction["tumour_prob"] / (1 - prediction["tumour_prob"])))
    assert maps["tumour"].sum() + bias[0] == pytest.approx(logit, abs=1e-4)


def test_features_of_another_encoder_are_refused(registered, small_cohort, tmp_path, capsys):
    other = tmp_path / "other.zarr"
    embed_store(small_cohort["tiles"], other, "tiny", seed=1, workers=0, progress=False)
    code = cli_main(
        [
            "heatmap",
            "--model",
            "hm-test@1",
            "--features",
            str(other),
            "--slide",
            SLIDE,
            "--out",
            str(tmp_path / "m"),
            "--registry",
            str(registered["registry"]),
        ]
    )
    assert code == 2
    assert "trained on features of another encoder" in capsys.readouterr().err


@pytest.mark.slow
def test_maps_find_tumour_and_lymphocytes_on_held_out_slides(tmp_path: Path) -> None:
    """Guard (issue 7): on slides their model never saw, attention finds the true tumour and
    the lymphocyte genes' maps find the true lymphocytes, at the issue's goal (0.85) — run at
    the demo's settings (20 patients, 1,000 SimCLR steps)."""
    root = Path(__file__).parents[2]
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.heatmap_localisation", "--work", str(tmp_path),
            "--patients", "20", "--steps", "1000", "--epochs", "100",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # measured at these settings: attention 0.93, lymphocyte genes 0.98; before the features
    # were standardised and each task had its own attention: 0.85 and 0.75
    assert result["attention_vs_tumour_mask"] >= 0.85, result
    assert result["lymphocyte_genes_vs_lymphocyte_mask"] >= 0.85, result


def test_per_task_attention_maps(registered) -> None:
    """A per-task abmil model: ``attention`` is the tumour task's, each gene has its own."""
    from histcode.finetune.heads import build_slide_model

    torch.manual_seed(0)
    model = build_slide_model(
        "abmil", in_dim=32, hidden=16, n_genes=len(GENES), options={"branches": "per_task"}
    ).eval()
    card = Card(kind="mil", architecture="abmil", arguments={}, extra={"genes": GENES})
    feats = FeatureStore(registered["features"]).read(SLIDE).features
    maps, prediction, main = compute_maps(model, card, feats)
    assert main == "attention"
    for name in ("attention", "MYC_attention", "CD8A_attention"):
        assert maps[name].shape == (len(feats),)
        assert np.isclose(maps[name].sum(), 1.0, atol=1e-5), name
    assert not np.allclose(maps["attention"], maps["MYC_attention"])
    logit = float(np.log(prediction["tumour_prob"] / (1 - prediction["tumour_prob"])))
    assert maps["tumour"].sum() + float(model.head.linear.bias[0].detach()) == pytest.approx(
        logit, abs=1e-4
    )
