"""Every registered aggregator: forward / backward without NaN, padding-invariance, tile
scores, the CLAM instance loss, and a registry round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from histcode.builders import UnknownNameError
from histcode.finetune.aggregators import (
    CLAMSB,
    MILOutput,
    aggregators,
    create_aggregator,
    masked_softmax,
)
from histcode.finetune.heads import SlideModel, build_slide_model, slide_model_builders
from histcode.registry import Card, Registry

NAMES = aggregators.names()
TINY = {"transformer": {"heads": 2, "layers": 1}}


def test_registry_has_the_issue_aggregators() -> None:
    assert {"abmil", "clam_sb", "mean", "max", "transformer"} <= set(NAMES)
    with pytest.raises(UnknownNameError, match="Did you mean 'abmil'"):
        create_aggregator("abmi", in_dim=8)
    with pytest.raises(ValueError, match="does not take"):
        create_aggregator("mean", in_dim=8, heads=3)


def _bags(
    dim: int = 12, lengths: tuple[int, ...] = (9, 4, 1, 7)
) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    n = max(lengths)
    features = torch.randn(len(lengths), n, dim)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    features[~mask] = 123.0  # padding content must not matter
    return features, mask


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_no_nan(name: str) -> None:
    model = build_slide_model(name, 12, hidden=16, n_genes=3, options=TINY.get(name))
    features, mask = _bags()
    out = model(features, mask)
    assert out.tumour_logit.shape == (4,)
    assert out.log2fc.shape == (4, 3) and out.gene_logits.shape == (4, 3, 3)
    assert out.up_prob.shape == (4, 3) and out.up_logits.shape == (4, 3)
    loss = out.tumour_logit.sum() + out.log2fc.square().sum() + out.gene_logits.logsumexp(-1).sum()
    loss.backward()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert all(torch.isfinite(t).all() for t in (out.tumour_logit, out.log2fc, out.gene_logits))
    if out.attention is not None:
        assert torch.allclose(out.attention.sum(-1), torch.ones(4), atol=1e-5)
        assert (out.attention[~mask] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_batched_with_masks_equals_one_by_one(name: str) -> None:
    model = build_slide_model(name, 12, hidden=16, n_genes=2, options=TINY.get(name)).eval()
    features, mask = _bags()
    with torch.no_grad():
        batched = model(features, mask)
        for b in range(len(features)):
            n = int(mask[b].sum())
            alone = model(features[b : b + 1, :n])
            torch.testing.assert_close(alone.tumour_logit[0], batched.tumour_logit[b])
            torch.testing.assert_close(alone.log2fc[0], batched.log2fc[b])
            torch.testing.assert_close(alone.gene_logits[0], batched.gene_logits[b])
            if alone.attention is not None:
                torch.testing.assert_close(alone.attention[0], batched.attention[b, :n])


@pytest.mark.parametrize("name", NAMES)
def test_tile_scores(name: str) -> None:
    model = build_slide_model(name, 12, hidden=16, n_genes=2, options=TINY.get(name)).eval()
    features, mask = _bags()
    scores = model.tile_scores(features, mask)
    assert scores.tumour.shape == mask.shape and scores.log2fc.shape == (*mask.shape, 2)
    assert (scores.tumour[~mask] == 0).all()
    if name in ("abmil", "clam_sb", "mean"):  # exact: bias + Σ attention_i W h_i
        with torch.no_grad():
            out = model(features, mask)
        bias = model.head.linear.bias
        torch.testing.assert_close(scores.tumour.sum(1) + bias[0], out.tumour_logit)
        torch.testing.assert_close(scores.log2fc.sum(1) + bias[1:3], out.log2fc)


EXACT = [  # aggregators whose tile contributions add up to the slide outputs
    ("abmil", {}),
    ("abmil", {"branches": "per_task"}),
    ("abmil", {"normalise": "sigmoid"}),
    ("abmil", {"branches": "per_task", "gene_pooling": "mean"}),
    ("abmil", {"branches": "per_task", "gene_pooling": "sigmoid"}),
    ("clam_sb", {}),
    ("mean", {}),
    ("linear", {}),
]


@pytest.mark.parametrize("composition", [False, True], ids=["", "composition"])
@pytest.mark.parametrize(("name", "options"), EXACT, ids=lambda v: str(v))
def test_contributions_add_up_after_training(name: str, options: dict, composition: bool) -> None:
    """After training steps (the feature scaler active, weights moved), each tile's score
    summed over the bag plus the head's bias is the slide's tumour logit, log2FC and up-class
    logit — what the heatmaps call an exact contribution; with the composition path too."""
    torch.manual_seed(0)
    model = build_slide_model(
        name, 12, hidden=16, n_genes=2, options=options, composition=composition
    )
    features, mask = _bags()
    features = features * 0.05 + 2.0  # a small encoder's scale and offset: the scaler matters
    features[~mask] = 123.0
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(5):
        out = model(features, mask)
        loss = out.tumour_logit.square().mean() + (out.log2fc - 1).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    assert int(model.aggregator.scale.count) == 5 * int(mask.sum())
    with torch.no_grad():
        out = model(features, mask)
    scores = model.tile_scores(features, mask)
    bias = model.head.split(model.head.linear.bias.detach())
    torch.testing.assert_close(scores.tumour.sum(1) + bias.tumour_logit, out.tumour_logit)
    torch.testing.assert_close(scores.log2fc.sum(1) + bias.log2fc, out.log2fc)
    torch.testing.assert_close(scores.up.sum(1) + bias.gene_logits[..., 2], out.gene_logits[..., 2])


def test_masked_softmax_ignores_masked_scores() -> None:
    scores = torch.tensor([[1.0, 2.0, 1e9], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    weights = masked_softmax(scores, mask)
    torch.testing.assert_close(weights[0], torch.tensor([0.2689, 0.7311, 0.0]), atol=1e-4, rtol=0)
    assert (weights[1] == 0).all()


def test_clam_instance_loss_pseudo_labels() -> None:
    clam = CLAMSB(4, hidden=8, k=2)
    attention = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0]])
    mask = torch.tensor([[True] * 4 + [False], [True] * 4 + [False]])
    logits = torch.zeros(2, 5, requires_grad=True)
    loss = clam.instance_loss(attention, logits, mask, torch.tensor([1.0, 0.0]))
    loss.backward()
    # tumour slide: top-2 (tiles 0, 1) pushed up, bottom-2 (2, 3) down; normal slide: its
    # top-2 (tiles 3, 2) pushed down; padding untouched
    grad = logits.grad
    assert (grad[0, :2] < 0).all() and (grad[0, 2:4] > 0).all()
    assert (grad[1, 2:4] > 0).all() and (grad[1, :2] == 0).all() and (grad[:, 4] == 0).all()
    nothing = clam.instance_loss(attention, logits, mask, torch.tensor([float("nan")] * 2))
    assert nothing.item() == 0.0


def test_mil_output_is_a_dataclass() -> None:
    out = aggregators.create("abmil", in_dim=6, hidden=8)(torch.randn(2, 5, 6))
    assert isinstance(out, MILOutput) and out.embedding.shape == (2, 8)


def test_registry_round_trip(tmp_path: Path) -> None:
    model = build_slide_model("transformer", 12, hidden=16, n_genes=2, options={"layers": 1})
    arguments = {"in_dim": 12, "hidden": 16, "dropout": 0.25, "tumour": True, "n_genes": 2}
    arguments["options"] = {"layers": 1}
    registry = Registry(tmp_path)
    ref = registry.save(
        "mil", model, Card(kind="mil", architecture="transformer", arguments=arguments)
    )
    loaded, card = registry.load(ref, builders=slide_model_builders())
    assert isinstance(loaded, SlideModel) and card.kind == "mil"
    features, mask = _bags()
    torch.testing.assert_close(loaded(features, mask).log2fc, model.eval()(features, mask).log2fc)


def test_abmil_sigmoid_weights_keep_fractions_and_contributions_add_up() -> None:
    """``normalise: sigmoid``: weight_i = sigmoid(score_i) / n_tiles; a bag padded or not gives
    the same; doubling a bag's tiles keeps the embedding (a mean), while a bag with more of one
    tile kind moves toward it; tile contributions still sum to the slide logit."""
    torch.manual_seed(0)
    model = build_slide_model("abmil", 12, hidden=16, options={"normalise": "sigmoid"}).eval()
    features, mask = _bags()
    out = model(features, mask)
    assert (out.attention.sum(-1) <= 1 + 1e-6).all() and (out.attention[~mask] == 0).all()
    single = model(features[:1, :9])
    assert torch.allclose(single.tumour_logit, out.tumour_logit[:1], atol=1e-5)
    doubled = model(torch.cat([features[:1, :9], features[:1, :9]], 1))
    assert torch.allclose(doubled.embedding, single.embedding, atol=1e-5)
    scores = model.tile_scores(features, mask)
    total = scores.tumour.sum(-1) + model.head.linear.bias[0]
    assert torch.allclose(total, out.tumour_logit, atol=1e-5)
    with pytest.raises(ValueError, match="'softmax', 'sigmoid', 'mean'"):
        create_aggregator("abmil", in_dim=8, normalise="relu")


def test_per_task_attention_gives_every_task_its_own_branch() -> None:
    """abmil ``branches: per_task``: one attention per task (tumour, each gene), each a softmax
    over the bag's tiles; padding changes nothing; each output's tile contributions add up to
    it; and a task's branch moves only that task's outputs."""
    torch.manual_seed(0)
    model = build_slide_model("abmil", 12, hidden=16, n_genes=3, options={"branches": "per_task"})
    model.eval()
    assert model.aggregator.branches == 4
    features, mask = _bags()
    out = model(features, mask)
    pooled = model.aggregator(features, mask)
    assert pooled.branch_attention.shape == (4, 4, features.shape[1])
    assert torch.allclose(pooled.branch_attention.sum(-1), torch.ones(4, 4), atol=1e-5)
    assert (pooled.branch_attention.transpose(0, 1)[:, ~mask] == 0).all()
    assert torch.equal(out.attention, pooled.branch_attention[:, 0])  # the tumour branch
    for b, n in enumerate(mask.sum(-1).tolist()):
        one = model(features[b : b + 1, :n])
        assert torch.allclose(one.log2fc, out.log2fc[b : b + 1], atol=1e-5)
        assert torch.allclose(one.tumour_logit, out.tumour_logit[b : b + 1], atol=1e-5)
    scores = model.tile_scores(features, mask)
    bias = model.head.linear.bias
    assert torch.allclose(scores.tumour.sum(-1) + bias[0], out.tumour_logit, atol=1e-5)
    assert torch.allclose(scores.log2fc.sum(1) + bias[1:4], out.log2fc, atol=1e-5)
    up_bias = bias[4:].view(3, 3)[:, 2]
    assert torch.allclose(scores.up.sum(1) + up_bias, out.gene_logits[..., 2], atol=1e-5)
    with torch.no_grad():  # change gene 1's branch (task 2): only gene 1 moves
        model.aggregator.attention.score.weight[2] += 3.0
    moved = model(features, mask)
    assert torch.allclose(moved.tumour_logit, out.tumour_logit)
    assert torch.allclose(moved.log2fc[:, [0, 2]], out.log2fc[:, [0, 2]])
    assert not torch.allclose(moved.log2fc[:, 1], out.log2fc[:, 1])


@pytest.mark.parametrize("pooling", ["mean", "sigmoid"])
def test_gene_pooling_keeps_how_much_tissue_a_slide_has(pooling: str) -> None:
    """With per-task abmil, ``gene_pooling`` mean / sigmoid weighs each gene's tiles by at most
    1/n (the tumour branch keeps softmax, summing to 1): a slide with twice as many tiles of
    the kind a gene follows moves that gene's embedding (about) twice as far from the
    background's."""
    torch.manual_seed(0)
    model = build_slide_model(
        "abmil", 4, hidden=8, n_genes=1, options={"branches": "per_task", "gene_pooling": pooling}
    ).eval()
    background, marked = torch.zeros(4), torch.tensor([3.0, 0.0, 0.0, 0.0])
    few = torch.stack([marked] * 2 + [background] * 18)[None]  # 10 % marked tiles
    many = torch.stack([marked] * 4 + [background] * 16)[None]  # 20 %
    none = background.expand(1, 20, 4)
    with torch.no_grad():
        out = {k: model.aggregator(x) for k, x in (("few", few), ("many", many), ("none", none))}
    tumour_weights = out["few"].branch_attention[0, 0]
    assert float(tumour_weights.sum()) == pytest.approx(1.0, abs=1e-5)  # softmax
    gene_weights = out["few"].branch_attention[0, 1]
    assert float(gene_weights.max()) <= 1 / 20 + 1e-6
    if pooling == "mean":
        torch.testing.assert_close(gene_weights, torch.full((20,), 1 / 20))
    gene = {k: o.branch_embeddings[0, 1] for k, o in out.items()}
    step_few, step_many = gene["few"] - gene["none"], gene["many"] - gene["none"]
    if pooling == "mean":  # exactly twice as far
        torch.testing.assert_close(step_many, 2 * step_few)
    else:
        assert step_many.norm() > 1.5 * step_few.norm()


