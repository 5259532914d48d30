"""Shared fixtures: small generated slides and their tile store, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from histcode.tiling import TilingParams, tile_slides


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
