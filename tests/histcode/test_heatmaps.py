"""Heatmap drawing, GeoJSON for QuPath, and scoring tile maps against a truth mask."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from histcode.heatmaps import (
    draw_heatmap,
    draw_montage,
    mask_auroc,
    score_grid,
    tile_labels_from_mask,
    tiles_geojson,
    write_geojson,
)
from histcode.slide import SlideReader
from histcode.tilereader import SlideGeometry
from histcode.tilestore import TileStore


def test_score_grid_paints_tiles_and_leaves_nan_elsewhere() -> None:
    coords = np.array([[0, 0], [100, 0]])
    grid = score_grid(coords, 100, np.array([1.0, 2.0]), (20, 30), scale=0.1)
    assert np.all(grid[:10, :10] == 1) and np.all(grid[:10, 10:20] == 2)
    assert np.isnan(grid[10:]).all() and np.isnan(grid[:, 20:]).all()


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