def test_composition_path_is_linear_in_tissue_composition() -> None:
    """The composition path adds ``W · mean(x̂)`` to the gene outputs only: zero at
    initialisation (the model is the attention model alone), then linear in the share of
    tiles of a kind — twice the share moves a gene twice as far — while the tumour logit
    never sees it. Cards without ``composition`` build the model without it."""
    from histcode.finetune.module import MILModule
    from histcode.finetune.options import ModelOptions

    torch.manual_seed(0)
    plain = build_slide_model("abmil", 4, hidden=8, n_genes=2, options={"branches": "per_task"})
    model = build_slide_model(
        "abmil", 4, hidden=8, n_genes=2, options={"branches": "per_task"}, composition=True
    )
    assert plain.composition is None
    background, marked = torch.zeros(4), torch.tensor([3.0, 0.0, 0.0, 0.0])
    bags = [torch.stack([marked] * k + [background] * (20 - k))[None] for k in (0, 2, 4)]
    model.train()(torch.cat(bags), None)  # scaler statistics
    model.eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("composition.")}
    plain.load_state_dict(state)
    plain.eval()
    torch.testing.assert_close(model(bags[1]).log2fc, plain(bags[1]).log2fc)  # W starts at 0
    with torch.no_grad():
        model.composition.linear.weight.normal_()
        outs = [model(b) for b in bags]
        plains = [plain(b) for b in bags]
    steps = [o.log2fc - p.log2fc for o, p in zip(outs, plains, strict=True)]
    torch.testing.assert_close(steps[2] - steps[0], 2 * (steps[1] - steps[0]))
    for o, p in zip(outs, plains, strict=True):
        torch.testing.assert_close(o.tumour_logit, p.tumour_logit)

    module = MILModule(4, True, ["MYC"], ModelOptions(hidden=8, composition=True))
    assert module.model_arguments()["composition"] is True
    assert module.model.composition is not None
    tumour_only = MILModule(4, True, [], ModelOptions(hidden=8, composition=True))
    assert tumour_only.model.composition is None  # no genes, no path


