"""The SimCLR recipe benchmark on a tiny generated cohort: runs, random-init probes, variants'
overrides, the stain-normalised variant, caching, merging and the report (fast: ~20 s)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import ceiling  # noqa: E402
from benchmarks import run as runner  # noqa: E402
from benchmarks import simclr_recipe as recipe  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An easy 4-patient cohort of 0.8 × 0.6 mm slides tiled at 1 µm/px (64 px), and the
    arguments of a run of three variants on it (one with another encoder architecture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark runs; back to the session's count at the end
    work = tmp_path_factory.mktemp("simclr_recipe")
    cohort = ceiling.make_cohort(work, "easy", 4, (0.8, 0.6))
    tiles = ceiling.make_tiles(work, cohort, "easy", 4, 1.0)
    argv = [
        "--tiles", str(tiles), "--cohort", str(cohort), "--work", str(work / "bench"),
        "--variants", "base", "temp05_macenko", "norelu_macenko", "--seeds", "0",
        "--steps", str(STEPS), "--tiles-per-slide", "60", "--label", "tiny",
    ]  # fmt: skip
    yield {"work": work, "cohort": cohort, "tiles": tiles, "argv": argv}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def result(tiny: dict[str, Any]) -> dict[str, Any]:
    return recipe.main(tiny["argv"])


def test_a_run_gives_every_run_its_random_init_and_a_summary(result: dict[str, Any]) -> None:
    assert result["benchmark"] == "simclr_recipe" and result["seeds"] == [0]
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == {"base", "temp05_macenko", "norelu_macenko"}
    for r in runs.values():
        assert r["status"] == "ok", r.get("error")
        assert r["steps"] == STEPS and r["pretrain"]["steps"] == STEPS
        assert math.isfinite(r["pretrain"]["final_loss"])
        assert r["pretrain"]["chance_loss"] == pytest.approx(math.log(63), abs=1e-4)
        p = r["probe"]
        for figure in ("tumour_tile_auc", "tumour_slide_auc", "lymphocyte_tile_auc"):
            assert 0 <= p[figure] <= 1
        assert 0 < p["effective_rank"] <= p["dim"] == 64
    # each architecture is paired with its own initial weights: the demo's tiny CNN (a ReLU
    # before the pool since session 14) and the same without it
    assert recipe.demo_recipe()["model"]["encoder_kwargs"]["final_relu"] is True
    assert runs["norelu_macenko"]["recipe"]["model"]["encoder_kwargs"] == {
        "embed_dim": 64, "width": 16, "final_relu": False,
    }  # fmt: skip

    def relu(kwargs: dict[str, Any]) -> bool:
        return bool(kwargs.get("final_relu", False))

    inits = {(r["stain"], relu(r["encoder_kwargs"])) for r in result["random_init"]}
    assert inits == {(None, True), ("macenko", True), ("macenko", False)}
    rows = {
        (row["variant"], row["stain"], relu(row["encoder_kwargs"])): row
        for row in result["summary"]
    }
    assert set(rows) == {
        ("random init", None, True), ("random init", "macenko", True),
        ("random init", "macenko", False), ("base", None, True),
        ("temp05_macenko", "macenko", True), ("norelu_macenko", "macenko", False),
    }  # fmt: skip
    old, old_init = (
        rows[("norelu_macenko", "macenko", False)],
        rows[("random init", "macenko", False)],
    )
    expected = (
        runs["norelu_macenko"]["probe"]["tumour_tile_auc"] - old_init["tumour_tile_auc"]["mean"]
    )
    assert old["tumour_tile_auc_vs_random"]["mean"] == pytest.approx(expected, abs=1e-4)
    demo, init = rows[("base", None, True)], rows[("random init", None, True)]
    assert demo["tumour_tile_auc"]["mean"] == runs["base"]["probe"]["tumour_tile_auc"]
    # the paired difference is against the random init of the same seed and tiles
    expected = runs["base"]["probe"]["tumour_tile_auc"] - init["tumour_tile_auc"]["mean"]
    assert demo["tumour_tile_auc_vs_random"]["mean"] == pytest.approx(expected, abs=1e-4)
    assert "tumour_tile_auc_vs_random" not in init
    cohort = result["cohorts"]["tiny"]
    assert cohort["patients"] == 4 and cohort["tile_size"] == 64 and cohort["mpp"] == 1.0


def test_random_init_probe_is_a_probe_of_a_freshly_built_encoder(
    tiny: dict[str, Any], result: dict[str, Any]
) -> None:
    """The step-0 row is the encoder a run starts from: the zoo's tiny CNN seeded with the
    run's seed, probed on tiles read straight from the slides (not from the cache)."""
    from histcode.encoders import create_encoder
    from histcode.tilereader import TileDataset

    labels = ceiling.label_tiles(tiny["cohort"], tiny["tiles"])
    sampled = ceiling.sample_tiles(labels.index, 60, 0)
    dataset = TileDataset(labels.index)
    pixels = np.stack([dataset[int(i)].numpy() for i in sampled])
    torch.manual_seed(0)
    kwargs = recipe.demo_recipe()["model"]["encoder_kwargs"]
    encoder = create_encoder("tiny", **kwargs, mpp=1.0, tile_size=64)
    x = ceiling.embed(encoder, pixels)
    direct = ceiling.probe_features(x, labels, sampled, 3, 0.1, 0.02)
    init = next(r for r in result["random_init"] if r["stain"] is None)
    assert init["encoder_kwargs"] == kwargs
    assert init["probe"]["tumour_tile_auc"] == direct["tumour"]["tile_auc"]
    assert init["probe"]["tumour_slide_auc"] == direct["tumour"]["slide_auc_top"]
    assert init["probe"]["lymphocyte_tile_auc"] == direct["lymphocyte"]["tile_auc"]
    assert init["probe"]["effective_rank"] == ceiling.feature_stats(x, seed=0)["effective_rank"]
    # the pixel cache holds the store's tiles as the slides give them
    cached, _ = recipe.load_pixels(labels, tiny["work"] / "bench")
    np.testing.assert_array_equal(cached[sampled], pixels)


