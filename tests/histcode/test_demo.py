"""`histcode demo` end to end on a very small cohort: every artefact, the results table, resume."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from histcode.cli import main
from histcode.demo import DemoOptions, _gene_summary, _report, encoder_health, results_table

TINY = [
    "--patients", "6", "--slide_mm", "[1.2, 1.0]", "--pretrain_steps", "4", "--epochs", "2",
    "--folds", "2", "--baseline_encoder", "tiny", "--workers", "1",
]  # fmt: skip


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    code, stdout, stderr = _run(["demo", "--out", str(out), *TINY])
    assert code == 0, stderr[-3000:]
    return out, json.loads(stdout.strip().splitlines()[-1]), stderr


def test_demo_writes_every_artefact(demo_run: tuple[Path, dict, str]) -> None:
    out, _, stderr = demo_run
    for path in (
        "cohort/expression.tsv",
        "tiles.zarr/zarr.json",
        "features/simclr.zarr/zarr.json",
        "features/random.zarr/zarr.json",
        "finetune/simclr/metrics.json",
        "finetune/naive/metrics.json",
        "finetune/simclr/predictions.csv",
        "configs/pretrain.yaml",
        "configs/finetune.yaml",
        "results.md",
        "results.json",
        "summary.json",
    ):
        assert (out / path).is_file(), path
    maps = out / "maps" / "simclr"
    assert list(maps.glob("*_attention.png")) and list(maps.glob("*.geojson"))
    # the baseline pools uniformly: no attention map is drawn for it, the tumour map is
    base = out / "maps" / "naive"
    assert not list(base.glob("*_attention.png")) and list(base.glob("*_tumour.png"))
    names = {p.name for p in (out / "registry").iterdir() if p.is_dir()}
    assert {"demo-encoder", "demo-simclr", "demo-naive"} <= names
    # each step printed the command it ran, with progress
    assert "$ histcode pretrain" in stderr and "[8/8]" in stderr


def test_demo_recipe_top_share_tumour_and_retrained_folds(demo_run: tuple[Path, dict, str]) -> None:
    """The pipeline arm's tumour logit is top-share pooling, the naive arm keeps its linear
    model on the mean feature, and every fold model of both arms was retrained on its
    training and validation patients (what the cards, folds.json and the config say)."""
    from histcode.registry import Registry

    out, _, _ = demo_run
    config = (out / "configs" / "finetune.yaml").read_text()
    assert "tumour_pooling: top_share" in config and "retrain: true" in config
    assert "tumour_context: true" in config and "tumour_map: context" in config
    assert "tumour_relative" not in config  # an option, off (RESULTS.md, "Site confounding")
    registry = Registry(out / "registry")
    for arm, pooling in (("simclr", "top_share"), ("naive", None)):
        cards = registry.list(f"demo-{arm}")
        assert cards
        for card in cards:
            assert card.arguments.get("tumour_pooling") == pooling, (arm, card.arguments)
            assert card.arguments.get("tumour_fraction_genes") == (True if pooling else None)
            assert card.arguments.get("tumour_context") == (True if pooling else None)
            assert card.arguments.get("tumour_map") == ("context" if pooling else None)
            assert "tumour_relative" not in card.arguments
            assert card.extra["retrained_with_validation"] is True
            assert set(card.extra["validation_slide_ids"]) <= set(card.extra["trained_slide_ids"])
        folds = json.loads((out / "finetune" / arm / "folds.json").read_text())
        assert all(f["retrained_with_validation"] for f in folds)


def test_demo_normalises_stains_by_default(demo_run: tuple[Path, dict, str]) -> None:
    """Macenko at tiling is the recipe (RESULTS.md, "Stain normalisation by default"): the
    tile store, both feature stores and the encoder's card say so."""
    import zarr

    from histcode.registry import Registry

    out, _, stderr = demo_run
    state = json.loads((out / "demo.json").read_text())
    assert state["options"]["stain_norm"] == "macenko"
    assert "--stain_norm macenko" in stderr  # the tile command as printed
    assert zarr.open_group(str(out / "tiles.zarr"), mode="r").attrs["stain_norm"] == "macenko"
    for name in ("simclr", "random"):
        features = zarr.open_group(str(out / "features" / f"{name}.zarr"), mode="r")
        assert features.attrs["stain_norm"] == "macenko", name
    card = Registry(out / "registry").card("demo-encoder@1")
    assert card.extra["stain_norm"] == "macenko"


