"""Stain normalisation as a switch: ``histcode tile --stain_norm macenko`` stores each slide's
stains, the tile reader normalises every tile with them (pretraining and embedding alike),
reruns refuse to mix raw and normalised slides, and ``histcode embed`` refuses an encoder
pretrained on the other setting unless told (fast)."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import zarr

from histcode import stain
from histcode.cli import main as cli_main
from histcode.embedding import embed_store
from histcode.encoders import create_encoder, encoder_card
from histcode.featurestore import FeatureStore
from histcode.pretrain.data import TileDataModule
from histcode.registry import Registry
from histcode.slide import open_slide
from histcode.synth import write_test_slide
from histcode.tilereader import SlideGeometry, TileDataset, TileIndex, read_tile
from histcode.tilestore import TileStore
from histcode.tiling import TilingParams, tile_slides
from tests.histcode.recoloured_slides import write_recoloured

#: Another site's stains (unit OD vectors, R G B): a bluer haematoxylin, a redder eosin.
H_CAST = np.array([0.75, 0.60, 0.28])
E_CAST = np.array([0.12, 0.90, 0.42])
A, B = "TCGA-SA-0001-01A-01-TS1", "TCGA-SB-0001-01A-01-TS1"


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _stain_cast(rgb: np.ndarray) -> np.ndarray:
    """The pixels as another site would have stained them: Beer–Lambert unmixing with
    Macenko's reference stains, re-mixing with ``H_CAST``, ``E_CAST``, haematoxylin 1.3×
    stronger and eosin 0.8× (one linear map in optical density)."""
    ref = np.stack([_unit(stain.REFERENCE.haematoxylin), _unit(stain.REFERENCE.eosin)], 1)
    cast = np.stack([_unit(H_CAST), _unit(E_CAST)], 1)
    m = cast @ np.diag([1.3, 0.8]) @ np.linalg.pinv(ref)
    od = -np.log((rgb.astype(np.float64) + 1.0) / stain.IO)
    return np.clip(np.rint(stain.IO * np.exp(-(od @ m.T)) - 1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cast_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small slide and a copy of it with another site's stain cast, tiled raw and
    normalised (1 µm/px, 64 px: ~73 tiles each)."""
    root = tmp_path_factory.mktemp("stain_pair")
    slides = root / "slides"
    slides.mkdir()
    write_test_slide(slides / f"{A}.svs", width_um=1200, height_um=1000, mpp=0.5, seed=11)
    write_recoloured(slides / f"{A}.svs", slides / f"{B}.svs", _stain_cast)
    out = {"slides": slides}
    for norm in ("none", "macenko"):
        out[norm] = root / f"{norm}.zarr"
        params = TilingParams(mpp=1.0, tile_size=64, stain_norm=norm)
        report = tile_slides([slides], out[norm], params, progress=False)
        assert [s["status"] for s in report.slides] == ["ok", "ok"], report.slides
    return out