def test_a_variants_overrides_reach_the_module_it_trains(result: dict[str, Any]) -> None:
    runs = {r["variant"]: r for r in result["runs"]}
    assert runs["base"]["effective"]["temperature"] == pytest.approx(0.1)  # SimCLR's
    assert runs["temp05_macenko"]["effective"]["temperature"] == pytest.approx(0.5)
    assert runs["base"]["effective"]["lr"] == pytest.approx(0.002)
    assert (
        runs["base"]["pretrain"]["aligned_loss"]
        < runs["temp05_macenko"]["pretrain"]["aligned_loss"]
    )

    nocolour = recipe.build_module(recipe.recipe_for(recipe.VARIANTS["nocolour"]), 0, 1.0, 64)
    assert nocolour.augmentation.jitter_prob == 0 and nocolour.augmentation.gray_prob == 0
    assert nocolour.augmentation.hed_prob == 0.8  # HED stain jitter kept
    weak = recipe.build_module(recipe.recipe_for(recipe.VARIANTS["weakcrop"]), 0, 1.0, 64)
    assert weak.augmentation.crop_scale == (0.6, 1.0)
    slow = recipe.build_module(recipe.recipe_for(recipe.VARIANTS["lr2e-4"]), 0, 1.0, 64)
    opt, _ = recipe.optimiser(slow, 100, 32)
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(2e-4)
    assert recipe.recipe_for(recipe.VARIANTS["batch128"])["batch_size"] == 128
    hot = recipe.build_module(recipe.recipe_for({"temperature": 1.0}), 0, 1.0, 64)
    assert hot.criterion.temperature == 1.0
    with pytest.raises(ValueError, match="temprature"):
        recipe.recipe_for({"temprature": 0.5})
    with pytest.raises(ValueError, match="jiter_prob"):
        recipe.recipe_for({"augmentation": {"jiter_prob": 0}})
    with pytest.raises(ValueError, match="reinhard"):
        recipe.recipe_for({"stain": "reinhard"})
    with pytest.raises(ValueError, match="encoder"):  # every recipe trains the demo's encoder
        recipe.recipe_for({"encoder": "resnet18"})


def test_the_macenko_variant_trains_and_is_probed_on_normalised_tiles(
    tiny: dict[str, Any], result: dict[str, Any]
) -> None:
    record = result["stain"]["macenko"]
    assert len(record["slides"]) == result["cohorts"]["tiny"]["slides"] and not record["failed"]
    for params in record["slides"].values():  # one stain estimate a slide, H first
        assert params["haematoxylin"][0] > params["eosin"][0]
    cache = {p.name for p in (tiny["work"] / "bench" / "pixels").glob("*.npz")}
    raw_cache = [name for name in cache if not name.endswith(".macenko.npz")]
    assert len(raw_cache) == 1 and cache == {*raw_cache, raw_cache[0][:-4] + ".macenko.npz"}
    raw, stained = (
        next(r for r in result["random_init"] if r["stain"] == s) for s in (None, "macenko")
    )
    assert raw["probe"] != stained["probe"]  # other tiles, other features