def test_demo_results_table(demo_run: tuple[Path, dict, str]) -> None:
    out, result, _ = demo_run
    table = (out / "results.md").read_text()
    assert "naive: random encoder + mean pooling + linear" in table
    for row in ("tumour vs normal AUC", "genes significant", "attention vs true tumour"):
        assert row in table
    assert "| tumour AUC within sites (" in table  # with its count of sites with both classes
    # the table says which test made a gene "significant", and r is per fold, mean ± sd
    assert "Stouffer" in table and "BH over all 20 genes" in table
    assert "(per fold, mean ± sd over folds)" in table
    # what the pretraining's collapse checks said, from the encoder's own summary
    collapse = json.loads((out / "pretrain" / "summary.json").read_text())["result"]["collapse"]
    assert result["encoder"]["collapse"] == collapse
    assert f"collapse verdict **{collapse['verdict']}**" in table
    assert (result["encoder"]["warning"] is None) == (collapse["verdict"] == "ok")
    # what made the figures, threads included (a rerun of the seed matches only on as many)
    import torch

    assert result["environment"]["torch_threads"] == torch.get_num_threads()
    assert result["environment"]["torch"] == torch.__version__
    assert f"on {torch.get_num_threads()} CPU thread(s)" in table
    arms = result["results"]
    assert set(arms) == {"simclr", "naive"}
    for name, arm in arms.items():  # the table's AUC is the mean over the held-out folds
        predictions = pd.read_csv(out / "finetune" / name / "predictions.csv")
        per_fold = [
            roc_auc_score(f["tumour_true"], f["tumour_prob"])
            for _, f in predictions.groupby("fold")
            if f["tumour_true"].nunique() == 2
        ]
        assert arm["tumour_auc"] == pytest.approx(float(np.mean(per_fold)), abs=1e-6)
        metrics = json.loads((out / "finetune" / name / "metrics.json").read_text())
        within = metrics["tumour"]["within_site_auc"]
        assert arm["within_site_sites"] == within["sites"]
        assert arm["tumour_auc_within_site"] == pytest.approx(within["auc"], nan_ok=True)
        assert arm["genes"]["genes"] == 20
        assert "Stouffer" in arm["genes"]["test"]
    # the attention row is the mean over tumour slides of attention vs the true tumour mask,
    # recomputed here from each slide's tile-score CSV and its truth mask
    from histcode.synth.scoring import mask_auroc, tile_labels_from_mask
    from histcode.tilestore import TileStore

    tiles = TileStore(out / "tiles.zarr")
    per_slide = []
    for csv_path in sorted((out / "maps" / "simclr").glob("*_tile_scores.csv")):
        sid = csv_path.name.removesuffix("_tile_scores.csv")
        scores = pd.read_csv(csv_path)
        attrs = tiles.read(sid).attrs
        truth = np.load(out / "cohort" / "truth" / f"{sid}.npz")
        labels = tile_labels_from_mask(
            scores[["x", "y"]].to_numpy(),
            float(attrs["tile_size_level0"]),
            float(attrs["mpp_level0"]),
            truth["tumour"],
            float(truth["mask_mpp"]),
        )
        value = mask_auroc(scores["attention"], labels)
        if value is not None:
            per_slide.append(value)
    assert per_slide
    assert arms["simclr"]["localisation"]["attention_vs_tumour_mask"] == pytest.approx(
        float(np.mean(per_slide)), abs=1e-3
    )
    assert "attention_vs_tumour_mask" in arms["simclr"]["localisation"]
    assert "attention_vs_tumour_mask" not in arms["naive"]["localisation"]