def _cli(argv: list[str]) -> tuple[int, dict | None, str]:
    """Exit status, the final JSON line (None if none) and stderr of ``histcode argv``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    lines = out.getvalue().strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), err.getvalue()


def _mean_colours(store: Path) -> dict[str, np.ndarray]:
    """Mean RGB over every tile of each slide, as the tile reader returns them."""
    index = TileIndex(store)
    dataset = TileDataset(index)
    out = {}
    for s, geometry in enumerate(index.slides):
        tiles = np.stack([dataset[i].numpy() for i in index.slide_range(s)])
        out[geometry.slide_id] = tiles.reshape(len(tiles), 3, -1).mean(axis=(0, 2))
    dataset.cache.close()
    return out


def test_tile_with_macenko_stores_each_slides_stains(cast_pair, tmp_path: Path) -> None:
    slide = cast_pair["slides"] / f"{A}.svs"
    args = ["tile", "--slides", str(slide), "--out", str(tmp_path / "t.zarr"), "--mpp", "1.0"]
    code, result, err = _cli(
        [*args, "--tile_size", "64", "--stain_norm", "macenko", "--progress", "false"]
    )
    assert code == 0, err
    assert result["stain_norm"] == "macenko" and result["ok"] == 1
    store = TileStore(tmp_path / "t.zarr")
    root = store.attrs
    assert root["stain_norm"] == "macenko" and root["params"]["stain_norm"] == "macenko"
    assert root["params"]["stain_tiles"] == 128
    assert root["stain_target"] == stain.REFERENCE.to_dict()
    attrs = store.read(A).attrs
    assert attrs["stain_norm"] == "macenko"
    record = attrs["stain"]
    assert record["method"] == "macenko" and record["seed"] == 0
    assert record["tiles"] == len(store.read(A)) < 128  # every tile when there are fewer
    assert record["pixels"] >= 10_000
    params = stain.StainParams.from_dict(record)
    # the synthetic H&E's stains: near Macenko's reference, haematoxylin first
    assert params.haematoxylin @ stain.REFERENCE.haematoxylin > 0.95
    assert params.eosin @ stain.REFERENCE.eosin > 0.95
    # the same slide tiled the same way gives the same estimate (seeded)
    same = TileStore(cast_pair["macenko"]).read(A).attrs["stain"]
    assert same == record
    # raw stores say so, slide by slide; the stains change the fingerprint, not the coords
    raw = TileStore(cast_pair["none"])
    assert raw.attrs["stain_norm"] == "none" and raw.attrs["stain_target"] is None
    assert raw.read(A).attrs["stain_norm"] == "none" and raw.read(A).attrs["stain"] is None
    normalised = TileStore(cast_pair["macenko"])
    np.testing.assert_array_equal(raw.read(A).coords, normalised.read(A).coords)
    assert raw.fingerprint() != normalised.fingerprint()


def test_the_reader_normalises_every_tile_and_brings_stain_casts_together(cast_pair) -> None:
    raw = _mean_colours(cast_pair["none"])
    normalised = _mean_colours(cast_pair["macenko"])
    before = np.abs(raw[A] - raw[B]).max()
    after = np.abs(normalised[A] - normalised[B]).max()
    assert before > 12, raw  # the cast is visible
    assert after < before / 2, (raw, normalised)
    # each tile is the slide's pixels mapped by its stored stains (stain.normalise, ±1 grey)
    index = TileIndex(cast_pair["macenko"])
    dataset = TileDataset(index)
    store = TileStore(cast_pair["macenko"])
    for s, geometry in enumerate(index.slides):
        params = stain.StainParams.from_dict(store.read(geometry.slide_id).attrs["stain"])
        with open_slide(geometry.path) as reader:
            for i in list(index.slide_range(s))[:5]:
                scanned = read_tile(reader, geometry, index.coords[i], index.tile_size)
                expected = stain.normalise(scanned.transpose(2, 0, 1), params)
                got = dataset[i].numpy()
                assert got.shape == (3, 64, 64) and got.dtype == np.uint8
                assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
                assert np.abs(got.astype(int) - scanned.transpose(2, 0, 1)).mean() > 1
    # a raw store's reader returns the pixels as scanned
    raw_index = TileIndex(cast_pair["none"])
    assert raw_index.stain_norm == "none" and raw_index.normalisers == [None, None]
    # pretraining reads the same tiles, and says what they are
    data = TileDataModule(str(cast_pair["macenko"]), batch_size=4, num_workers=0)
    assert data.stain_norm == "macenko"
    assert TileDataModule(str(cast_pair["none"]), batch_size=4, num_workers=0).stain_norm == "none"
    data.setup("fit")
    assert data.train_set is not None
    np.testing.assert_array_equal(data.train_set[3].numpy(), dataset[3].numpy())


def test_the_tile_normaliser_matches_normalise_and_its_fallback() -> None:
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    source = stain.StainParams(np.stack([_unit(H_CAST), _unit(E_CAST)], 1), np.array([1.4, 0.9]))
    normaliser = stain.TileNormaliser(stain.od_map(source))
    assert normaliser.tables is not None
    expected = stain.normalise(tile.transpose(2, 0, 1), source).transpose(1, 2, 0)
    assert np.abs(normaliser(tile).astype(int) - expected).max() <= 1
    direct = stain.TileNormaliser(stain.od_map(source), use_tables=False)
    assert direct.tables is None  # the path of maps too extreme for the tables
    assert np.abs(direct(tile).astype(int) - expected).max() <= 1
    # the tables stay home: a pickled normaliser (to a loader worker) rebuilds them there
    copy = pickle.loads(pickle.dumps(normaliser))
    assert copy._tables is None and len(pickle.dumps(normaliser)) < 1000
    np.testing.assert_array_equal(copy(tile), normaliser(tile))
    extreme = stain.TileNormaliser(np.diag([20.0, 20.0, 20.0]))
    assert extreme.tables is None  # would leave float32: the direct path
    assert extreme(tile).dtype == np.uint8
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        normaliser(tile.transpose(2, 0, 1))


def test_a_slide_too_poor_to_estimate_fails_with_its_reason_and_a_rerun_retries_it(
    cast_pair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    slide = cast_pair["slides"] / f"{A}.svs"
    args = ["tile", "--slides", str(slide), "--out", str(tmp_path / "t.zarr"), "--mpp", "1.0"]
    args += ["--tile_size", "64", "--stain_norm", "macenko", "--progress", "false"]
    code, result, err = _cli([*args, "--stain_tiles", "2"])  # 2 tiles: 8,192 px < 10,000
    assert code == 1  # partial, as other per-slide failures
    assert result["failed_slides"] == [A]
    summary = json.loads((tmp_path / "t.zarr" / "summary.json").read_text())
    error = summary["slides"][0]["error"]
    assert "cannot estimate its stains for --stain_norm macenko from 2 of its" in error
    assert "at least 10,000 tissue pixels" in error and "--stain_tiles" in error
    assert f"{A} failed: " in caplog.text  # logged, naming the slide
    attrs = TileStore(tmp_path / "t.zarr").read(A).attrs
    assert attrs["status"] == "failed" and attrs["stain"] is None
    code, result, err = _cli(args)  # failed slides are retried; stain_tiles may change
    assert code == 0 and result["ok"] == 1, err
    assert TileStore(tmp_path / "t.zarr").read(A).attrs["stain"]["tiles"] > 2


def test_a_changed_stain_norm_is_refused_and_overwrite_redoes_every_slide(
    cast_pair, tmp_path: Path
) -> None:
    store = tmp_path / "t.zarr"
    shutil.copytree(cast_pair["none"], store)
    slides = ["--slides", str(cast_pair["slides"]), "--out", str(store), "--mpp", "1.0"]
    slides += ["--tile_size", "64", "--progress", "false"]
    code, _, err = _cli(["tile", *slides, "--stain_norm", "macenko"])
    assert code == 2
    assert "stain_norm=none in the store but macenko asked" in err and "--overwrite" in err
    assert TileStore(store).stain_norm == "none"
    # --overwrite of only some of its slides would leave the others raw: refused
    one = ["--slides", str(cast_pair["slides"] / f"{A}.svs"), *slides[2:]]
    code, _, err = _cli(["tile", *one, "--stain_norm", "macenko", "--overwrite", "true"])
    assert code == 2 and B in err and "Include them in --slides" in err
    code, result, err = _cli(["tile", *slides, "--stain_norm", "macenko", "--overwrite", "true"])
    assert code == 0 and result["ok"] == 2 and result["skipped"] == 0, err
    assert TileStore(store).stain_norm == "macenko"
    assert all(t.attrs["stain"] for t in TileStore(store).iter_slides())
    code, result, _ = _cli(["tile", *slides, "--stain_norm", "macenko"])  # resumes
    assert code == 0 and result["skipped"] == 2
    # back to raw, the same way
    code, _, err = _cli(["tile", *slides, "--overwrite", "true"])
    assert code == 0, err
    assert TileStore(store).attrs["stain_target"] is None
    assert TileIndex(store).normalisers == [None, None]


def test_a_store_made_before_the_option_reads_as_raw_and_resumes(cast_pair, tmp_path) -> None:
    store = tmp_path / "old.zarr"
    shutil.copytree(cast_pair["none"], store)
    group = zarr.open_group(store, mode="a")
    attrs = dict(group.attrs)
    del attrs["stain_norm"], attrs["stain_target"], attrs["params"]["stain_norm"]
    group.attrs.put(attrs)
    for sid in (A, B):
        slide = zarr.open_group(store / sid, mode="a")
        slide_attrs = dict(slide.attrs)
        del slide_attrs["stain_norm"], slide_attrs["stain"]
        slide.attrs.put(slide_attrs)
    before = TileStore(store).fingerprint()
    assert before == TileStore(cast_pair["none"]).fingerprint()  # raw stores hash as before
    assert TileStore(store).stain_norm == "none"
    assert TileIndex(store).normalisers == [None, None]
    report = tile_slides([cast_pair["slides"]], store, TilingParams(mpp=1.0, tile_size=64))
    assert [s["skipped"] for s in report.slides] == [True, True]
    with pytest.raises(ValueError, match="stain_norm=none in the store but macenko asked"):
        tile_slides(
            [cast_pair["slides"]], store, TilingParams(mpp=1.0, tile_size=64, stain_norm="macenko")
        )


def test_the_reader_refuses_a_store_that_mixes_raw_and_normalised_slides(
    cast_pair, tmp_path: Path
) -> None:
    store = tmp_path / "mixed.zarr"
    shutil.copytree(cast_pair["macenko"], store)
    slide = zarr.open_group(store / B, mode="a")
    slide.attrs.put({**dict(slide.attrs), "stain_norm": "none", "stain": None})
    with pytest.raises(ValueError, match=rf"slide {B} of .* has stain_norm 'none' but the store"):
        TileIndex(store)
    TileIndex(store, [A])  # the slides asked for are checked
    group = zarr.open_group(store, mode="a")
    group.attrs.put({**dict(group.attrs), "stain_norm": "reinhard"})
    with pytest.raises(ValueError, match="stain_norm 'reinhard', which this histcode cannot"):
        TileIndex(store)


def test_stain_geometry_helpers_agree(cast_pair) -> None:
    tiles = TileStore(cast_pair["macenko"]).read(A)
    assert SlideGeometry.from_attrs(A, tiles.attrs) == SlideGeometry.from_tiles(tiles)


@pytest.fixture(scope="module")
def stain_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """Encoders whose cards say they were pretrained on normalised, raw, or unrecorded tiles."""
    registry = Registry(tmp_path_factory.mktemp("stain_registry") / "registry")
    for name, extra in (
        ("enc-macenko", {"stain_norm": "macenko"}),
        ("enc-raw", {"stain_norm": "none"}),
        ("enc-unrecorded", {}),
    ):
        enc = create_encoder("tiny", mpp=1.0, tile_size=64)
        registry.save(name, enc, encoder_card(enc, extra=extra))
    return registry


def test_embed_refuses_an_encoder_pretrained_on_the_other_stain_setting(
    cast_pair, stain_registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def embed(tiles: str, encoder: str, out: str, *more: str) -> tuple[int, dict | None, str]:
        args = ["embed", "--tiles", str(cast_pair[tiles]), "--out", str(tmp_path / out)]
        args += ["--encoder", encoder, "--registry", str(stain_registry.root), "--workers", "0"]
        return _cli([*args, "--progress", "false", *more])

    code, _, err = embed("none", "enc-macenko", "a.zarr")
    assert code == 2
    assert "pretrained on tiles with stain_norm 'macenko'" in err and "'none'" in err
    assert "--stain_norm macenko" in err and "--allow_stain_mismatch true" in err
    assert not (tmp_path / "a.zarr").exists()  # refused before anything is written
    code, _, err = embed("macenko", "enc-raw", "b.zarr")
    assert code == 2 and "--allow_stain_mismatch true" in err

    code, result, err = embed("none", "enc-macenko", "a.zarr", "--allow_stain_mismatch", "true")
    assert code == 0, err
    assert result["stain_norm"] == "none" and result["encoder_stain_norm"] == "macenko"
    assert len(result["warnings"]) == 1 and "embedding anyway" in result["warnings"][0]
    assert "embedding anyway" in caplog.text  # and in the log
    attrs = FeatureStore(tmp_path / "a.zarr").attrs
    assert attrs["stain_mismatch"] is True and attrs["encoder_stain_norm"] == "macenko"
    summary = json.loads((tmp_path / "a.zarr" / "summary.json").read_text())
    assert summary["result"]["warnings"] == result["warnings"]

    # matching settings: no warning, recorded
    code, result, err = embed("macenko", "enc-macenko", "c.zarr")
    assert code == 0 and result["warnings"] == [], err
    attrs = FeatureStore(tmp_path / "c.zarr").attrs
    assert attrs["stain_norm"] == "macenko" and attrs["stain_mismatch"] is False


def test_embed_warns_where_the_card_does_not_say_and_zoo_encoders_just_record(
    cast_pair, stain_registry: Registry, tmp_path: Path
) -> None:
    report = embed_store(
        cast_pair["macenko"],
        tmp_path / "u.zarr",
        "enc-unrecorded",
        registry=str(stain_registry.root),
        workers=0,
        progress=False,
    )
    assert len(report.warnings) == 1 and "does not record" in report.warnings[0]
    assert FeatureStore(tmp_path / "u.zarr").attrs["stain_mismatch"] is True
    quiet = embed_store(
        cast_pair["none"],
        tmp_path / "v.zarr",
        "enc-unrecorded",
        registry=str(stain_registry.root),
        workers=0,
        progress=False,
    )
    assert quiet.warnings == []  # raw tiles, as every card from before the option
    zoo = embed_store(cast_pair["macenko"], tmp_path / "z.zarr", "tiny", workers=0, progress=False)
    assert zoo.warnings == [] and zoo.encoder_stain_norm is None
    attrs = FeatureStore(tmp_path / "z.zarr").attrs
    assert attrs["stain_norm"] == "macenko" and attrs["stain_mismatch"] is False
    assert attrs["tiles_fingerprint"] == TileStore(cast_pair["macenko"]).fingerprint()


def test_demo_passes_stain_norm_to_tiling(monkeypatch, tmp_path: Path) -> None:
    from histcode import demo

    calls: list[list[str]] = []

    class Stop(Exception):
        pass

    def step(self, key: str, title: str, argv: list[str], hint: str = "") -> dict:
        calls.append(argv)
        if key == "tile":
            told = argv[argv.index("--stain_norm") + 1] if "--stain_norm" in argv else "none"
            assert self.options.stain_norm == told  # kept in demo.json for resuming
            raise Stop
        return {}

    monkeypatch.setattr(demo._Runner, "step", step)
    with pytest.raises(Stop):
        demo.demo(out=tmp_path / "d", patients=6, folds=2)  # Macenko is the demo's default
    assert calls[-1][:1] == ["tile"] and calls[-1][-2:] == ["--stain_norm", "macenko"]
    calls.clear()
    with pytest.raises(Stop):
        demo.demo(out=tmp_path / "e", patients=6, folds=2, stain_norm="none")
    assert "--stain_norm" not in calls[-1]  # tile's own default: the command as before


def test_a_demo_folder_from_before_the_option_resumes(tmp_path: Path) -> None:
    from histcode.demo import DemoOptions, _Runner

    options = DemoOptions(6, "easy", (1.2, 1.0), 1.0, 64, 4, 32, 2, 2, "tiny", "abmil", 0)
    old = asdict(options)
    del old["stain_norm"]
    (tmp_path / "demo.json").write_text(json.dumps({"options": old, "steps": {"synth": {}}}))
    assert _Runner(tmp_path, options, 8).state["steps"] == {"synth": {}}
    with pytest.raises(ValueError, match="other options"):
        _Runner(tmp_path, DemoOptions(**{**asdict(options), "stain_norm": "macenko"}), 8)


def test_a_failed_tiling_under_the_demos_macenko_says_how_to_go_on(
    monkeypatch, tmp_path: Path
) -> None:
    """Macenko is the demo's default, so a cohort slide whose stains cannot be estimated stops
    it at tiling; the error says to move the slide out or to run on raw tiles."""
    from histcode import cli, demo

    cohort = tmp_path / "mine"
    (cohort / "slides").mkdir(parents=True)
    (cohort / "expression.tsv").write_text("gene\tTCGA-AA-0001-01A\n")
    monkeypatch.setattr(cli, "run_captured", lambda argv, quiet=False: (1, None))
    with pytest.raises(demo.DemoStepError) as failed:
        demo.demo(out=tmp_path / "d", cohort=cohort)
    said = str(failed.value)
    assert "tissue segmentation and tiling" in said and "--stain_norm none --restart true" in said
    with pytest.raises(demo.DemoStepError) as failed:
        demo.demo(out=tmp_path / "e", cohort=cohort, stain_norm="none")
    assert "--stain_norm none" not in str(failed.value)
