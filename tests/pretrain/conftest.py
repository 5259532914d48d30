"""Fixtures of the pretrain tests: a few generated slides tiled small (64 px at 2 µm/px)."""

from __future__ import annotations

from pathlib import Path

import pytest

from histcode.tiling import TilingParams, tile_slides

CONFIGS = Path(__file__).parents[2] / "histcode" / "configs" / "pretrain"


@pytest.fixture(scope="session")
def pretrain_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 2 × 1.5 mm synthetic slides of three patients, tiled at 2 µm/px, 64 px (≈225 tiles).

    Returns:
        The tile store's path.
    """
    from histcode.synth import write_test_slide

    root = tmp_path_factory.mktemp("pretrain_cohort")
    slides = []
    for i in range(3):
        path = root / "slides" / f"TCGA-PT-000{i}-01A-01-TS1.svs"
        path.parent.mkdir(exist_ok=True)
        write_test_slide(path, mpp=1.0, seed=i)
        slides.append(path)
    tiles = root / "tiles.zarr"
    report = tile_slides(slides, tiles, TilingParams(mpp=2.0, tile_size=64), progress=False)
    assert all(s["status"] == "ok" for s in report.slides), report.slides
    return tiles


@pytest.fixture()
def smoke_args(pretrain_tiles: Path, tmp_path: Path) -> list[str]:
    """Arguments of a quiet CPU smoke run into ``tmp_path`` (append ``--name`` etc.)."""
    return [
        "--config",
        str(CONFIGS / "simclr.yaml"),
        "--config",
        str(CONFIGS / "cpu_smoke.yaml"),
        "--data.tiles",
        str(pretrain_tiles),
        "--registry",
        str(tmp_path / "registry"),
        "--trainer.enable_progress_bar",
        "false",
    ]
