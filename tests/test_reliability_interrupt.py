"""Reliability, part 2: ``kill -9`` and concurrent runs lose no work.

Each row of :data:`SCENARIOS` is one test below (``test_`` + the row's name, ``/`` and ``-``
as ``_``), except the registry row, which is the test it names (it already runs in the
default tier, so it is referenced rather than duplicated).

The first run of each scenario is a real child process running the CLI. To make the moment of
the kill or of the overlap certain rather than lucky, the child runs the CLI with one thing
slowed down — each slide's final rename waits (a slow disk), or each training step does (a
slow accelerator) — and the test waits until it sees the work it wants to interrupt on disk.
``kill -9`` then ends the process at once (no handler runs), and the rerun must complete the
work, keep what was finished, and give the same outputs as an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from histcode.cli import main as cli_main
from histcode.embedding import embed_store
from histcode.featurestore import FeatureStore
from histcode.registry import Registry
from histcode.tilestore import TileStore

PRETRAIN_CONFIGS = Path(__file__).resolve().parents[1] / "histcode" / "configs" / "pretrain"

#: name → (the fault it tries, a key of test_reliability.FAULTS; what must happen)
SCENARIOS: dict[str, tuple[str, str]] = {
    "tile/kill-9-then-rerun": (
        "kill -9 during tile",
        "killed while a slide is half written; the rerun keeps the finished slides, redoes the "
        "half-written one, leaves no staging folder, and equals an uninterrupted run",
    ),
    "embed/kill-9-then-rerun": (
        "kill -9 during embed",
        "killed while a slide's features are half written; the rerun keeps the finished "
        "slides, and its features equal an uninterrupted run's",
    ),
    "pretrain/kill-9-then-resume": (
        "kill -9 during pretrain",
        "killed between checkpoints; nothing is registered; the rerun resumes from last.ckpt "
        "(the step count goes on, it does not start over) and registers the encoder once",
    ),
    "tile/two-runs-at-once": (
        "two runs writing one tile store",
        "the second is refused at once (exit 2, names the first run's pid); the first completes",
    ),
    "embed/two-runs-at-once": (
        "two runs writing one feature store",
        "the second is refused at once (exit 2); the first completes",
    ),
    "embed/whole-store-run-during-a-shard-run": (
        "two runs writing one feature store",
        "the whole-store run is refused (exit 2) and does not delete the shard's half-written "
        "slide; the shard completes",
    ),
    "embed/two-shards-at-once": (
        "two runs writing one feature store",
        "both succeed; together they equal an unsharded run",
    ),
    "embed/shard-waits-while-another-sets-up-the-store": (
        "two runs writing one feature store",
        "a shard starting while another creates the store waits its turn, then succeeds",
    ),
    "registry/saves-from-many-processes": (
        "registry saves from many processes",
        "tests/histcode/test_registry.py::test_concurrent_saves_get_distinct_versions",
    ),
}
#: rows whose test lives elsewhere: name → the module and test function
ELSEWHERE = {
    "registry/saves-from-many-processes": (
        "tests.histcode.test_registry",
        "test_concurrent_saves_get_distinct_versions",
    ),
}

#: runs the CLI with each slide's final rename delayed by $COMMIT_DELAY seconds (a slow disk)
SLOW_COMMIT = """
import os, sys, time
from histcode.zarrstore import SlideStore
commit = SlideStore.commit
def slow_commit(self, *args, **kwargs):
    time.sleep(float(os.environ["COMMIT_DELAY"]))
    return commit(self, *args, **kwargs)
SlideStore.commit = slow_commit
from histcode.cli import main
sys.exit(main(sys.argv[1:]))
"""

#: runs the CLI with each training step taking $STEP_DELAY seconds more (a slow accelerator)
SLOW_STEPS = """
import os, sys, time
from histcode.pretrain.module import SimCLRModule
end = SimCLRModule.on_train_batch_end
def slow_step(self, *args, **kwargs):
    time.sleep(float(os.environ["STEP_DELAY"]))
    return end(self, *args, **kwargs)
