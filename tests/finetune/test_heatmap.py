"""histcode heatmap: maps, montage, GeoJSON and CSV of a registered slide model over a slide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histcode.cli import main as cli_main
from histcode.embedding import embed_store
from histcode.featurestore import FeatureStore
from histcode.finetune.heads import build_slide_model, slide_model_builders
from histcode.finetune.maps import compute_maps
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
    from PIL import Image

    for name in ("attention", "tumour", "MYC_log2fc", "CD8A_log2fc", "montage_attention"):
        with Image.open(out / f"{SLIDE}_{name}.png") as png:
            pixels = np.asarray(png.convert("RGB"), float)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600, (name, pixels.shape)
        assert pixels.std() > 20, name  # a drawn slide and map, not a blank canvas
    geo = json.loads((out / f"{SLIDE}.geojson").read_text())
    assert len(geo["features"]) == n and geo["properties"]["model"] == "hm-test@1"
    measurements = geo["features"][0]["properties"]["measurements"]
    assert {"attention", "tumour", "MYC_log2fc", "MYC_up", "CD8A_log2fc"} <= set(measurements)
    with open(out / f"{SLIDE}_tile_scores.csv") as f:
        rows = list(csv.DictReader(f))
    attention = np.array([float(r["attention"]) for r in rows])
    assert len(rows) == n and attention.sum() == pytest.approx(1.0, abs=1e-4)  # pooling weights
    assert [float(f["properties"]["measurements"]["attention"]) for f in geo["features"]] == (
        pytest.approx(attention.tolist(), abs=1e-6)
    )
    assert (out / "summary.json").is_file()


def test_tile_contributions_add_up_to_the_slide_prediction(registered) -> None:
    model, card = Registry(registered["registry"]).load(
        "hm-test",
        builders=slide_model_builders(),
    )
    feats = FeatureStore(registered["features"]).read(SLIDE).features
    maps, prediction, main, kind = compute_maps(model.eval(), card, feats)
    assert main == "attention" and np.isclose(maps["attention"].sum(), 1.0, atol=1e-5)
    assert kind == "exact"
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


def test_per_task_attention_maps(registered) -> None:
    """A per-task abmil model: ``attention`` is the tumour task's, each gene has its own."""
    from histcode.finetune.heads import build_slide_model

    torch.manual_seed(0)
    model = build_slide_model(
        "abmil", in_dim=32, hidden=16, n_genes=len(GENES), options={"branches": "per_task"}
    ).eval()
    card = Card(kind="mil", architecture="abmil", arguments={}, extra={"genes": GENES})
    feats = FeatureStore(registered["features"]).read(SLIDE).features
    maps, prediction, main, kind = compute_maps(model, card, feats)
    assert main == "attention" and kind == "exact"
    for name in ("attention", "MYC_attention", "CD8A_attention"):
        assert maps[name].shape == (len(feats),)
        assert np.isclose(maps[name].sum(), 1.0, atol=1e-5), name
    assert not np.allclose(maps["attention"], maps["MYC_attention"])
    logit = float(np.log(prediction["tumour_prob"] / (1 - prediction["tumour_prob"])))
    assert maps["tumour"].sum() + float(model.head.linear.bias[0].detach()) == pytest.approx(
        logit, abs=1e-4
    )


# -- honest numbers: in-sample maps, what tile scores are, attention as a multiple of uniform ----

PATIENT = "TCGA-S1-0001"  # SLIDE's patient


def _save_version(registered, name: str, extra: dict, model=None) -> str:
    """Register the fixture's abmil model (or ``model``) under ``name`` with card ``extra``."""
    reg = Registry(registered["registry"])
    base, card = reg.load("hm-test@1", builders=slide_model_builders())
    card = Card(
        kind="mil",
        architecture="abmil",
        arguments=card.arguments,
        parents=card.parents,
        extra={"genes": GENES, **extra},
    )
    return reg.save(name, model if model is not None else base, card)