def test_demo_rerun_resumes_and_refuses_other_options(
    demo_run: tuple[Path, dict, str],
) -> None:
    out, result, _ = demo_run
    versions = sorted(p.name for p in (out / "registry").iterdir())
    code, stdout, stderr = _run(["demo", "--out", str(out), *TINY])
    assert code == 0, stderr[-2000:]
    assert stderr.count("done in an earlier run, skipped") == 8
    assert json.loads(stdout.strip().splitlines()[-1])["results"] == result["results"]
    assert sorted(p.name for p in (out / "registry").iterdir()) == versions  # nothing new

    code, _, stderr = _run(["demo", "--out", str(out), *TINY[:-2], "--workers", "1", "--seed", "3"])
    assert code == 2
    assert "other options" in stderr and "--restart true" in stderr
    assert "seed: 0 there, 3 now" in stderr  # names what differs


def test_demo_pipeline_reads_random_features_when_simclr_collapsed(
    demo_run: tuple[Path, dict, str], tmp_path: Path
) -> None:
    """A collapsed encoder (verdict ``collapsed`` on its card) is not embedded with: the
    pipeline arm learns from the naive arm's random-weight features, and the column title,
    the warning, results.json and demo.json say so (``--on_collapse random``, the default)."""
    import shutil

    made, _, _ = demo_run
    out = tmp_path / "demo_out"
    out.mkdir()
    keep = {"cohort", "tiles.zarr", "registry", "pretrain", "configs", "demo.json"}
    for item in made.iterdir():
        if item.name in keep:
            (shutil.copytree if item.is_dir() else shutil.copy)(item, out / item.name)
    (out / "features").mkdir()
    shutil.copytree(made / "features" / "random.zarr", out / "features" / "random.zarr")
    shutil.rmtree(out / "registry" / "demo-simclr")
    shutil.rmtree(out / "registry" / "demo-naive")
    state = json.loads((out / "demo.json").read_text())
    for step in ("embed-pipeline", "finetune-simclr", "finetune-naive", "heatmaps"):
        del state["steps"][step]
    collapse = state["steps"]["pretrain"]["collapse"]
    collapse.update(verdict="collapsed", loss_over_chance=1.0, reasons=["loss at chance"])
    (out / "demo.json").write_text(json.dumps(state))

    code, stdout, stderr = _run(["demo", "--out", str(out), *TINY])
    assert code == 0, stderr[-3000:]
    assert "collapsed (loss at chance)" in stderr and "--on_collapse keep" in stderr
    assert not (out / "features" / "simclr.zarr").exists()  # nothing embedded with it
    config = (out / "finetune" / "simclr" / "config.yaml").read_text()
    assert "random.zarr" in config and "simclr.zarr" not in config
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["encoder"]["pipeline_features"] == "random"
    assert result["results"]["simclr"]["tumour_auc"] is not None
    table = (out / "results.md").read_text()
    assert "histcode: random-weight tiny encoder (SimCLR collapsed) + " in table
    assert "looks collapsed" in table and "`--on_collapse random`" in table
    step = json.loads((out / "demo.json").read_text())["steps"]["embed-pipeline"]
    assert step["fallback"] == "random" and step["features"].endswith("random.zarr")


