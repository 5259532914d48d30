"""Tile context (``histcode.finetune.context``) and the tumour scorer that reads it
(``--model.tumour_context``): the features, the slide model's wiring, training and maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from histcode.featurestore import FeatureStore
from histcode.finetune.bags import FeatureBags
from histcode.finetune.context import context_features, neighbour_mean
from histcode.finetune.heads import build_slide_model, slide_model_builders
from histcode.finetune.options import TRAINER_DEFAULTS, CVOptions, DataOptions, ModelOptions
from histcode.finetune.pipeline import run_finetune
from histcode.registry import Registry
from tests.finetune.finetune_cohort import SignalCohort

PER_TASK = {"branches": "per_task", "gene_pooling": "softmax"}


def test_neighbour_mean_averages_the_present_3x3_neighbourhood() -> None:
    step, origin = 256, np.array([1000, 40])
    cells = [(i, j) for i in range(3) for j in range(3) if (i, j) != (2, 2)]  # (2, 2) is glass
    coords = origin + step * np.array(cells)
    x = np.arange(len(cells) * 2, dtype=np.float32).reshape(-1, 2)
    got = neighbour_mean(x, coords)
    centre = cells.index((1, 1))
    np.testing.assert_allclose(got[centre], x.mean(0))  # all 8 present tiles, itself included
    corner = cells.index((0, 0))
    near = [cells.index(c) for c in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    np.testing.assert_allclose(got[corner], x[near].mean(0))
    np.testing.assert_array_equal(neighbour_mean(x[:1], coords[:1]), x[:1])  # alone
    with pytest.raises(ValueError, match="not on a grid"):
        neighbour_mean(x[:3], np.array([[0, 0], [256, 0], [600, 0]]))


def test_context_features_are_own_neighbourhood_and_both_minus_the_slide_median() -> None:
    coords = 64 * np.array([(i, j) for i in range(4) for j in range(5)])
    x = np.random.default_rng(0).normal(size=(len(coords), 3)).astype(np.float32)
    z = context_features(x, coords)
    assert z.shape == (20, 12) and z.dtype == np.float32
    m = neighbour_mean(x, coords)
    np.testing.assert_allclose(z[:, :3], x)
    np.testing.assert_allclose(z[:, 3:6], m)
    np.testing.assert_allclose(z[:, 6:9], x - np.median(x, 0), atol=1e-6)
    np.testing.assert_allclose(z[:, 9:], m - np.median(m, 0), atol=1e-6)
    # a cast shared by every tile of the slide is gone from the relative half
    np.testing.assert_allclose(context_features(x + 5.0, coords)[:, 6:], z[:, 6:], atol=1e-5)


def test_a_slide_without_tiles_has_empty_context() -> None:
    got = context_features(np.zeros((0, 5), np.float32), np.zeros((0, 2), np.int64))
    assert got.shape == (0, 20)
    with pytest.raises(ValueError, match="tile corners"):
        neighbour_mean(np.zeros((3, 2)), np.zeros((2, 2)))


def test_options_and_model_refuse_context_without_top_share() -> None:
    with pytest.raises(ValueError, match="top_share"):
        ModelOptions(tumour_context=True)
    with pytest.raises(ValueError, match="top_share"):
        build_slide_model("abmil", 8, tumour_context=True)
    with pytest.raises(ValueError, match="tumour task"):
        build_slide_model("abmil", 8, tumour=False, n_genes=2, tumour_pooling="top_share",
                          tumour_context=True)  # fmt: skip


def test_only_the_tumour_scorer_reads_the_context_columns() -> None:
    torch.manual_seed(0)
    model = build_slide_model(
        "abmil", 8, 16, n_genes=2, options=PER_TASK, tumour_pooling="top_share",
        tumour_context=True,
    ).eval()  # fmt: skip
    assert model.tumour_path.linear.in_features == 32 and model.own_dim == 8
    x = torch.randn(2, 30, 32)
    out = model(x)
    moved = x.clone()
    moved[..., 8:] += torch.randn(2, 30, 24)  # only the context columns change
    again = model(moved)
    assert not torch.allclose(out.tumour_logit, again.tumour_logit)
    assert torch.equal(out.log2fc, again.log2fc) and torch.equal(out.gene_logits, again.gene_logits)
    assert torch.equal(out.branch_attention[:, 1:], again.branch_attention[:, 1:])
    # the tumour map is the second scorer's, on the tiles' own features (the context
    # scorer's top tiles are where the slide logit looks, not where tumour is)
    assert model.fraction_scorer is not None and model.fraction_scorer.linear.in_features == 8
    scores = model.tile_scores(x)
    mask = torch.ones(2, 30, dtype=torch.bool)
    assert torch.allclose(scores.tumour, model.fraction_scorer.tiles(x[..., :8], mask))
    assert out.fraction_logit is not None  # trained (loss "fraction") even without genes
    assert torch.equal(model.tile_scores(moved).tumour, scores.tumour)


def test_feature_bags_give_each_slides_own_context(small_signal_cohort: SignalCohort) -> None:
    store = FeatureStore(small_signal_cohort.features)
    sid = small_signal_cohort.slides[0]
    read = store.read(sid)
    bags = FeatureBags(store, context=True)
    np.testing.assert_array_equal(bags[sid], context_features(read.features, read.coords))
    assert FeatureBags(store)[sid].shape == read.features.shape


def test_context_trains_registers_and_maps_as_it_trained(
    small_signal_cohort: SignalCohort, tmp_path: Path
) -> None:
    """A fold model trained with tile context carries it on its card, and its maps (made from
    the store's plain features) give the slide the tumour probability the fold predicted."""
    from histcode.finetune.maps import slide_maps

    c = small_signal_cohort
    run = run_finetune(
        c.features, "ctx", labels=c.labels, expression=c.expression, out=tmp_path / "run",
        registry=tmp_path / "registry", data=DataOptions(tasks=["tumour"], max_tiles=None),
        model=ModelOptions(hidden=16, tumour_pooling="top_share", tumour_context=True),
        cv=CVOptions(folds=3, register="folds", patience=3),
        trainer={**TRAINER_DEFAULTS, "accelerator": "cpu", "max_epochs": 3},
    )  # fmt: skip
    predictions = pd.read_csv(run.out / "predictions.csv")
    store = FeatureStore(c.features)
    registry = Registry(tmp_path / "registry")
    for k in range(3):
        model, card = registry.load(f"ctx@{k + 1}", builders=slide_model_builders())
        assert card.arguments["tumour_context"] is True and card.arguments["in_dim"] == 16
        row = predictions[predictions.fold == k].iloc[0]
        read = store.read(row.slide_id)
        maps = slide_maps(model.eval(), card, row.slide_id, read.coords, 224.0, read.features)
        assert maps.prediction["tumour_prob"] == pytest.approx(row.tumour_prob, abs=1e-5)
        assert maps.kind("tumour") == "tile_scorer"
        own = model.fraction_scorer.tiles(
            torch.from_numpy(read.features)[None], torch.ones(1, len(read), dtype=torch.bool)
        )
        np.testing.assert_allclose(maps.maps["tumour"], own[0].detach().numpy(), rtol=1e-5)


def test_genes_count_tumour_with_a_second_scorer_on_the_tiles_own_features() -> None:
    """With tumour-fraction genes, the genes read a scorer on the tiles' own features (context
    is relative to the slide's median tile, which counts badly), trained by loss ``fraction``
    at the scorer's learning rate."""
    from histcode.finetune.bags import BagBatch
    from histcode.finetune.module import MILModule

    torch.manual_seed(0)
    options = ModelOptions(hidden=16, tumour_pooling="top_share", tumour_context=True,
                           tumour_fraction_genes=True)  # fmt: skip
    module = MILModule(8, genes=["A", "B"], model=options)
    model = module.model.eval()
    assert model.fraction_scorer is not None and model.fraction_scorer.linear.in_features == 8
    torch.nn.init.normal_(model.fraction.linear.weight)  # the path starts at 0: give it weight
    x = torch.randn(2, 30, 32)
    out = model(x)
    assert out.fraction_logit.shape == (2,) and out.fraction_tile_logits.shape == (2, 30)
    moved = x.clone()
    moved[..., 8:] += torch.randn(2, 30, 24)
    again = model(moved)
    assert not torch.allclose(out.tumour_logit, again.tumour_logit)
    assert torch.equal(out.log2fc, again.log2fc)  # the genes never see the context columns
    plain = x.clone()
    plain[..., :8] += 1.0  # their own features move the genes through the fraction scorer
    assert not torch.allclose(model(plain).log2fc, out.log2fc)
    # exact maps: the slide's log2FC is its tiles' scores plus the head's bias
    scores = model.tile_scores(x)
    bias = model.head.linear.bias[1:3]
    assert torch.allclose(scores.log2fc.sum(1) + bias, out.log2fc, atol=1e-5)
    module.train()
    batch = BagBatch(
        slide_ids=["a", "b"], features=x, mask=torch.ones(2, 30, dtype=torch.bool),
        tumour=torch.tensor([1.0, 0.0]), log2fc=torch.zeros(2, 2),
        classes=torch.ones(2, 2, dtype=torch.long), categories=None,
    )  # fmt: skip
    terms = module.losses(batch, module(batch.features, batch.mask))
    assert {"tumour", "negatives", "fraction"} <= set(terms)
    groups = module.configure_optimizers().param_groups
    assert {id(p) for p in model.fraction_scorer.parameters()} <= {
        id(p) for p in groups[1]["params"]
    }


def test_context_map_shows_the_tumour_scorer_and_the_genes_keep_the_second() -> None:
    """``tumour_map context``: the tumour map is the context scorer's tile logits; the second
    scorer stays, trained (loss ``fraction``), and the genes' tumour fraction still reads it,
    so the gene maps stay exact and the outputs equal the ``own`` model's."""
    from histcode.finetune.bags import BagBatch
    from histcode.finetune.module import MILModule

    with pytest.raises(ValueError, match="tumour_context true"):
        ModelOptions(tumour_pooling="top_share", tumour_map="context")
    with pytest.raises(ValueError, match="'own' or 'context'"):
        ModelOptions(tumour_pooling="top_share", tumour_context=True, tumour_map="both")
    with pytest.raises(ValueError, match="tumour_map"):
        build_slide_model("abmil", 8, tumour_pooling="top_share", tumour_map="context")
    modules = {}
    for shown in ("own", "context"):
        torch.manual_seed(0)
        options = ModelOptions(hidden=16, tumour_pooling="top_share", tumour_context=True,
                               tumour_fraction_genes=True, tumour_map=shown)  # fmt: skip
        modules[shown] = MILModule(8, genes=["A", "B"], model=options)
    module = modules["context"]
    assert module.model_arguments()["tumour_map"] == "context"
    assert "tumour_map" not in modules["own"].model_arguments()  # the default: not on the card
    model, own = module.model.eval(), modules["own"].model.eval()
    assert model.fraction_scorer is not None and model.map_context and not own.map_context
    torch.nn.init.normal_(model.fraction.linear.weight)
    own.load_state_dict(model.state_dict())
    x = torch.randn(2, 30, 32)
    mask = torch.ones(2, 30, dtype=torch.bool)
    out, scores = model(x), model.tile_scores(x)
    assert torch.allclose(scores.tumour, model.tumour_path.tiles(x, mask))
    assert torch.allclose(own.tile_scores(x).tumour, model.fraction_scorer.tiles(x[..., :8], mask))
    assert torch.equal(out.log2fc, own(x).log2fc) and torch.equal(
        out.tumour_logit, own(x).tumour_logit
    )
    bias = model.head.linear.bias[1:3]
    assert torch.allclose(scores.log2fc.sum(1) + bias, out.log2fc, atol=1e-5)
    module.train()
    batch = BagBatch(
        slide_ids=["a", "b"], features=x, mask=mask, tumour=torch.tensor([1.0, 0.0]),
        log2fc=torch.zeros(2, 2), classes=torch.ones(2, 2, dtype=torch.long), categories=None,
    )  # fmt: skip
    assert {"tumour", "negatives", "fraction"} <= set(module.losses(batch, module(x, mask)))


def test_relative_scorer_reads_only_the_slide_relative_columns() -> None:
    """``tumour_relative``: the tumour scorer reads ``[x − med, m − med]`` (the last 2D of the
    context features), so what a whole slide shares moves nothing; it is on the card."""
    from histcode.finetune.module import MILModule

    with pytest.raises(ValueError, match="tumour_context"):
        ModelOptions(tumour_pooling="top_share", tumour_relative=True)
    with pytest.raises(ValueError, match="tumour_context"):
        build_slide_model("abmil", 8, tumour_pooling="top_share", tumour_relative=True)
    torch.manual_seed(0)
    options = ModelOptions(hidden=16, tumour_pooling="top_share", tumour_context=True,
                           tumour_relative=True)  # fmt: skip
    module = MILModule(8, genes=["A"], model=options)
    assert module.model_arguments()["tumour_relative"] is True
    plain = ModelOptions(hidden=16, tumour_pooling="top_share", tumour_context=True)
    assert "tumour_relative" not in MILModule(8, genes=["A"], model=plain).model_arguments()
    model = module.model.eval()
    path = model.tumour_path
    assert path.linear.in_features == 16 and path.skip == 16
    x = torch.randn(2, 30, 32)
    absolute = x.clone()
    absolute[..., :16] += torch.randn(2, 30, 16)
    assert torch.equal(model(absolute).tumour_logit, model(x).tumour_logit)
    relative = x.clone()
    relative[..., 16:] += torch.randn(2, 30, 16)
    assert not torch.allclose(model(relative).tumour_logit, model(x).tumour_logit)


def _site_confounded_slides(
    seed: int, n: int, confounded: bool
) -> tuple[list[np.ndarray], np.ndarray]:
    """Context features of ``n`` slides of 100 tiles (own D = 4): a tumour slide has 5
    neighbouring tiles shifted along dim 1; every tile of a slide from site "B" is shifted
    along dim 0. ``confounded``: every normal slide is from site B, every tumour slide from
    site A (as when a cohort's normals come from one site); else sites are drawn at random."""
    rng = np.random.default_rng(seed)
    coords = 64 * np.array([(i, j) for i in range(10) for j in range(10)])
    bags, labels = [], np.arange(n) % 2
    for y in labels:
        x = rng.normal(size=(100, 4)).astype(np.float32)
        if y:
            x[[44, 45, 54, 55, 46], 1] += 2.5
        site_b = (y == 0) if confounded else rng.random() < 0.5
        x[:, 0] += 2.0 * site_b
        bags.append(context_features(x, coords))
    return bags, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_relative_scorer_does_not_learn_the_site_of_the_normal_slides(seed: int) -> None:
    """Trained where every normal slide comes from one site, a warm-started scorer on all the
    context features scores the site (held-out slides of random sites: near chance), while
    one on the slide-relative half finds the tumour tiles."""
    from sklearn.metrics import roc_auc_score

    from histcode.finetune.heads import TopShareTumourPath
    from histcode.finetune.warmstart import warm_start

    train, y_train = _site_confounded_slides(seed, 24, confounded=True)
    test, y_test = _site_confounded_slides(seed + 100, 40, confounded=False)
    auc = {}
    for name, skip in (("all", 0), ("relative", 8)):
        torch.manual_seed(seed)
        path = TopShareTumourPath(16 - skip, share=0.05, skip=skip)
        warm_start(path, train, y_train, starts=3, epochs=30, seed=seed)
        every = torch.ones(1, 100, dtype=torch.bool)
        with torch.no_grad():
            scores = [float(path(torch.from_numpy(b)[None], every)[0]) for b in test]
        auc[name] = roc_auc_score(y_test, scores)
    assert auc["relative"] >= 0.9, auc
    assert auc["all"] <= auc["relative"] - 0.2, auc