def test_gene_pooling_is_refused_for_other_aggregators() -> None:
    """gene_pooling is abmil's: another aggregator gets the message naming the fix, not a
    keyword error from deep inside, even where one task makes 'branches' look per-task."""
    with pytest.raises(ValueError, match="gene_pooling 'sigmoid' needs abmil"):
        build_slide_model("mean", 8, tumour=False, n_genes=1, options={"gene_pooling": "sigmoid"})


def test_attention_branch_options() -> None:
    shared = build_slide_model("abmil", 12, hidden=16, n_genes=3, options={"branches": "shared"})
    assert shared.aggregator.branches == 1
    # cards written before branches existed have no such option: one shared attention
    assert build_slide_model("abmil", 12, hidden=16, n_genes=3).aggregator.branches == 1
    with pytest.raises(ValueError, match=r"'shared'.*'per_task'"):
        build_slide_model("abmil", 12, n_genes=2, options={"branches": "each"})
    with pytest.raises(ValueError, match="only abmil"):
        build_slide_model("clam_sb", 12, n_genes=2, options={"branches": "per_task"})


def test_model_options_record_the_attention_in_the_card_arguments() -> None:
    from histcode.finetune.module import MILModule
    from histcode.finetune.options import ModelOptions

    module = MILModule(12, True, ["MYC", "CD8A"], ModelOptions(hidden=16))
    assert module.model_arguments()["options"] == {
        "branches": "per_task",
        "gene_pooling": "softmax",
    }
    assert module.model.aggregator.branches == 3
    additive = MILModule(12, True, ["MYC", "CD8A"], ModelOptions(hidden=16, gene_pooling="mean"))
    assert additive.model_arguments()["options"]["gene_pooling"] == "mean"
    assert additive.model.aggregator.per_branch == ["softmax", "mean", "mean"]
    shared = MILModule(12, True, ["MYC"], ModelOptions(hidden=16, attention="shared"))
    assert shared.model.aggregator.branches == 1
    mean = MILModule(12, True, ["MYC"], ModelOptions(aggregator="mean", hidden=16))
    assert mean.model_arguments()["options"] == {}  # only abmil has branches
    with pytest.raises(ValueError, match="per_task' or 'shared"):
        ModelOptions(attention="each")


