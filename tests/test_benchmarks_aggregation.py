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
FAST = {
    "top_share_val": {"epochs": 30},
    "top_share_all": {"epochs": 30},
    "fraction_truth": {"epochs": 30},
    "top_share_warm": {"starts": 2, "epochs": 30},
}


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


def _stained_foci(seed: int = 0, slides: int = 36, side: int = 12, dim: int = 6) -> dict:
    """Bags on a side × side grid: tumour slides have one 3 × 3 focus shifted weakly along a
    direction along which every slide also has its own strong offset (a stain cast)."""
    rng = np.random.default_rng(seed)
    y = np.tile([1, 1, 0], slides // 3)
    direction = np.eye(dim, dtype=np.float32)[0]
    grid = 64 * np.array([(i, j) for i in range(side) for j in range(side)])
    bags, labels, coords = [], [], []
    for label in y:
        x = rng.normal(size=(len(grid), dim)).astype(np.float32)
        x += rng.normal(scale=3.0) * direction  # the slide's cast
        t = np.zeros(len(grid), dtype=np.int8)
        if label:
            i, j = rng.integers(1, side - 2, size=2)
            hit = [(a * side + b) for a in range(i - 1, i + 2) for b in range(j - 1, j + 2)]
            x[hit] += 1.5 * direction
            t[hit] = 1
        bags.append(x)
        labels.append(t)
        coords.append(grid)
    folds = np.repeat(np.arange(3), len(y) // 3)
    return {"bags": bags, "tiles": labels, "y": y, "folds": folds, "coords": coords}


def test_the_context_view_finds_weak_foci_under_a_slide_cast_the_raw_view_misses() -> None:
    c = _stained_foci()
    data = agg.DemoData(
        slide_ids=[f"s{i}" for i in range(len(c["y"]))], bags=c["bags"], tile_labels=c["tiles"],
        slide_labels=c["y"], folds=c["folds"], sites=np.array(["A"] * len(c["y"])),
        patients=np.array([f"p{i}" for i in range(len(c["y"]))]),
        pipeline=np.zeros(len(c["y"])), features=Path("x.zarr"), coords=c["coords"],
    )  # fmt: skip
    assert agg.feature_view(data, "raw") is data
    seen = agg.feature_view(data, "context")
    assert seen.bags[0].shape == (144, 24) and seen.slide_labels is data.slide_labels
    aucs = {}
    for view, d in (("raw", data), ("context", seen)):
        scores = agg.out_of_fold(agg.truth_probe, d.bags, d.tile_labels, d.slide_labels, d.folds)
        aucs[view] = agg.score_slides(scores, d.slide_labels, d.sites, d.folds)["auc"]
    assert aucs["context"] >= 0.9 and aucs["context"] > aucs["raw"] + 0.15, aucs
    with pytest.raises(ValueError, match="choose from"):
        agg.feature_view(data, "pca")


def test_a_training_share_keeps_whole_patients_of_both_classes_and_never_test_slides() -> None:
    c = cohort(slides=24, tiles=20)
    patients = np.repeat(np.arange(12), 2)  # two slides a patient, folds split by patient
    c["folds"] = patients % 3
    seen: list[np.ndarray] = []

    def spy(train, y_train, test, tiles_train, seed=0):
        seen.append(np.array([next(i for i, b in enumerate(c["bags"]) if b is t) for t in train]))
        return np.zeros(len(test))

    for draw in range(3):
        agg.out_of_fold(
            spy, c["bags"], c["tiles"], c["y"], c["folds"],
            train_share=0.5, patients=patients, draw=draw,
        )  # fmt: skip
    assert len(seen) == 9
    for fold, got in zip([0, 1, 2] * 3, seen, strict=True):
        assert not set(c["folds"][got]) & {fold}  # the test fold never trains
        kept = set(patients[got].tolist())
        assert len(kept) == 4  # half of each fold's 8 training patients, whole
        assert set(got.tolist()) == set(np.flatnonzero(np.isin(patients, list(kept))).tolist())
        assert set(c["y"][got].tolist()) == {0, 1}
    assert len({tuple(g) for g in seen}) > 3  # draws and folds differ
    with pytest.raises(ValueError, match="both classes"):
        agg.training_subset(
            np.arange(4), np.arange(4), np.array([1, 1, 1, 1]), 0.5, np.random.default_rng(0)
        )  # no normal training patient: no draw can hold both classes


def test_the_learning_curve_is_reported_by_share() -> None:
    c = cohort(slides=36, tiles=60)
    data = agg.DemoData(
        slide_ids=[f"s{i}" for i in range(36)], bags=c["bags"], tile_labels=c["tiles"],
        slide_labels=c["y"], folds=c["folds"], sites=c["sites"],
        patients=np.array([f"p{i}" for i in range(36)]), pipeline=np.zeros(36),
        features=Path("x.zarr"),
    )  # fmt: skip
    entry = agg.run_demo(data, ["truth"], log=lambda m: None, train_shares=[0.5], draws=2)
    curve = entry["methods"]["truth"]["curve"]
    assert list(curve) == ["0.5", "1"] and curve["1"] == entry["methods"]["truth"]["auc"]
    assert 0.5 < curve["0.5"] <= 1.0
    result = {
        "arm": "simclr", "methods": ["truth"], "what": {"truth": "ceiling"}, "seed": 0,
        "draws": 2, "demos": [{"demo": "/x/d0", **entry}],
        "summary": agg.summarise([{"demo": "/x/d0", **entry}], ["truth"]),
    }  # fmt: skip
    text = "\n".join(agg.section({"result": result}))
    assert "| method | 50% of patients | 100% of patients |" in text
    assert f"| truth | {curve['0.5']:.2f} | {curve['1']:.2f} |" in text


def test_without_demos_the_benchmark_makes_them_and_reuses_finished_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make_demos`` (the benchmarks' path when given no DEMO) runs ``histcode demo`` once per
    seed into its own folder, and skips a folder whose summary says it finished."""
    import benchmarks.ceiling

    calls = []
    monkeypatch.setattr(benchmarks.ceiling, "histcode", lambda *args: calls.append(args) or {})
    done = tmp_path / "demo-hard-30p-s1"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"exit_code": 0}))
    failed = tmp_path / "demo-hard-30p-s2"
    failed.mkdir()
    (failed / "summary.json").write_text(json.dumps({"exit_code": 1}))
    folders = agg.make_demos(tmp_path, [0, 1, 2], 30, "hard")
    assert folders == [tmp_path / f"demo-hard-30p-s{s}" for s in (0, 1, 2)]
    assert [c[c.index("--seed") + 1] for c in calls] == ["0", "2"]
    assert all(c[0] == "demo" and c[c.index("--difficulty") + 1] == "hard" for c in calls)
    assert all(
        c[c.index("--out") + 1] == str(tmp_path / f"demo-hard-30p-s{c[c.index('--seed') + 1]}")
        for c in calls
    )


def test_a_demo_on_a_given_cohort_reads_that_cohorts_truth(tmp_path: Path) -> None:
    """A demo run with ``--cohort DIR`` has no ``cohort/`` of its own: the benchmarks read the
    truth from the folder its ``demo.json`` names; a demo that synthesised reads its own."""
    given = tmp_path / "my-cohort"
    ran = tmp_path / "demo-on-mine"
    ran.mkdir()
    (ran / "demo.json").write_text(json.dumps({"options": {"cohort": str(given), "seed": 0}}))
    assert agg.cohort_of(ran) == given
    made = tmp_path / "demo-synth"
    made.mkdir()
    (made / "demo.json").write_text(json.dumps({"options": {"cohort": None}}))
    assert agg.cohort_of(made) == made / "cohort"
    assert agg.cohort_of(tmp_path / "older-demo") == tmp_path / "older-demo" / "cohort"