def test_a_rerun_reuses_the_cached_runs(tiny: dict[str, Any], result: dict[str, Any]) -> None:
    again = recipe.main(tiny["argv"])
    assert all(r["cached"] for r in again["runs"] + again["random_init"])
    assert again["summary"] == result["summary"]


def test_merge_adds_earlier_runs_and_runs_nothing_without_seeds(
    tmp_path: Path, result: dict[str, Any]
) -> None:
    out = tmp_path / "tiny.json"
    out.write_text("log line\n" + json.dumps(result) + "\n")
    merged = recipe.main(["--seeds", "--merge", str(out), "--work", str(tmp_path / "w")])
    assert merged["summary"] == result["summary"] and merged["cohorts"] == result["cohorts"]
    assert not (tmp_path / "w" / "pixels").exists()  # nothing was made or run


def test_aligned_loss_is_nt_xent_of_identical_views_of_orthogonal_tiles() -> None:
    from lightly.loss import NTXentLoss

    z = torch.eye(8)[:4] * 3.0  # 4 tiles, orthogonal, both views identical
    for t in (0.1, 0.5, 1.0):
        loss = float(NTXentLoss(temperature=t)(z, z.clone()))
        assert loss == pytest.approx(recipe.aligned_loss(4, t), rel=1e-4, abs=1e-6)
    assert recipe.aligned_loss(32, 1.0) < math.log(63)


BASE_ROW = (
    "| base (SimCLR's temperature 0.1 and augmentations: the demo until 11/2026), 3 steps | 1 |"
)


def test_the_section_renders_the_table_next_to_random_init(result: dict[str, Any]) -> None:
    failed = {"cohort": "tiny", "variant": "temp1", "seed": 1, "status": "failed", "error": "X"}
    r = {**result, "runs": [*result["runs"], failed]}
    entry = {"status": "ok", "result": r}
    md = "\n".join(recipe.recipe_section(entry))
    lines = md.splitlines()
    init = next(i for i, x in enumerate(lines) if x.startswith("| tiny | random init (step 0) |"))
    demo = next(i for i, x in enumerate(lines) if BASE_ROW in x)
    assert init < demo
    assert "temp05_macenko (temperature 0.5, Macenko-normalised tiles), 3 steps" in md
    assert "| tiny | temp1, seed 1 | failed: X |" in md
    assert "random init (step 0), Macenko |" in md
    assert "random init (step 0), Macenko, final_relu False |" in md
    report = {"machine": {}, "results": {"simclr_recipe": entry}}
    assert "## SimCLR recipes: what pretraining adds" in runner.render_markdown(report)
    assert "simclr_recipe" in runner.NAMES
    assert runner.NAMES[-2:] == ("ceiling", "accuracy")  # runs before them


def test_a_stain_variant_on_a_normalised_store_is_refused(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    store = tmp_path / "normalised.zarr"
    ceiling.histcode(
        "tile", "--slides", str(tiny["cohort"] / "slides"), "--out", str(store), "--mpp", "1",
        "--tile_size", "64", "--stain_norm", "macenko", "--progress", "false",
    )  # fmt: skip
    argv = ["--tiles", str(store), "--cohort", str(tiny["cohort"]), "--work", str(tmp_path)]
    with pytest.raises(ValueError, match="normalise its tiles twice"):
        recipe.main([*argv, "--variants", "temp05_macenko", "--seeds", "0", "--steps", "1"])


def test_the_demo_variant_is_what_the_demo_trains_with() -> None:
    """``demo`` must follow histcode demo's pretraining config, and ``base`` differ from it
    only in the temperature and augmentations."""
    assert recipe.VARIANTS["demo"] == recipe.demo_choices()
    base, demo = recipe.recipe_for({}), recipe.recipe_for(recipe.VARIANTS["demo"])
    assert base["augmentation"] == {} and base["model"]["temperature"] == pytest.approx(0.1)
    assert demo["model"]["temperature"] == pytest.approx(0.5)
    assert {k for k in base["model"] if base["model"][k] != demo["model"][k]} == {"temperature"}