@pytest.mark.parametrize("name", ["abmil", "mean", "max", "transformer", "linear"])
def test_features_are_standardised_with_training_tiles_only(name: str) -> None:
    """The FeatureScaler learns the training tiles' mean and sd (padding excluded), is fixed in
    eval mode, and makes the aggregator blind to the encoder's feature scale and offset."""
    from histcode.finetune.aggregators import FeatureScaler

    features, mask = _bags()
    scaler = FeatureScaler(12)
    out = scaler(features, mask)  # training mode: learns from the 21 real tiles
    assert scaler.count == int(mask.sum())
    torch.testing.assert_close(out[mask].mean(0), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[mask].std(0, unbiased=False), torch.ones(12), atol=1e-3, rtol=0)
    scaler.eval()
    scaler(features * 5, mask)
    assert scaler.count == int(mask.sum())  # eval never updates

    torch.manual_seed(0)
    model = build_slide_model(name, 12, hidden=16, n_genes=2, options=TINY.get(name))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()(features, mask)
    reference = model.eval()(features, mask).log2fc
    model.load_state_dict(state)
    model.train()(features * 10 + 3, mask)  # another encoder's scale and offset
    torch.testing.assert_close(model.eval()(features * 10 + 3, mask).log2fc, reference)


@pytest.mark.parametrize("dead", [0.0, 0.37, -2.5])
def test_a_feature_constant_in_training_is_centred_not_blown_up(dead: float) -> None:
    """A channel the training tiles hold constant (a dead ReLU, a constant offset) gets unit
    scale, as scikit-learn does: a held-out tile that differs there by 1 moves by 1, not by
    ~1 / 2e-6 = 5e5 sds. The other channels are still standardised."""
    from histcode.finetune.aggregators import FeatureScaler

    features, mask = _bags()
    features[..., 3] = dead
    features = features.half().float()  # as read from a float16 feature store
    scaler = FeatureScaler(12)
    scaler(features, mask)
    held_out = features[:1, :2].clone()
    held_out[..., 3] += 1.0
    out = scaler.eval()(held_out, mask[:1, :2])
    torch.testing.assert_close(out[..., 3], torch.ones(1, 2), atol=1e-5, rtol=0)
    mean, scale = scaler.statistics()
    assert scale[3] == 1.0 and mean[3] == pytest.approx(dead, abs=1e-3)
    live = torch.arange(12) != 3
    real = features[mask][:, live]
    torch.testing.assert_close(scale[live].float(), real.std(0, unbiased=False), rtol=1e-4, atol=0)


def test_models_saved_before_the_scaler_still_load() -> None:
    """State dicts without the scaler's buffers load as the identity (what they were trained
    with); the linear baseline's old buffer names map onto its scaler."""
    torch.manual_seed(0)
    model = build_slide_model("abmil", 12, hidden=16, n_genes=2).eval()
    old = {k: v for k, v in model.state_dict().items() if ".scale." not in k}
    fresh = build_slide_model("abmil", 12, hidden=16, n_genes=2).eval()
    fresh.load_state_dict(old)
    assert fresh.aggregator.scale.count == 0
    features, mask = _bags()
    torch.testing.assert_close(fresh(features, mask).log2fc, model(features, mask).log2fc)

    linear = build_slide_model("linear", 12, n_genes=2)
    linear.train()(features, mask)
    renamed = {
        k.replace("aggregator.scale.", "aggregator."): v for k, v in linear.state_dict().items()
    }
    loaded = build_slide_model("linear", 12, n_genes=2)
    loaded.load_state_dict(renamed)
    torch.testing.assert_close(loaded.aggregator.scale.total, linear.aggregator.scale.total)
