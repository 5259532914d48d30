"""The aggregation benchmark's methods on generated bags: they find a planted signal, never
see the test fold's labels, and stay near chance without signal (fast)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import aggregation as agg  # noqa: E402
from benchmarks.spec import Benchmark  # noqa: E402

#: Fewer epochs than the benchmark's 100 keep the top-share scorer fast here.
FAST = {"top_share_val": {"epochs": 30}, "top_share_all": {"epochs": 30}}


def cohort(
    slides: int = 36, tiles: int = 150, dim: int = 8, share: float = 0.03, shift: float = 4.0,
    seed: int = 0,
) -> dict:  # fmt: skip
    """Bags where each tumour slide has ``share`` of its tiles shifted along one direction.

    Returns:
        ``bags`` (each ``(tiles, dim)``), ``tiles`` (labels in {1, 0}), ``y`` ``(S,)``,
        ``folds`` ``(S,)`` (3 folds, both classes in each), ``sites`` ``(S,)`` (2 sites).
    """
    rng = np.random.default_rng(seed)
    y = np.tile([1, 1, 0], slides // 3)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    bags, labels = [], []
    for label in y:
        x = rng.normal(size=(tiles, dim)).astype(np.float32)
        t = np.zeros(tiles, dtype=np.int8)
        if label and shift:
            hit = rng.choice(tiles, max(1, round(share * tiles)), replace=False)
            x[hit] += shift * direction.astype(np.float32)
            t[hit] = 1
        bags.append(x)
        labels.append(t)
    folds = np.repeat(np.arange(3), len(y) // 3)
    sites = np.tile(["A", "B"], len(y) // 2)
    return {"bags": bags, "tiles": labels, "y": y, "folds": folds, "sites": sites}


def oof(name: str, c: dict, **extra) -> np.ndarray:
    spec = agg.METHODS[name]
    kwargs = {**spec.kwargs, **FAST.get(name, {}), **extra}
    return agg.out_of_fold(spec.fn, c["bags"], c["tiles"], c["y"], c["folds"], **kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the benchmark runs: tiny bags are many times slower on more."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def signal() -> dict:
    return cohort()


@pytest.mark.parametrize("name", list(agg.METHODS))
def test_every_method_finds_a_few_shifted_tiles_far_above_chance(signal, name) -> None:
    scores = oof(name, signal)
    fig = agg.score_slides(scores, signal["y"], signal["sites"], signal["folds"])
    floor = 0.9 if name in ("truth", "top_share_val", "top_share_all") else 0.8
    assert fig["auc"] >= floor, (name, fig)
    assert fig["within_site_auc"] >= floor - 0.1 and fig["sites"] == 2


@pytest.mark.parametrize("name", list(agg.METHODS))
def test_test_fold_labels_never_reach_a_method(signal, name) -> None:
    """Changing every slide and tile label of one fold leaves that fold's scores unchanged
    (and changes the others', which train on it)."""
    before = oof(name, signal)
    held = signal["folds"] == 1
    y = np.where(held, 1 - signal["y"], signal["y"])
    tiles = [1 - t if h else t for t, h in zip(signal["tiles"], held, strict=True)]
    after = oof(name, {**signal, "y": y, "tiles": tiles})
    np.testing.assert_array_equal(before[held], after[held])
    assert not np.allclose(before[~held], after[~held])


def test_a_method_is_given_only_training_slides_labels() -> None:
    c = cohort(slides=12, tiles=20)
    seen = []

    def spy(train, y_train, test, tiles_train, seed=0):
        seen.append((len(train), len(y_train), len(test), len(tiles_train)))
        return np.zeros(len(test))

    agg.out_of_fold(spy, c["bags"], c["tiles"], c["y"], c["folds"])
    assert seen == [(8, 8, 4, 8)] * 3


@pytest.mark.parametrize("name", list(agg.METHODS))
def test_without_signal_the_auc_is_near_chance(name) -> None:
    aucs = []
    for seed in range(3):
        c = cohort(slides=60, tiles=40, shift=0.0, seed=10 + seed)
        c["tiles"] = [np.where(np.arange(len(t)) < 2, 1, 0) for t in c["tiles"]]  # noise labels
        fig = agg.score_slides(oof(name, c, seed=seed), c["y"], c["sites"], c["folds"])
        aucs.append(fig["auc"])
    assert abs(np.mean(aucs) - 0.5) < 0.12, (name, aucs)  # null sd of a mean of 3: ~0.046


def test_scores_and_summary_and_section() -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    fig = agg.score_slides(
        np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.4]), y, np.array(list("AAABBB")), np.array([0] * 6)
    )
    assert fig["auc"] == pytest.approx(8 / 9) and fig["within_site_auc"] == pytest.approx(0.75)
    assert agg.top_share_mean(np.arange(100.0), 0.02) == 98.5
    assert agg.top_share_mean(np.array([3.0]), 0.02) == 3.0

    demo = {
        "pipeline": {"fold_auc": 0.4, "auc": 0.41, "within_site_auc": 0.38},
        "methods": {"truth": {"auc": 0.8, "within_site_auc": 0.85}},
    }
    other = {
        "pipeline": {"fold_auc": 0.5, "auc": 0.5, "within_site_auc": None},
        "methods": {"truth": {"auc": 0.6, "within_site_auc": 0.65}},
    }
    summary = agg.summarise([demo, other], ["truth"])
    assert summary["truth"]["auc"]["mean"] == pytest.approx(0.7)
    assert summary["truth"]["auc"]["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert summary["pipeline"]["within_site_auc"] == {
        "mean": 0.38, "sd": None, "n": 1, "values": [0.38, None],
    }  # fmt: skip
    result = {
        "benchmark": "aggregation", "arm": "simclr", "methods": ["truth"], "seed": 0,
        "what": {"truth": "ceiling"}, "seconds": 1.0, "summary": summary,
        "demos": [{"demo": "/x/d0", "dim": 64, "slides": 45, "patients": 30, **demo}],
    }  # fmt: skip
    lines = agg.SPEC.section.render({"status": "ok", "result": json.loads(json.dumps(result))})
    text = "\n".join(lines)
    assert "| truth | 0.70 ± 0.14 | 0.80 / 0.60 | 0.75 ± 0.14 | ceiling |" in text
    assert "| pipeline (its predictions.csv) | 0.46 ± 0.06 |" in text


def test_spec_is_a_benchmark_the_runner_can_call() -> None:
    assert isinstance(agg.SPEC, Benchmark) and agg.SPEC.name == "aggregation"
    assert agg.SPEC.goals and agg.SPEC.section is not None
    assert agg.SPEC.quick is None  # needs finished demos: left out of quick runs