def _truth(tmp_path: Path) -> Path:
    """A truth file for SLIDE (1.2 × 1 mm): tumour on the left half, lymphocytes at the top."""
    tumour = np.zeros((125, 150), bool)
    tumour[:, :75] = True
    lymph = np.zeros((125, 150), bool)
    lymph[:40] = True
    path = tmp_path / "truth" / f"{SLIDE}.npz"
    path.parent.mkdir()
    np.savez(path, tumour=tumour, lymphocyte=lymph, mask_mpp=8.0)
    return path


def _run(registered, ref: str, out: Path, capsys, *extra: str) -> tuple[int, dict | None, str]:
    argv = [
        "heatmap", "--model", ref, "--features", str(registered["features"]),
        "--slide", str(registered["slides"] / f"{SLIDE}.svs"), "--out", str(out),
        "--registry", str(registered["registry"]), "--top_k", "2", "--genes", "MYC", *extra,
    ]  # fmt: skip
    code = cli_main(argv)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, json.loads(lines[-1]) if lines else None, captured.err


def _png_text(path: Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as im:
        return dict(im.text)


def test_in_sample_slide_is_flagged_and_truth_scoring_refused(registered, tmp_path, capsys):
    """A model whose card lists SLIDE's patient among its training patients: --truth is
    refused (exit 2, nothing written); with --allow_in_sample it is scored, and the JSON line,
    the GeoJSON and the PNG titles say loudly that the slide was seen in training."""
    ref = _save_version(
        registered,
        "hm-insample",
        {
            "fold": "refit",
            "trained_patients": [PATIENT],
            "validation_patients": ["TCGA-S3-0003"],
            "trained_slide_ids": ["TCGA-S1-0001-01A-01-TS2"],  # another slide of the patient
            "validation_slide_ids": ["TCGA-S3-0003-01A-01-TS1"],
        },
    )
    truth = _truth(tmp_path)
    out = tmp_path / "refused"
    code, line, err = _run(registered, ref, out, capsys, "--truth", str(truth))
    assert code == 2 and line is None
    assert "refusing to score --truth on " + SLIDE in err
    assert f"slides of this slide's patient {PATIENT}" in err and "--allow_in_sample true" in err
    assert not out.exists() or not list(out.glob("*.png"))

    out = tmp_path / "allowed"
    code, line, _ = _run(
        registered, ref, out, capsys, "--truth", str(truth), "--allow_in_sample", "true"
    )
    assert code == 0
    assert line["seen_in_training"] is True and line["training_role"] == "training"
    assert line["localisation_auroc"]["attention_vs_tumour_mask"] is not None
    geo = json.loads((out / f"{SLIDE}.geojson").read_text())
    assert geo["properties"]["seen_in_training"] is True
    assert PATIENT in geo["properties"]["seen_reason"]
    assert all(f["properties"]["seen_in_training"] is True for f in geo["features"])
    for name in ("attention", "tumour", "MYC_log2fc"):
        text = _png_text(out / f"{SLIDE}_{name}.png")
        assert "SEEN IN TRAINING (training)" in text["Title"], name
        assert text["Warning"].startswith("IN-SAMPLE: ") and PATIENT in text["Warning"], name


def test_validation_slide_counts_as_seen(registered, tmp_path, capsys):
    """Validation slides chose the model's epoch: not held out either."""
    ref = _save_version(
        registered,
        "hm-val",
        {"trained_patients": ["TCGA-S2-0002"], "validation_patients": [PATIENT],
         "trained_slide_ids": [], "validation_slide_ids": [SLIDE]},
    )  # fmt: skip
    code, _, err = _run(registered, ref, tmp_path / "m", capsys, "--truth", str(_truth(tmp_path)))
    assert code == 2 and "chose its epoch on this slide" in err


def test_held_out_slide_is_scored_and_says_so(registered, tmp_path, capsys):
    ref = _save_version(
        registered,
        "hm-fold",
        {"fold": 1, "trained_patients": ["TCGA-S2-0002"], "validation_patients": [],
         "trained_slide_ids": ["TCGA-S2-0002-11A-01-TS1"], "validation_slide_ids": []},
    )  # fmt: skip
    out = tmp_path / "m"
    code, line, _ = _run(registered, ref, out, capsys, "--truth", str(_truth(tmp_path)))
    assert code == 0 and line["seen_in_training"] is False and line["training_role"] == "held-out"
    assert line["localisation_auroc"]["tumour_vs_tumour_mask"] is not None
    geo = json.loads((out / f"{SLIDE}.geojson").read_text())
    assert geo["properties"]["seen_in_training"] is False
    assert "fold 1's test patients" in geo["properties"]["seen_reason"]
    text = _png_text(out / f"{SLIDE}_attention.png")
    assert "held out" in text["Title"] and "Warning" not in text


def test_card_without_patient_lists_cannot_tell(registered, tmp_path, capsys, caplog):
    """A card registered before the lists existed: unknown, never claimed held out."""
    out = tmp_path / "m"
    code, line, _ = _run(registered, "hm-test@1", out, capsys)
    assert code == 0 and line["seen_in_training"] is None and line["training_role"] == "unknown"
    assert "cannot tell whether it saw this slide" in caplog.text
    geo = json.loads((out / f"{SLIDE}.geojson").read_text())
    assert geo["properties"]["seen_in_training"] is None
    text = _png_text(out / f"{SLIDE}_tumour.png")
    assert "held out or not: unknown" in text["Title"]
    assert text["Warning"].startswith("UNKNOWN WHETHER HELD OUT")


@pytest.mark.parametrize(
    ("architecture", "options", "kind"),
    [
        ("abmil", {}, "exact"),
        ("clam_sb", {}, "exact"),
        ("mean", {}, "exact"),
        ("linear", {}, "exact"),
        ("transformer", {"layers": 1, "heads": 2}, "approximate"),
        ("max", {}, "own"),
    ],
)
def test_tile_scores_say_how_they_relate_to_the_prediction(
    registered, architecture: str, options: dict, kind: str
) -> None:
    """Exact contributions for attention/mean/linear pooling, approximate for the
    transformer, each tile's own prediction for max pooling — and the title says which."""
    from histcode.finetune.maps import TrainingRole, map_title

    torch.manual_seed(0)
    model = build_slide_model(
        architecture, in_dim=32, hidden=16, n_genes=len(GENES), options=options
    ).eval()
    card = Card(kind="mil", architecture=architecture, arguments={}, extra={"genes": GENES})
    feats = FeatureStore(registered["features"]).read(SLIDE).features
    maps, prediction, _, got = compute_maps(model, card, feats)
    assert got == kind
    logit = float(np.log(prediction["tumour_prob"] / (1 - prediction["tumour_prob"])))
    total = maps["tumour"].sum() + float(model.head.linear.bias[0].detach())
    assert (total == pytest.approx(logit, abs=1e-4)) == (kind == "exact")
    role = TrainingRole("held-out", False, "never saw it")
    title, _ = map_title(SLIDE, "tumour", got, False, len(feats), "m@1", Path("f.zarr"), role)
    phrase = {
        "exact": "contribution to the slide's tumour logit (exact",
        "approximate": "approximate contribution to the slide's tumour logit",
        "own": "each tile's own tumour logit (max pooling",
    }[kind]
    assert phrase in title


def test_attention_is_drawn_as_a_multiple_of_uniform(registered, tmp_path, capsys, monkeypatch):
    """A model whose attention is exactly uniform draws a flat map: every tile at 1 (× n
    tiles), in the middle of a colour scale that holds 1, under a bar that says so."""
    import histcode.mapdrawing as drawing

    flat, _ = Registry(registered["registry"]).load("hm-test@1", builders=slide_model_builders())
    with torch.no_grad():
        flat.aggregator.attention.score.weight.zero_()
        flat.aggregator.attention.score.bias.zero_()
    ref = _save_version(registered, "hm-flat", {}, model=flat)
    figures = {}
    save = drawing._save

    def keep(fig, path, *args, **kwargs):
        figures[Path(path).name] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(drawing, "_save", keep)
    code, _, _ = _run(registered, ref, tmp_path / "m", capsys)
    assert code == 0
    fig = figures[f"{SLIDE}_attention.png"]
    bar = [ax for ax in fig.axes if ax.get_ylabel() == "attention × n tiles (1 = uniform)"]
    assert len(bar) == 1
    image = fig.axes[1].images[-1]  # the map over the slide
    values = np.ma.masked_invalid(image.get_array()).compressed()
    assert values.size == FeatureStore(registered["features"]).read(SLIDE).features.shape[0]
    assert np.allclose(values, 1.0, atol=1e-5)
    norm = image.norm
    assert norm.vmin < 1.0 < norm.vmax and norm(1.0) == pytest.approx(0.5)


def test_fold_cards_list_the_patients_they_learnt_from(tmp_path: Path, capsys) -> None:
    """``--cv.register folds``: each fold model's card lists its training and validation
    patients and slides, as folds.json has them; its test fold is held out, another slide of
    a training patient is not."""
    from histcode.finetune.maps import training_role
    from tests.finetune.finetune_cohort import write_signal_cohort

    cohort = write_signal_cohort(tmp_path / "cohort", n_patients=8, dim=8, tiles=(8, 16))
    configs = Path(__file__).parents[2] / "histcode" / "configs" / "finetune"
    argv = [
        "finetune", "--config", str(configs / "deg.yaml"),
        "--config", str(configs / "cpu_smoke.yaml"),
        "--features", str(cohort.features), "--labels", str(cohort.labels),
        "--expression", str(cohort.expression), "--data.genes", "MYC", "--name", "folds",
        "--out", str(tmp_path / "run"), "--registry", str(tmp_path / "registry"),
        "--cv.folds", "2", "--cv.register", "folds", "--trainer.max_epochs", "1",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    capsys.readouterr()
    folds = json.loads((tmp_path / "run" / "folds.json").read_text())
    cards = {c.extra["fold"]: c for c in Registry(tmp_path / "registry").list("folds")}
    assert sorted(cards) == [0, 1]
    for fold in folds:
        extra = cards[fold["fold"]].extra
        assert extra["trained_patients"] == fold["patients"]["train"]
        assert extra["validation_patients"] == fold["patients"]["val"]
        trained = [s for s in cohort.slides if cohort.patients[s] in fold["patients"]["train"]]
        assert extra["trained_slide_ids"] == sorted(trained)
        assert len(extra["validation_slide_ids"]) == extra["validation_slides"] > 0
        card = cards[fold["fold"]]
        for slide in cohort.slides:
            patient = cohort.patients[slide]
            role = training_role(card, slide).role
            if patient in fold["patients"]["test"]:
                assert role == "held-out", slide
            else:
                assert role == (
                    "training" if patient in extra["trained_patients"] else "validation"
                )
        # a new slide of a training patient, never in the run, is still not held out
        new = f"{fold['patients']['train'][0]}-01C-01-TS1"
        assert training_role(card, new).seen is True


def test_class_map_titles_name_the_class_logit() -> None:
    """A categorical task's map (<task>_<class>) is titled as that class's logit, not as a
    gene's up-class logit."""
    from histcode.finetune.maps import TrainingRole, map_title

    role = TrainingRole("held-out", False, "")
    title, _ = map_title("S", "subtype_LumA", "exact", True, 10, "m@1", Path("f.zarr"), role)
    assert "subtype_LumA class logit" in title and "up-class" not in title
    title, _ = map_title("S", "MYC_up", "exact", True, 10, "m@1", Path("f.zarr"), role)
    assert "MYC up-class logit" in title
