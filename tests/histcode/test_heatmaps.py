"""Heatmap drawing, GeoJSON for QuPath, and scoring tile maps against a truth mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from histcode.mapdrawing import (
    draw_heatmap,
    draw_montage,
    score_grid,
    thumbnail_mpp_for,
    tiles_geojson,
    write_geojson,
)
from histcode.slide import SlideReader
from histcode.synth.scoring import mask_auroc, tile_labels_from_mask
from histcode.tilereader import SlideGeometry
from histcode.tilestore import TileStore
from histcode.tiling import tile_grid


def test_score_grid_is_one_pixel_per_tile_and_nan_elsewhere() -> None:
    coords = np.array([[0, 0], [100, 0], [200, 100]])
    grid, extent = score_grid(coords, 100, np.array([1.0, 2.0, 3.0]))
    assert grid.shape == (2, 3) and extent == (0.0, 300.0, 200.0, 0.0)
    assert grid[0, 0] == 1 and grid[0, 1] == 2 and grid[1, 2] == 3
    assert np.isnan(grid[0, 2]) and np.isnan(grid[1, :2]).all()


def test_score_grid_has_no_seams_with_a_fractional_tile_side() -> None:
    """Tiles of side 64.5 level-0 px (as a 0.496 µm/px scan gives) touch on the grid: a full
    grid of tiles leaves no NaN between them (painting squares into a thumbnail left 1-px
    seams: at 1/8 scale, 1,285 pixels inside the tiled area, two whole columns, were NaN)."""
    coords = tile_grid(64 * 65, 48 * 65, 64.5)
    grid, extent = score_grid(coords, 64.5, np.ones(len(coords)))
    assert grid.shape == (48, 64) and not np.isnan(grid).any()
    assert extent[1] == 64 * 64.5


def test_score_grid_refuses_tiles_off_the_grid() -> None:
    with pytest.raises(ValueError, match="not on a grid of side 100"):
        score_grid(np.array([[0, 0], [50, 0]]), 100, np.array([1.0, 2.0]))


def test_thumbnail_resolution_follows_the_slide_size() -> None:
    """A 25 × 20 mm scan gets a 2048-px thumbnail, a 1.2 mm biopsy 512 px at least, and
    never finer than level 0."""
    big = thumbnail_mpp_for((100_000, 80_000), 0.25, 512.0)
    assert 100_000 * 0.25 / big == pytest.approx(2048)
    small = thumbnail_mpp_for((2400, 2000), 0.5, 128.0)
    assert 2400 * 0.5 / small == pytest.approx(512)
    assert thumbnail_mpp_for((400, 300), 0.5, 128.0) == pytest.approx(0.5)


def _captured_figure(monkeypatch) -> list:
    import histcode.mapdrawing as drawing

    figures: list = []
    save = drawing._save

    def keep(fig, path, *args, **kwargs):
        figures.append(fig)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(drawing, "_save", keep)
    return figures


def test_slide_and_map_panels_match(small_cohort, tmp_path, monkeypatch) -> None:
    """The slide and the map are drawn at the same size and position over the same
    level-0 extent, the map one image with a pixel per tile, the thumbnail's resolution
    chosen from the slide (≥ 512 px on the longest side, not 8 µm/px's 150 px)."""
    figures = _captured_figure(monkeypatch)
    t = TileStore(small_cohort["tiles"]).read("TCGA-S1-0001-01A-01-TS1")
    side = t.attrs["tile_size_level0"]
    with SlideReader(t.path) as reader:
        draw_heatmap(reader, t.coords, side, np.linspace(0, 1, len(t)), tmp_path / "h.png", "t")
        width, height = reader.dimensions
    fig = figures[0]
    slide_ax, map_ax = fig.axes[0], fig.axes[1]
    a, b = slide_ax.get_position(), map_ax.get_position()
    assert (a.width, a.height, a.y0) == pytest.approx((b.width, b.height, b.y0))
    bbox = [ax.get_window_extent() for ax in (slide_ax, map_ax)]
    assert bbox[0].width == pytest.approx(bbox[1].width)
    assert bbox[0].height == pytest.approx(bbox[1].height)
    for ax in (slide_ax, map_ax):
        assert ax.get_xlim() == (0, width) and ax.get_ylim() == (height, 0)
    thumb, overlay = map_ax.images
    assert slide_ax.images[0].get_extent() == thumb.get_extent()
    assert max(thumb.get_array().shape[:2]) >= 512
    grid, _ = score_grid(t.coords, side, np.zeros(len(t)))
    assert overlay.get_array().shape == grid.shape  # one pixel per tile


def test_geojson_is_valid_for_qupath(tmp_path) -> None:
    coords = np.array([[0, 0], [512, 256]])
    fc = tiles_geojson(coords, 256.0, {"attention": np.array([0.1, 0.9])}, "s1", {"model": "m@1"})
    path = write_geojson(fc, tmp_path / "s1.geojson")
    loaded = json.loads(path.read_text())
    assert loaded["type"] == "FeatureCollection" and len(loaded["features"]) == 2
    ring = loaded["features"][1]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] == [512.0, 256.0] and ring[2] == [768.0, 512.0]
    props = loaded["features"][1]["properties"]
    assert props["objectType"] == "detection" and props["measurements"] == {"attention": 0.9}
    assert loaded["properties"] == {"slide_id": "s1", "model": "m@1"}


def test_mask_auroc_and_labels() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, 5:] = True  # right half "tumour"; mask px = 8 µm, level 0 = 0.5 µm/px
    coords = np.array([[0, 0], [16 * 2, 0], [16 * 6, 0], [16 * 8, 0]])  # x in level-0 px
    labels = tile_labels_from_mask(coords, 16.0, 0.5, mask, 8.0)
    assert labels.tolist() == [False, False, True, True]
    assert mask_auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert mask_auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert mask_auroc([1, 2], [True, True]) is None


def test_drawn_maps_are_images(small_cohort, tmp_path) -> None:
    t = TileStore(small_cohort["tiles"]).read("TCGA-S1-0001-01A-01-TS1")
    scores = np.linspace(0, 1, len(t))
    with SlideReader(t.path) as reader:
        heat = draw_heatmap(
            reader,
            t.coords,
            t.attrs["tile_size_level0"],
            scores,
            tmp_path / "h.png",
            "test map",
            label="attention",
        )
        montage = draw_montage(
            reader,
            SlideGeometry.from_tiles(t),
            t.coords,
            scores,
            64,
            tmp_path / "m.png",
            "montage",
            k=4,
        )
    for path in (heat, montage):
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert not list(tmp_path.glob(".*tmp*"))