def test_gene_summary_per_fold_r_and_named_test() -> None:
    """Per role, r per fold is the mean over the role's genes in that fold, reported as mean
    ± sd over folds; the significance row names the test from metrics.json."""
    metrics = {
        "folds": 2,
        "genes": {
            "T1": {"pearson_r": {"folds": [0.8, 0.4]}},
            "T2": {"pearson_r": {"folds": [0.6, None]}},  # undefined in fold 2
            "N1": {"pearson_r": {"folds": [0.1, -0.1]}},
        },
        "significant_genes": ["T1"],
        "fdr": {"alpha": 0.05, "label": "per-fold one-sided Pearson, BH over all 3 genes"},
    }
    roles = {"T1": "tumour", "T2": "tumour", "N1": "noise"}
    summary = _gene_summary(metrics, roles)
    assert summary["pearson_r"] == {"noise": 0.0, "tumour": 0.55}  # folds: 0.7, 0.4
    assert summary["pearson_r_sd"]["tumour"] == round(0.3 / 2**0.5, 3)
    assert summary["test"] == metrics["fdr"]["label"]
    table = results_table(
        {"simclr": {"tumour_auc": 1.0, "genes": summary, "localisation": {}}},
        {"tumour": 2, "noise": 1},
    )
    assert "genes significant (per-fold one-sided Pearson, BH over all 3 genes, FDR 5 %" in table
    assert "| 0.55 ± 0.21 |" in table
    assert "| tumour AUC within sites (N sites with both classes) | — |" in table  # not recorded


def test_results_table_within_site_row() -> None:
    arm = {"tumour_auc": 0.95, "genes": {}, "localisation": {}}
    genes = {"pearson_r": {}, "significant_with_signal": 0, "significant_noise": 0}
    arms = {
        "simclr": {**arm, "genes": genes, "tumour_auc_within_site": 0.81, "within_site_sites": 3},
        "naive": {**arm, "genes": genes, "tumour_auc_within_site": 0.52, "within_site_sites": 3},
    }
    table = results_table(arms, {"tumour": 1})
    assert "| tumour AUC within sites (3 sites with both classes) | 0.81 | 0.52 |" in table
    arms["naive"]["within_site_sites"] = 2  # the arms disagree: each cell says its count
    table = results_table(arms, {"tumour": 1})
    assert (
        "| tumour AUC within sites (N sites with both classes) | 0.81 (3 sites) | 0.52 (2" in table
    )


def test_demo_on_a_cohort_of_your_own(demo_run: tuple[Path, dict, str], tmp_path: Path) -> None:
    """``--cohort DIR``: the recipe on a folder of slides (TCGA-barcode names) and an
    expression matrix, nothing synthesised, no truth: the same outputs (predictions, one
    GeoJSON per tumour slide by the fold model that held it out), a table without map scores,
    genes reported together (no roles)."""
    import shutil

    made, _, _ = demo_run
    cohort = tmp_path / "mine"
    cohort.mkdir()
    for slide in (made / "cohort" / "slides").iterdir():  # slides in the folder itself
        shutil.copy(slide, cohort / slide.name)
    shutil.copy(made / "cohort" / "expression.tsv", cohort / "expression.tsv")
    out = tmp_path / "out"
    genes = ["MYC", "CD8A", "TP53"]
    code, stdout, stderr = _run(
        ["demo", "--cohort", str(cohort), "--out", str(out), *TINY, "--genes", *genes]
    )
    assert code == 0, stderr[-3000:]
    assert "[7/7]" in stderr and "histcode synth" not in stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    predictions = pd.read_csv(out / "finetune" / "simclr" / "predictions.csv")
    assert set(predictions["slide_id"]) == {p.stem for p in cohort.glob("*.svs")} | {
        p.stem for p in cohort.glob("*.tif*")
    }
    assert {c for c in predictions if c.endswith("_log2fc_pred")} == {
        f"{g}_log2fc_pred" for g in genes
    }
    tumour = predictions.loc[predictions["tumour_true"] == 1, "slide_id"]
    for arm in ("simclr", "naive"):
        assert {p.stem for p in (out / "maps" / arm).glob("*.geojson")} == set(tumour)
        assert result["results"][arm]["localisation"] == {}  # no truth masks: nothing scored
    table = (out / "results.md").read_text()
    assert f"cohort {cohort.resolve()} ({len(predictions)} slides" in table
    assert "of 3 genes)" in table and ", all genes" in table

    code, _, stderr = _run(["demo", "--cohort", str(tmp_path / "none"), "--out", str(out)])
    assert code == 2 and "no such folder" in stderr