SimCLRModule.on_train_batch_end = slow_step
from histcode.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Child:
    """The CLI in a child process, its output in a file."""

    def __init__(self, code: str, argv: list[str], log: Path, **env: str) -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, ready: Callable[[], object], what: str, timeout: float = 120) -> None:
        """Poll ``ready`` until it is true while the child still runs."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive():
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before {what}:\n"
                            f"{self.output()[-3000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def kill9(self) -> None:
        assert self.alive(), "the run had already ended: nothing was interrupted"
        os.kill(self.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not end in {timeout} s:\n{self.output()[-3000:]}")


@pytest.fixture()
def start(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start children; any still running at the end of the test is killed."""
    children: list[Child] = []

    def start_child(code: str, argv: list[str], **env: str) -> Child:
        child = Child(code, [str(a) for a in argv], tmp_path / f"child{len(children)}.log", **env)
        children.append(child)
        return child

    yield start_child
    for child in children:
        if child.alive():
            child.proc.kill()
            child.proc.wait()


def staging(store: Path) -> list[Path]:
    """Half-written slides (hidden staging groups) in a store."""
    return list(store.glob(".partial-*")) if store.is_dir() else []


def run_cli(
    argv: list[str | Path], capsys: pytest.CaptureFixture[str], caplog
) -> tuple[int, str, str]:
    """Run the CLI in this process: exit status, stdout, and stdout + stderr + log."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.out + captured.err + caplog.text


def good_slides(small_cohort: dict[str, Path]) -> list[Path]:
    return sorted(small_cohort["slides"].glob("TCGA-*"))


def tile_argv(slides: list[Path], out: Path) -> list[str | Path]:
    return ["tile", "--slides", *slides, "--out", out, "--mpp", "1.0", "--tile_size", "64",
            "--progress", "false"]  # fmt: skip


def embed_argv(tiles: Path, out: Path, *extra: str) -> list[str | Path]:
    return ["embed", "--tiles", tiles, "--out", out, "--encoder", "tiny", "--workers", "0",
            "--progress", "false", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference_features(
    small_cohort: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> FeatureStore:
    """An uninterrupted, unsharded embedding of the small cohort (``tiny``, seed 0)."""
    out = tmp_path_factory.mktemp("reference") / "features.zarr"
    embed_store(small_cohort["tiles"], out, "tiny", workers=0, progress=False)
    return FeatureStore(out)


def assert_same_tiles(store: TileStore, reference: TileStore, slide_ids: list[str]) -> None:
    assert store.slide_ids() == sorted(slide_ids)
    for sid in slide_ids:
        a, b = store.read(sid), reference.read(sid)
        assert a.attrs == b.attrs, sid
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.tissue, b.tissue)


def assert_same_features(
    store: FeatureStore, reference: FeatureStore, slide_ids: list[str] | None = None
) -> None:
    slide_ids = reference.slide_ids() if slide_ids is None else slide_ids
    assert store.slide_ids() == sorted(slide_ids)
    for sid in slide_ids:
        a, b = store.read(sid), reference.read(sid)
        assert a.status == b.status and a.attrs.get("error") == b.attrs.get("error"), sid
        np.testing.assert_array_equal(a.coords, b.coords)
        # another process may sum in another order: equal up to float rounding
        np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)
    assert not staging(store.path)


# -- kill -9 ------------------------------------------------------------------------------------


def test_tile_kill_9_then_rerun(
    small_cohort: dict[str, Path], tmp_path: Path, start, capsys, caplog
) -> None:
    slides = good_slides(small_cohort)
    out = tmp_path / "tiles.zarr"
    argv = tile_argv(slides, out)
    store = TileStore(out)
    child = start(SLOW_COMMIT, argv, COMMIT_DELAY="0.5")
    child.wait_until(
        lambda: store.slide_ids() and staging(out), "a finished slide and one half written"
    )
    child.kill9()
    finished = store.slide_ids()
    assert 1 <= len(finished) < len(slides) and staging(out)  # killed mid-way, mid-write

    code, _, text = run_cli(argv, capsys, caplog)
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert [s["slide_id"] for s in summary["slides"] if s["skipped"]] == finished  # kept
    assert not staging(out)
    assert_same_tiles(store, TileStore(small_cohort["tiles"]), [p.stem for p in slides])


def test_embed_kill_9_then_rerun(
    small_cohort: dict[str, Path],
    reference_features: FeatureStore,
    tmp_path: Path,
    start,
    capsys,
    caplog,
) -> None:
    out = tmp_path / "features.zarr"
    argv = embed_argv(small_cohort["tiles"], out)
    store = FeatureStore(out)
    child = start(SLOW_COMMIT, argv, COMMIT_DELAY="0.5")
    child.wait_until(
        lambda: store.slide_ids() and staging(out), "a finished slide and one half written"
    )
    child.kill9()
    finished = store.slide_ids()
    assert 1 <= len(finished) < len(reference_features.slide_ids()) and staging(out)

    code, _, text = run_cli(argv, capsys, caplog)
    assert code == 1, text  # the cohort's broken slide failed tiling: carried over as failed
    summary = json.loads((out / "summary.json").read_text())
    kept = [s for s in finished if store.status(s) == "ok"]
    assert [s["slide_id"] for s in summary["slides"] if s["skipped"]] == kept
    assert summary["result"]["tiles_embedded"] == sum(
        len(reference_features.read(s)) for s in reference_features.slide_ids() if s not in kept
    )
    assert_same_features(store, reference_features)


def _ckpt_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1


def test_pretrain_kill_9_then_resume(
    small_cohort: dict[str, Path], tmp_path: Path, start, capsys, caplog
) -> None:
    out, registry = tmp_path / "run", tmp_path / "registry"
    argv = [
        "pretrain",
        "--config", PRETRAIN_CONFIGS / "simclr.yaml",
        "--config", PRETRAIN_CONFIGS / "cpu_smoke.yaml",
        "--data.tiles", small_cohort["tiles"],
        "--data.batch_size", "4",
        "--name", "resumed",
        "--registry", registry,
        "--out", out,
        "--trainer.max_steps", "6",
        "--checkpoint.every_n_train_steps", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    ckpt = out / "checkpoints" / "last.ckpt"
    child = start(SLOW_STEPS, argv, STEP_DELAY="0.5")
    child.wait_until(lambda: ckpt.is_file() and _ckpt_step(ckpt) >= 2, "a checkpoint")
    child.kill9()
    at = _ckpt_step(ckpt)
    assert 2 <= at < 6, f"the checkpoint is at step {at}"
    assert not Registry(registry).names()  # an interrupted run registers nothing

    code, out_line, text = run_cli(argv, capsys, caplog)
    assert code == 0, text
    assert f"resuming from {ckpt} (step {at})" in text
    result = json.loads(out_line.strip().splitlines()[-1])
    assert result["ref"] == "resumed@1" and result["steps"] == 6
    assert Registry(registry).versions("resumed") == [1]
    card = Registry(registry).card("resumed@1")
    assert card.metrics["steps"] == 6 and card.metrics["tiles_seen"] == 6 * 4
    logs = sorted(out.glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[1]))
    with (logs[-1] / "metrics.csv").open() as f:
        steps = sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("train_loss"))
    assert steps == list(range(at, 6)), "the rerun did not continue from the checkpoint"


# -- concurrency ----------------------------------------------------------------------------------


def test_tile_two_runs_at_once(
    small_cohort: dict[str, Path], tmp_path: Path, start, capsys, caplog
) -> None:
    slides = good_slides(small_cohort)
    out = tmp_path / "tiles.zarr"
    argv = tile_argv(slides, out)
    first = start(SLOW_COMMIT, argv, COMMIT_DELAY="0.5")
    first.wait_until(lambda: staging(out), "the first run writing")

    code, _, text = run_cli(argv, capsys, caplog)
    assert code == 2
    assert f"is being written by another run (pid {first.pid})" in text
    assert "Wait for it to finish, or write to another --out" in text
    assert first.alive(), "the runs did not overlap"
    assert first.finish() == 0, first.output()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"]["ok"] == len(slides) and summary["result"]["skipped"] == 0
    assert_same_tiles(TileStore(out), TileStore(small_cohort["tiles"]), [p.stem for p in slides])


def test_embed_two_runs_at_once(
    small_cohort: dict[str, Path],
    reference_features: FeatureStore,
    tmp_path: Path,
    start,
    capsys,
    caplog,
) -> None:
    out = tmp_path / "features.zarr"
    argv = embed_argv(small_cohort["tiles"], out)
    first = start(SLOW_COMMIT, argv, COMMIT_DELAY="0.5")
    first.wait_until(lambda: staging(out), "the first run writing")

    code, _, text = run_cli(argv, capsys, caplog)
    assert code == 2
    assert f"is being written by another run (pid {first.pid})" in text
    assert first.alive(), "the runs did not overlap"
    assert first.finish() == 1, first.output()  # the broken slide
    assert_same_features(FeatureStore(out), reference_features)


def test_embed_whole_store_run_during_a_shard_run(
    small_cohort: dict[str, Path],
    reference_features: FeatureStore,
    tmp_path: Path,
    start,
    capsys,
    caplog,
) -> None:
    out = tmp_path / "features.zarr"
    shard = start(SLOW_COMMIT, embed_argv(small_cohort["tiles"], out, "--shard", "0/2"),
                  COMMIT_DELAY="0.5")  # fmt: skip
    shard.wait_until(lambda: staging(out), "the shard writing")
    half_written = staging(out)

    code, _, text = run_cli(embed_argv(small_cohort["tiles"], out), capsys, caplog)
    assert code == 2
    assert "is being written by another run" in text and "Wait for it to finish" in text
    assert all(p.exists() for p in half_written) or not shard.alive()  # not cleaned away
    assert shard.alive(), "the runs did not overlap"
    assert shard.finish() == 0, shard.output()
    mine = reference_features.slide_ids()[0::2]
    assert_same_features(FeatureStore(out), reference_features, mine)


def test_embed_two_shards_at_once(
    small_cohort: dict[str, Path],
    reference_features: FeatureStore,
    tmp_path: Path,
    start,
    capsys,
    caplog,
) -> None:
    out = tmp_path / "features.zarr"
    first = start(SLOW_COMMIT, embed_argv(small_cohort["tiles"], out, "--shard", "0/2"),
                  COMMIT_DELAY="1.5")  # fmt: skip
    first.wait_until(lambda: staging(out), "shard 0 writing")

    code, _, text = run_cli(
        embed_argv(small_cohort["tiles"], out, "--shard", "1/2"), capsys, caplog
    )
    assert code == 1, text  # shard 1 holds the broken slide
    assert first.alive(), "the shards did not overlap"
    assert first.finish() == 0, first.output()
    assert_same_features(FeatureStore(out), reference_features)


def test_embed_shard_waits_while_another_sets_up_the_store(
    small_cohort: dict[str, Path], reference_features: FeatureStore, tmp_path: Path, start
) -> None:
    out = tmp_path / "features.zarr"
    store = FeatureStore(out)
    with store.setup_lock():  # as another shard creating the store at this moment would
        shard = start(SLOW_COMMIT, embed_argv(small_cohort["tiles"], out, "--shard", "0/2"),
                      COMMIT_DELAY="0")  # fmt: skip
        lock = out / ".lock-shard0of2"
        shard.wait_until(
            lambda: lock.is_file() and lock.read_text() == str(shard.pid), "the shard's lock"
        )
        time.sleep(0.5)
        assert shard.alive(), f"the shard did not wait:\n{shard.output()[-3000:]}"
        assert not store.exists()
    assert shard.finish() == 0, shard.output()
    assert_same_features(store, reference_features, reference_features.slide_ids()[0::2])


# -- the table ------------------------------------------------------------------------------------


def test_every_scenario_is_a_test() -> None:
    """Each row of the table is a test function here, or the test it names elsewhere."""
    import importlib

    for name in SCENARIOS:
        if name in ELSEWHERE:
            module, function = ELSEWHERE[name]
            test = getattr(importlib.import_module(module), function)
            marks = {m.name for m in getattr(test, "pytestmark", [])}
            assert not marks & {"slow", "gpu", "skip"}, f"{module}.{function} is not run by default"
            assert SCENARIOS[name][1].endswith(function)
        else:
            function = "test_" + name.replace("/", "_").replace("-", "_")
            assert callable(globals().get(function)), f"no {function} for the row {name!r}"
