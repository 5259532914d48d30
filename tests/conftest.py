"""Shared fixtures: small generated slides and their tile store, made once per session."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from histcode.tiling import TilingParams, tile_slides


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_unchanged() -> Iterator[None]:
    """Fail a test module that leaves torch's thread count changed.

    Float reductions depend on the number of threads, so a count one module left at 1 would
    change the figures of every later test: CI's end-to-end demo ran on 1 thread for this
    reason (session 14) and its pretraining differed from a user's run of the same seed.
    """
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        after = torch.get_num_threads()
        torch.set_num_threads(before)
        pytest.fail(f"the module left torch on {after} thread(s) (was {before}); restore it")


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a test's gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three 1.2 × 1 mm slides (20x SVS, 40x SVS, generic TIFF) and a not-a-slide file.

    Returns:
        ``{"slides": folder, "tiles": tiles.zarr}``; the tile store is at 1 µm/px, 64 px
        tiles so that encoders run fast on CPU.
    """
    from histcode.synth import write_test_slide

    root = tmp_path_factory.mktemp("small_cohort")
    slides = root / "slides"
    slides.mkdir()
    write_test_slide(
        slides / "TCGA-S1-0001-01A-01-TS1.svs", width_um=1200, height_um=1000, mpp=0.5, seed=11
    )
    write_test_slide(
        slides / "TCGA-S2-0002-11A-01-TS1.svs", width_um=1200, height_um=1000, mpp=0.25, seed=12
    )
    write_test_slide(
        slides / "TCGA-S3-0003-01A-01-TS1.tiff",
        width_um=1200,
        height_um=1000,
        mpp=0.5,
        seed=13,
        fmt="tiff",
    )
    (slides / "broken.svs").write_text("not a slide")
    tiles = root / "tiles.zarr"
    tile_slides([slides], tiles, TilingParams(mpp=1.0, tile_size=64), progress=False)
    return {"slides": slides, "tiles": tiles}