def test_demo_cohort_with_roles_uses_only_the_genes_asked_for(
    demo_run: tuple[Path, dict, str], tmp_path: Path
) -> None:
    """With ``genes.json`` beside the slides and ``--genes`` naming a subset, the maps draw and
    the table counts only genes the model predicts (the first tumour-burden gene of
    genes.json, left out here, used to be drawn and stopped the heatmap step)."""
    import shutil

    made, _, _ = demo_run
    cohort = tmp_path / "mine"
    shutil.copytree(made / "cohort" / "slides", cohort / "slides")
    for name in ("expression.tsv", "genes.json"):
        shutil.copy(made / "cohort" / name, cohort / name)
    roles = {g: v["role"] for g, v in json.loads((cohort / "genes.json").read_text()).items()}
    by_role = {r: [g for g, x in roles.items() if x == r] for r in ("tumour", "lymphocyte")}
    genes = [by_role["tumour"][1], by_role["lymphocyte"][0]]  # not the first tumour gene
    out = tmp_path / "out"
    code, _, stderr = _run(
        ["demo", "--cohort", str(cohort), "--out", str(out), *TINY, "--genes", *genes]
    )
    assert code == 0, stderr[-3000:]
    drawn = {p.name for p in (out / "maps" / "simclr").glob("*_log2fc.png")}
    assert drawn and all(any(f"_{g}_log2fc" in d for g in genes) for d in drawn)
    assert "of 2 with signal / noise genes" in (out / "results.md").read_text()


