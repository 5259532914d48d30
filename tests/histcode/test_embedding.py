"""Embedding: stored features equal a direct forward pass; resume; shards; failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from histcode.cli import main as cli_main
from histcode.embedding import embed_store, load_encoder
from histcode.encoders import create_encoder, encoder_card
from histcode.featurestore import FeatureStore
from histcode.registry import Registry
from histcode.slide import open_slide
from histcode.tilereader import SlideGeometry, read_tile
from histcode.tilestore import TileStore


def _direct_features(tiles_path: Path, sid: str, encoder: torch.nn.Module) -> np.ndarray:
    """The reference: read each tile (the reader ``open_slide`` picks, as embed's workers do;
    its pixels against OpenSlide's are tested in test_tiffjpeg.py), normalise, one forward."""
    store = TileStore(tiles_path)
    t = store.read(sid)
    geometry = SlideGeometry.from_tiles(t)
    with open_slide(t.path) as reader:
        batch = np.stack(
            [read_tile(reader, geometry, xy, store.attrs["tile_size"]) for xy in t.coords]
        )
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    spec = encoder.input_spec
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return encoder.eval()(x).numpy()


def test_features_match_a_direct_forward_pass(small_cohort, tmp_path: Path) -> None:
    out = tmp_path / "f.zarr"
    report = embed_store(
        small_cohort["tiles"], out, "tiny", batch_size=7, workers=0, progress=False
    )
    statuses = {s["slide_id"]: s["status"] for s in report.slides}
    assert statuses == {
        "TCGA-S1-0001-01A-01-TS1": "ok",
        "TCGA-S2-0002-11A-01-TS1": "ok",
        "TCGA-S3-0003-01A-01-TS1": "ok",
        "broken": "failed",
    }
    torch.manual_seed(0)
    reference = create_encoder("tiny", mpp=1.0, tile_size=64)
    store = FeatureStore(out)
    attrs = store.attrs
    assert attrs["embed_dim"] == reference.embed_dim and attrs["mpp"] == 1.0
    assert attrs["encoder_ref"] == "zoo:tiny#random-seed=0"
    assert attrs["tiles_fingerprint"] == TileStore(small_cohort["tiles"]).fingerprint()
    for sid in ("TCGA-S1-0001-01A-01-TS1", "TCGA-S2-0002-11A-01-TS1", "TCGA-S3-0003-01A-01-TS1"):
        f = store.read(sid)
        assert f.features.dtype == np.float32
        assert np.array_equal(f.coords, TileStore(small_cohort["tiles"]).read(sid).coords)
        np.testing.assert_allclose(
            f.features,
            _direct_features(small_cohort["tiles"], sid, reference),
            rtol=1e-4,
            atol=1e-5,
        )
    assert "tiling failed" in store.read("broken").attrs["error"]


def test_float16_storage_and_workers(small_cohort, tmp_path: Path) -> None:
    a = embed_store(small_cohort["tiles"], tmp_path / "a.zarr", "tiny", workers=0, progress=False)
    b = embed_store(
        small_cohort["tiles"],
        tmp_path / "b.zarr",
        "tiny",
        workers=2,
        dtype="float16",
        batch_size=5,
        progress=False,
    )
    assert [s["tiles"] for s in a.slides] == [s["tiles"] for s in b.slides]
    fa, fb = FeatureStore(tmp_path / "a.zarr"), FeatureStore(tmp_path / "b.zarr")
    for sid in fa.slide_ids():
        x, y = fa.read(sid).features, fb.read(sid).features
        assert y.dtype == np.float16
        np.testing.assert_allclose(x, y.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_resume_skips_finished_and_redoes_partial(small_cohort, tmp_path: Path) -> None:
    out = tmp_path / "f.zarr"
    embed_store(small_cohort["tiles"], out, "tiny", workers=0, progress=False)
    store = FeatureStore(out)
    before = store.read("TCGA-S2-0002-11A-01-TS1").features
    # an interruption mid-slide leaves a staging group; a damaged group reads as absent
    shutil.copytree(out / "TCGA-S2-0002-11A-01-TS1", out / ".partial-TCGA-S2-0002-11A-01-TS1-x")
    (out / "TCGA-S2-0002-11A-01-TS1" / "zarr.json").write_text("{ cut sho")
    report = embed_store(small_cohort["tiles"], out, "tiny", workers=0, progress=False)
    skipped = {s["slide_id"]: s["skipped"] for s in report.slides}
    assert skipped["TCGA-S2-0002-11A-01-TS1"] is False
    assert skipped["TCGA-S1-0001-01A-01-TS1"] is True
    assert report.tiles_embedded == len(before)
    np.testing.assert_array_equal(store.read("TCGA-S2-0002-11A-01-TS1").features, before)
    assert not list(out.glob(".partial-*"))


def test_shards_union_equals_unsharded(small_cohort, tmp_path: Path) -> None:
    whole = tmp_path / "whole.zarr"
    sharded = tmp_path / "sharded.zarr"
    embed_store(small_cohort["tiles"], whole, "tiny", workers=0, progress=False)
    r0 = embed_store(small_cohort["tiles"], sharded, "tiny", shard="0/2", workers=0, progress=False)
    r1 = embed_store(small_cohort["tiles"], sharded, "tiny", shard="1/2", workers=0, progress=False)
    ids0 = {s["slide_id"] for s in r0.slides}
    ids1 = {s["slide_id"] for s in r1.slides}
    assert ids0 and ids1 and not ids0 & ids1
    a, b = FeatureStore(whole), FeatureStore(sharded)
    assert a.slide_ids() == b.slide_ids()
    for sid in a.slide_ids():
        x, y = a.read(sid), b.read(sid)
        assert x.status == y.status
        np.testing.assert_array_equal(x.features, y.features)


def test_damaged_tile_data_fails_its_slide_only(small_cohort, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    shutil.copytree(small_cohort["slides"], slides)
    tiles = tmp_path / "tiles.zarr"
    shutil.copytree(small_cohort["tiles"], tiles)
    # re-point the store at the copies, then damage one copy's level-0 tile data
    store = TileStore(tiles)
    for sid in store.slide_ids():
        t = store.read(sid)
        store.write(sid, {**t.attrs, "path": str(slides / t.path.name)}, t.coords, t.tissue)
    victim = slides / "TCGA-S1-0001-01A-01-TS1.svs"
    with tifffile.TiffFile(victim) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    with open(victim, "r+b") as f:
        f.seek(offsets[0])
        f.write(b"\0" * (offsets[-1] + counts[-1] - offsets[0]))
    out = tmp_path / "f.zarr"
    code = cli_main(
        [
            "embed",
            "--tiles",
            str(tiles),
            "--out",
            str(out),
            "--encoder",
            "tiny",
            "--workers",
            "0",
            "--progress",
            "false",
        ]
    )
    assert code == 1
    fs = FeatureStore(out)
    assert fs.read("TCGA-S1-0001-01A-01-TS1").status == "failed"
    assert "damaged" in fs.read("TCGA-S1-0001-01A-01-TS1").attrs["error"]
    assert fs.read("TCGA-S2-0002-11A-01-TS1").status == "ok"
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["result"]["failed_slides"]) == ["TCGA-S1-0001-01A-01-TS1", "broken"]


def test_registry_encoder_and_input_spec_check(small_cohort, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    enc = create_encoder("tiny", mpp=1.0, tile_size=64)
    registry.save("tiny-enc", enc, encoder_card(enc))
    wrong = create_encoder("tiny", mpp=0.5, tile_size=224)
    registry.save("tiny-20x", wrong, encoder_card(wrong))
    loaded = load_encoder("tiny-enc", mpp=1.0, tile_size=64, registry=registry)
    assert loaded.ref == "registry:tiny-enc@1"
    report = embed_store(
        small_cohort["tiles"],
        tmp_path / "f.zarr",
        "tiny-enc@latest",
        registry=str(registry.root),
        workers=0,
        progress=False,
    )
    assert report.encoder_ref == "registry:tiny-enc@1"
    with pytest.raises(ValueError, match=r"mpp: the encoder expects 0.5 µm/px, the tiles are 1"):
        load_encoder("tiny-20x", mpp=1.0, tile_size=64, registry=registry)


def test_cli_errors(small_cohort, tmp_path: Path, capsys) -> None:
    args = [
        "embed",
        "--tiles",
        str(small_cohort["tiles"]),
        "--out",
        str(tmp_path / "f.zarr"),
        "--workers",
        "0",
        "--progress",
        "false",
        "--registry",
        str(tmp_path / "reg"),
    ]
    assert cli_main([*args, "--encoder", "resnet19"]) == 2
    assert "resnet18" in capsys.readouterr().err  # lists what exists
    assert cli_main([*args, "--encoder", "tiny"]) == 1  # the broken slide
    assert cli_main([*args, "--encoder", "resnet18"]) == 2  # another encoder, same store
    assert "holds other features" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "embed",
                "--tiles",
                str(tmp_path / "none.zarr"),
                "--out",
                str(tmp_path / "g.zarr"),
                "--encoder",
                "tiny",
            ]
        )
        == 2
    )
    assert "not a histcode.tiles store" in capsys.readouterr().err