def test_demo_pretraining_validates_by_steps_on_a_cohort_smaller_than_an_interval(
    small_cohort: dict[str, Path], tmp_path: Path
) -> None:
    """The demo validates every pretrain_steps / 4 steps; on a small cohort an epoch has
    fewer batches than that, which Lightning refuses unless the interval counts steps across
    epochs (``histcode demo --patients 12`` stopped at pretraining)."""
    from dataclasses import replace

    from histcode.demo import DemoOptions, _pretrain_config, _write_yaml

    options = DemoOptions(
        patients=6, difficulty="easy", slide_mm=(1.2, 1.0), mpp=1.0, tile_size=64,
        pretrain_steps=24, batch_size=64, epochs=2, folds=2, baseline_encoder="tiny",
        aggregator="abmil", seed=0,
    )  # fmt: skip
    config = _pretrain_config(replace(options))
    assert config["trainer"]["val_check_interval"] == 6  # > the ~4 batches of an epoch
    path = _write_yaml(tmp_path / "pretrain.yaml", config, "test")
    code, _, stderr = _run(
        [
            "pretrain", f"--config={path}", "--data.tiles", str(small_cohort["tiles"]),
            "--name", "small", "--registry",
            str(tmp_path / "registry"), "--out", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    assert code == 0, stderr[-2000:]


def test_encoder_health_warns_unless_ok() -> None:
    summary = {
        "verdict": "ok", "loss_over_chance": 0.79, "chance_loss": 4.14,
        "backbone_effective_rank": 7.04, "projection_effective_rank": 8.6, "backbone_dim": 64,
    }  # fmt: skip
    line, warning = encoder_health({"ref": "registry:enc@1", "collapse": summary})
    assert warning is None
    assert "0.79 × the loss of a constant embedding (4.14)" in line
    assert "7.0 of 64" in line and "**ok**" in line and "registry:enc@1" in line
    for verdict in ("suspect", "collapsed"):
        bad = {**summary, "verdict": verdict, "loss_over_chance": 1.0}
        line, warning = encoder_health({"ref": "registry:enc@1", "collapse": bad})
        assert warning is not None and f"looks {verdict}" in warning
        assert "naive" in warning and f"**{verdict}**" in line
    line, warning = encoder_health({"ref": "registry:enc@1"})  # checks were off
    assert warning is None and "no collapse checks were recorded" in line


def test_results_table_names_the_scorer_that_drew_the_tumour_map() -> None:
    arm = {"tumour_auc": 0.9, "localisation": {"tumour_vs_tumour_mask": 0.8}}
    arm["genes"] = {"pearson_r": {}, "significant_with_signal": 0, "significant_noise": 0}
    title = "map AUROC: tumour contribution vs true tumour (top-share: each tile's own tumour logit"
    for shown, words in (("own", " by the scorer on the tile's own features)"),
                         ("context", ", by the scorer with tile context)")):  # fmt: skip
        table = results_table({"simclr": arm}, {"tumour": 1}, "abmil", "top_share", True,
                              tumour_map=shown)  # fmt: skip
        assert f"| {title}{words} | 0.80 |" in table


def test_demo_tumour_relative_is_an_option_of_the_context_scorer() -> None:
    """``--tumour_relative true`` puts ``tumour_relative`` in the pipeline's finetune config
    (only with tile context); the default recipe leaves it out, and the naive arm's
    overrides switch it off."""
    from dataclasses import replace

    from histcode.demo import BASELINE_MODEL, DemoOptions, _finetune_config

    options = DemoOptions(
        patients=30, difficulty="hard", slide_mm=(2.5, 2.0), mpp=1.0, tile_size=64,
        pretrain_steps=10, batch_size=32, epochs=2, folds=3, baseline_encoder="tiny",
        aggregator="abmil", seed=0,
    )  # fmt: skip
    assert "tumour_relative" not in _finetune_config(options)["model"]
    on = _finetune_config(replace(options, tumour_relative=True))["model"]
    assert on["tumour_relative"] is True and on["tumour_context"] is True
    off = replace(options, tumour_relative=True, tumour_context=False)
    assert "tumour_relative" not in _finetune_config(off)["model"]
    assert BASELINE_MODEL[BASELINE_MODEL.index("--model.tumour_relative") + 1] == "false"


def test_results_warn_when_tumour_labels_follow_the_sites(tmp_path: Path) -> None:
    """finetune's site-confounding warning (metrics.json) heads results.md and is in
    results.json; a cohort without it has neither."""
    import time

    options = DemoOptions(
        patients=30, difficulty="hard", slide_mm=(2.5, 2.0), mpp=1.0, tile_size=64,
        pretrain_steps=10, batch_size=32, epochs=2, folds=3, baseline_encoder="tiny",
        aggregator="abmil", seed=0,
    )  # fmt: skip
    said = "tumour labels follow the tissue source site: the site alone tells …"
    found = {"site_only_auc": 0.83, "chance_auc": 0.6, "p_value": 0.001, "confounded": True}
    for arm in ("simclr", "naive"):
        (tmp_path / "finetune" / arm).mkdir(parents=True)
        metrics = {"folds": 3, "tumour": {"site_confounding": {**found, "warning": said}}}
        (tmp_path / "finetune" / arm / "metrics.json").write_text(json.dumps(metrics))
    arms = {a: {"tumour_auc": 0.8} for a in ("simclr", "naive")}
    maps = {a: {} for a in arms}
    with contextlib.redirect_stderr(io.StringIO()):
        result = _report(tmp_path, options, arms, maps, {}, "registry", time.perf_counter())
    assert f"**Warning:** {said}" in (tmp_path / "results.md").read_text()
    assert result["site_warning"] == said and result["site_confounding"]["site_only_auc"] == 0.83
    for arm in ("simclr", "naive"):
        metrics = {
            "folds": 3,
            "tumour": {"site_confounding": {"confounded": False, "warning": None}},
        }
        (tmp_path / "finetune" / arm / "metrics.json").write_text(json.dumps(metrics))
    with contextlib.redirect_stderr(io.StringIO()):
        result = _report(tmp_path, options, arms, maps, {}, "registry", time.perf_counter())
    assert "Warning" not in (tmp_path / "results.md").read_text() and result["site_warning"] is None
