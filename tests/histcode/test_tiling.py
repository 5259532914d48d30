"""Tiling: tiles lie on tissue and cover it, 20x ≡ 40x, bad slides fail alone, resume, workers."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from histcode.cli import main as cli_main
from histcode.slide import SlideReader, slide_id
from histcode.synth import write_test_slide
from histcode.tilestore import StoreLockedError, TileStore
from histcode.tiling import TilingParams, discover_slides, tile_grid, tile_slides, tissue_fractions

REAL_SLIDE = Path(__file__).parents[2] / ".." / "shared" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    """Small generated slides (3 × 2.5 mm: enough tiles that edge tiles don't dominate)."""
    root = tmp_path_factory.mktemp("slides")
    made = {}
    for name, kwargs in {
        "TCGA-S1-0001-01A-01-TS1": dict(mpp=0.5, seed=1),
        "TCGA-S1-0001-01A-01-TS1-40x": dict(mpp=0.25, seed=1),
        "TCGA-S2-0002-01A-01-TS1": dict(mpp=0.5, seed=2, background="grey"),
        "TCGA-S3-0003-11A-01-TS1": dict(mpp=0.5, seed=3, pale=True),
        "TCGA-S1-0004-01A-01-TS1": dict(mpp=0.5, seed=4, fmt="tiff"),
        "blank": dict(mpp=0.5, seed=5, blank=True),
        "nompp": dict(mpp=0.5, seed=6, fmt="tiff", write_mpp=False),
    }.items():
        ext = ".tiff" if kwargs.get("fmt") == "tiff" else ".svs"
        path = root / f"{name}{ext}"
        made[name] = (path, write_test_slide(path, width_um=3000, height_um=2500, **kwargs))
    return made


def _tiles_vs_truth(store: TileStore, sid: str, truth) -> tuple[float, float]:
    """(fraction of tile centres on true tissue, fraction of true tissue covered by tiles)."""
    t = store.read(sid)
    side, mpp0 = t.attrs["tile_size_level0"], t.attrs["mpp_level0"]
    to_mask = mpp0 / truth.mask_mpp  # mask px per level-0 px
    h, w = truth.tissue.shape
    centres = ((t.coords + side / 2) * to_mask).astype(int)
    centres = np.clip(centres, 0, [w - 1, h - 1])
    on_tissue = truth.tissue[centres[:, 1], centres[:, 0]].mean()
    covered = np.zeros_like(truth.tissue)
    for x, y in t.coords:
        x0, y0 = round(x * to_mask), round(y * to_mask)
        x1, y1 = round((x + side) * to_mask), round((y + side) * to_mask)
        covered[y0:y1, x0:x1] = True
    coverage = (covered & truth.tissue).sum() / truth.tissue.sum()
    return float(on_tissue), float(coverage)


@pytest.mark.parametrize(
    "sid",
    [
        "TCGA-S1-0001-01A-01-TS1",
        "TCGA-S2-0002-01A-01-TS1",
        "TCGA-S3-0003-11A-01-TS1",
        "TCGA-S1-0004-01A-01-TS1",
        "TCGA-S1-0001-01A-01-TS1-40x",
    ],
    ids=["white", "grey-background", "pale", "generic-tiff", "40x"],
)
def test_tiles_lie_on_tissue_and_cover_it(slides, tmp_path: Path, sid: str) -> None:
    path, truth = slides[sid]
    report = tile_slides([path], tmp_path / "tiles.zarr", progress=False)
    assert report.slides[0]["status"] == "ok", report.slides[0]["error"]
    on_tissue, coverage = _tiles_vs_truth(TileStore(tmp_path / "tiles.zarr"), sid, truth)
    assert on_tissue >= 0.95, f"only {on_tissue:.1%} of tile centres on tissue"
    assert coverage >= 0.80, f"tiles cover only {coverage:.1%} of the tissue"


def test_store_follows_the_contract(slides, tmp_path: Path) -> None:
    path, _ = slides["TCGA-S1-0001-01A-01-TS1-40x"]
    tile_slides([path], tmp_path / "t.zarr", TilingParams(mpp=0.5, tile_size=256), progress=False)
    root = zarr.open_group(tmp_path / "t.zarr", mode="r")
    assert root.attrs["mpp"] == 0.5 and root.attrs["tile_size"] == 256
    assert "histcode_version" in root.attrs and "params" in root.attrs
    g = root["TCGA-S1-0001-01A-01-TS1-40x"]
    for key in (
        "path",
        "status",
        "error",
        "mpp_level0",
        "tile_size_level0",
        "level",
        "fingerprint",
    ):
        assert key in g.attrs, key
    assert g.attrs["mpp_level0"] == pytest.approx(0.25)
    assert g.attrs["tile_size_level0"] == pytest.approx(512)
    assert g.attrs["level"] == 0  # 0.25 µm/px level 0 is the coarsest level ≤ 0.5 µm/px
    assert g["coords"].dtype == np.int64 and g["coords"].shape[1] == 2
    assert g["tissue"].dtype == np.float32 and g["tissue"].shape == (g["coords"].shape[0],)
    assert (np.asarray(g["tissue"][:]) >= 0.5).all()


def test_20x_and_40x_scans_give_the_same_tiles(slides, tmp_path: Path) -> None:
    p20, _ = slides["TCGA-S1-0001-01A-01-TS1"]
    p40, _ = slides["TCGA-S1-0001-01A-01-TS1-40x"]
    tile_slides([p20, p40], tmp_path / "t.zarr", progress=False)
    store = TileStore(tmp_path / "t.zarr")
    a, b = store.read(p20.stem), store.read(p40.stem)
    um_a = {tuple(c) for c in np.round(a.coords * a.attrs["mpp_level0"]).astype(int)}
    um_b = {tuple(c) for c in np.round(b.coords * b.attrs["mpp_level0"]).astype(int)}
    jaccard = len(um_a & um_b) / len(um_a | um_b)
    assert jaccard >= 0.95, f"tile sets overlap only {jaccard:.1%}"
    # the same area: pixels read at the target resolution agree
    with SlideReader(p20) as r20, SlideReader(p40) as r40:
        diffs = []
        for x_um, y_um in sorted(um_a & um_b)[:: max(1, len(um_a & um_b) // 8)]:
            t20 = r20.read_region((x_um * 2, y_um * 2), 0, (256, 256)).astype(float)
            t40 = r40.read_region((x_um * 4, y_um * 4), 0, (512, 512)).astype(float)
            t40 = t40.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
            diffs.append(np.abs(t20 - t40).mean())
    assert np.mean(diffs) < 12, f"20x and 40x tiles differ by {np.mean(diffs):.1f} grey levels"


def test_blank_slide_is_empty(slides, tmp_path: Path) -> None:
    path, truth = slides["blank"]
    assert not truth.tissue.any()
    report = tile_slides([path], tmp_path / "t.zarr", progress=False)
    assert report.slides[0]["status"] == "empty" and report.slides[0]["tiles"] == 0
    assert TileStore(tmp_path / "t.zarr").read("blank").status == "empty"


def _damage_level0(src: Path, dst: Path) -> None:
    """Zero the second half of the level-0 tile data, as a bad copy would."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    half = len(offsets) // 2
    start, end = offsets[half], offsets[-1] + counts[-1]
    with open(dst, "r+b") as f:
        f.seek(start)
        f.write(b"\0" * (end - start))


def test_bad_slides_fail_alone(slides, tmp_path: Path) -> None:
    good, _ = slides["TCGA-S1-0001-01A-01-TS1"]
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(good.read_bytes()[:4096])  # truncated: header, no image data
    not_a_slide = tmp_path / "notes.svs"
    not_a_slide.write_text("patient notes, not an image\n")
    damaged = tmp_path / "damaged.svs"
    _damage_level0(good, damaged)
    nompp, _ = slides["nompp"]
    out = tmp_path / "t.zarr"
    code = cli_main(
        [
            "tile",
            "--slides",
            str(good),
            str(corrupt),
            str(not_a_slide),
            str(damaged),
            str(nompp),
            "--out",
            str(out),
            "--progress",
            "false",
        ]
    )
    assert code == 1
    store = TileStore(out)
    status = {sid: store.read(sid).status for sid in store.slide_ids()}
    assert status == {
        good.stem: "ok",
        "corrupt": "failed",
        "notes": "failed",
        "damaged": "failed",
        "nompp": "failed",
    }
    errors = {sid: store.read(sid).attrs["error"] for sid in status}
    assert "notes.svs" in errors["notes"] and "not a slide" in errors["notes"]
    assert "damaged" in errors["damaged"]
    assert "--mpp_override" in errors["nompp"]
    assert store.read(good.stem).attrs["error"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 1
    assert sorted(summary["result"]["failed_slides"]) == ["corrupt", "damaged", "nompp", "notes"]


def test_missing_mpp_fixed_by_override(slides, tmp_path: Path) -> None:
    nompp, _ = slides["nompp"]
    out = tmp_path / "t.zarr"
    assert tile_slides([nompp], out, progress=False).slides[0]["status"] == "failed"
    report = tile_slides([nompp], out, mpp_override=0.5, progress=False)  # retried
    assert report.slides[0]["status"] == "ok" and not report.slides[0]["skipped"]
    assert TileStore(out).read("nompp").attrs["mpp_source"] == "override"


def test_mpp_override_applies_only_to_slides_without_mpp(slides, tmp_path: Path) -> None:
    """An NDPI at 0.228 µm/px must not be tiled as 0.5 because --mpp_override was given."""
    p20, p40, nompp = (
        slides[k][0] for k in ("TCGA-S1-0001-01A-01-TS1", "TCGA-S1-0001-01A-01-TS1-40x", "nompp")
    )
    report = tile_slides([p20, p40, nompp], tmp_path / "t.zarr", mpp_override=0.4, progress=False)
    assert [s["status"] for s in report.slides] == ["ok", "ok", "ok"]
    store = TileStore(tmp_path / "t.zarr")
    for path, mpp, source in (
        (p20, 0.5, "openslide"),
        (p40, 0.25, "openslide"),
        (nompp, 0.4, "override"),
    ):
        attrs = store.read(path.stem).attrs
        assert attrs["mpp_level0"] == pytest.approx(mpp) and attrs["mpp_source"] == source
        assert attrs["tile_size_level0"] == pytest.approx(256 * 0.5 / mpp)
        assert "mpp_metadata" not in attrs
    assert store.read("nompp").attrs["mpp_override_from"] == "--mpp_override"
    assert "mpp_override_from" not in store.read(p20.stem).attrs
    assert store.attrs["params"]["mpp_override"] == 0.4


def test_mpp_csv_overrides_per_slide_and_logs(
    slides, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p20, p40, nompp = (
        slides[k][0] for k in ("TCGA-S1-0001-01A-01-TS1", "TCGA-S1-0001-01A-01-TS1-40x", "nompp")
    )
    table = tmp_path / "mpp.csv"
    table.write_text(f"slide,mpp\n{p20.stem},0.25\n{nompp},0.45\n")  # by id, by path
    out = tmp_path / "t.zarr"
    with caplog.at_level(logging.WARNING):
        report = tile_slides([p20, p40, nompp], out, mpp_csv=table, progress=False)
    assert [s["status"] for s in report.slides] == ["ok", "ok", "ok"]
    store = TileStore(out)
    a20 = store.read(p20.stem).attrs
    assert a20["mpp_level0"] == 0.25 and a20["mpp_source"] == "override"
    assert a20["tile_size_level0"] == pytest.approx(512)  # 256 px at 0.5 µm/px, at 0.25
    assert a20["mpp_metadata"] == {"mpp": pytest.approx(0.5), "source": "openslide"}
    assert a20["mpp_override_from"] == f"--mpp_csv {table} line 2"
    a40 = store.read(p40.stem).attrs  # no row: its metadata
    assert a40["mpp_level0"] == pytest.approx(0.25) and a40["mpp_source"] == "openslide"
    anom = store.read("nompp").attrs
    assert anom["mpp_level0"] == 0.45 and anom["mpp_override_from"].endswith("line 3")
    assert "mpp_metadata" not in anom  # nothing replaced: no warning
    warned = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith(f"{p20.stem}: µm/px 0.25 from --mpp_csv {table} line 2")
    assert "replaces 0.5 from the slide's metadata (openslide)" in warned[0]
    # a finished slide is not retiled by a changed row: say so
    table.write_text(f"{p20.stem}.svs,0.3\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = tile_slides([p20], out, mpp_csv=table, progress=False)
    assert again.slides[0]["skipped"] and store.read(p20.stem).attrs["mpp_level0"] == 0.25
    assert f"{p20.stem} is already tiled at 0.25 µm/px" in caplog.text
    assert "Rerun with --overwrite" in caplog.text


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "slide,mpp\nTCGA-S9-0999-01A,0.25\n",
            "line 2: 'TCGA-S9-0999-01A' is not a slide of this run",
        ),
        ("slide,mpp\n/elsewhere/TCGA-S1-0001-01A-01-TS1.svs,0.25\n", "is not a slide of this run"),
        ("slide,mpp\nTCGA-S1-0001-01A-01-TS1,0.25um\n", "line 2: µm/px '0.25um' is not a number"),
        (
            "# mpp\nTCGA-S1-0001-01A-01-TS1;0.25;0.5\n",
            "line 2: 'TCGA-S1-0001-01A-01-TS1;0.25;0.5' has 3 fields",
        ),
        ("TCGA-S1-0001-01A-01-TS1,250\n", "line 1: µm/px 250.0 is not a plausible µm/px"),
        (
            "TCGA-S1-0001-01A-01-TS1,0.25\nTCGA-S1-0001-01A-01-TS1.svs,0.3\n",
            "line 2: slide TCGA-S1-0001-01A-01-TS1 is already given on line 1",
        ),
    ],
    ids=["unknown-id", "unknown-path", "not-a-number", "three-fields", "implausible", "twice"],
)
def test_mpp_csv_errors_name_the_row(slides, tmp_path: Path, capsys, text: str, says: str) -> None:
    path, _ = slides["TCGA-S1-0001-01A-01-TS1"]
    table = tmp_path / "mpp.csv"
    table.write_text(text)
    out = tmp_path / "t.zarr"
    argv = ["tile", "--slides", str(path), "--out", str(out), "--mpp_csv", str(table)]
    assert cli_main([*argv, "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert f"--mpp_csv {table}, " in err and says in err, err
    assert not out.exists()  # refused before anything was written


def test_resume_skips_finished_and_redoes_partial(slides, tmp_path: Path) -> None:
    paths = [slides[k][0] for k in ("TCGA-S1-0001-01A-01-TS1", "TCGA-S2-0002-01A-01-TS1", "blank")]
    out = tmp_path / "t.zarr"
    first = tile_slides(paths, out, progress=False)
    store = TileStore(out)
    before = {sid: store.read(sid) for sid in store.slide_ids()}
    # an interrupted run leaves a staging folder and a group whose metadata is cut short
    (out / ".partial-TCGA-S2-0002-01A-01-TS1-deadbeef").mkdir()
    (out / "TCGA-S2-0002-01A-01-TS1" / "zarr.json").write_text('{"zarr_format": 3, "no')
    assert store.status("TCGA-S2-0002-01A-01-TS1") is None  # unfinished: not visible
    assert "TCGA-S2-0002-01A-01-TS1" not in [t.slide_id for t in store.iter_slides()]
    second = tile_slides(paths, out, progress=False)
    skipped = {s["slide_id"]: s["skipped"] for s in second.slides}
    assert skipped == {
        "TCGA-S1-0001-01A-01-TS1": True,
        "TCGA-S2-0002-01A-01-TS1": False,
        "blank": True,
    }
    assert not list(out.glob(".partial-*"))
    for sid, old in before.items():
        new = store.read(sid)
        assert new.attrs == old.attrs and np.array_equal(new.coords, old.coords)
    assert [s["tiles"] for s in first.slides] == [s["tiles"] for s in second.slides]
    third = tile_slides(paths, out, overwrite=True, progress=False)
    assert not any(s["skipped"] for s in third.slides)


def test_other_settings_on_existing_store_are_refused(slides, tmp_path: Path) -> None:
    path, _ = slides["TCGA-S1-0001-01A-01-TS1"]
    tile_slides([path], tmp_path / "t.zarr", progress=False)
    with pytest.raises(ValueError, match="tile_size=256 in the store but 224 asked"):
        tile_slides([path], tmp_path / "t.zarr", TilingParams(tile_size=224), progress=False)


def test_workers_give_the_same_store(slides, tmp_path: Path) -> None:
    paths = [p for p, _ in slides.values()]
    r1 = tile_slides(paths, tmp_path / "w1.zarr", workers=1, progress=False)
    r2 = tile_slides(paths, tmp_path / "w2.zarr", workers=2, progress=False)
    assert [(s["slide_id"], s["status"], s["tiles"]) for s in r1.slides] == [
        (s["slide_id"], s["status"], s["tiles"]) for s in r2.slides
    ]
    s1, s2 = TileStore(tmp_path / "w1.zarr"), TileStore(tmp_path / "w2.zarr")
    assert s1.slide_ids() == s2.slide_ids()
    for sid in s1.slide_ids():
        a, b = s1.read(sid), s2.read(sid)
        assert a.attrs == b.attrs
        assert np.array_equal(a.coords, b.coords) and np.array_equal(a.tissue, b.tissue)


def test_second_writer_is_refused(slides, tmp_path: Path) -> None:
    path, _ = slides["TCGA-S1-0001-01A-01-TS1"]
    store = TileStore(tmp_path / "t.zarr")
    with store.lock(), pytest.raises(StoreLockedError, match="another run"):
        tile_slides([path], tmp_path / "t.zarr", progress=False)


def test_tissue_fractions_are_exact() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half tissue
    coords = tile_grid(100, 100, 20)  # 5×5 tiles of 20 level-0 px; mask px = 10 level-0 px
    frac = tissue_fractions(mask, (0.1, 0.1), coords, 20).reshape(5, 5)
    assert np.allclose(frac[:, :2], 1) and np.allclose(frac[:, 3:], 0)
    assert np.allclose(frac[:, 2], 0.5)  # the tile straddling the edge


def test_discover_rejects_duplicate_ids(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.svs").write_bytes(b"1")
    (tmp_path / "b" / "x.svs").write_bytes(b"2")
    with pytest.raises(ValueError, match="share the id 'x'"):
        discover_slides([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no such file"):
        discover_slides([str(tmp_path / "missing.svs")])


def test_a_dicom_folder_is_one_slide_named_after_it(tmp_path: Path) -> None:
    dicom = tmp_path / "TCGA-AA-0003-01A"
    dicom.mkdir()
    for level in range(3):
        (dicom / f"level-{level}.dcm").write_bytes(b"DICM")
    (tmp_path / "other.svs").write_bytes(b"x")
    found = discover_slides([str(tmp_path)])
    assert [slide_id(p) for p in found] == ["TCGA-AA-0003-01A", "other"]


def test_cli_help_config_and_json_line(slides, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        cli_main(["tile", "--help"])
    assert err.value.code == 0
    assert "--mpp_override" in capsys.readouterr().out
    path, _ = slides["TCGA-S1-0001-01A-01-TS1"]
    config = tmp_path / "tile.yaml"
    config.write_text(
        f"slides: [{path}]\nout: {tmp_path / 't.zarr'}\ntile_size: 128\nprogress: false\n"
    )
    with pytest.raises(SystemExit) as err:
        cli_main(["tile", "--config", str(config), "--print_config"])
    assert err.value.code == 0
    assert "tile_size: 128" in capsys.readouterr().out
    assert cli_main(["tile", "--config", str(config)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["ok"] == 1 and line["tiles"] > 0
    assert TileStore(tmp_path / "t.zarr").attrs["tile_size"] == 128
    with pytest.raises(SystemExit) as err:
        cli_main(["tile", "--slides", str(path), "--out", "x.zarr", "--no_such_option", "1"])
    assert err.value.code == 2
    assert (
        cli_main(
            ["tile", "--slides", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "y.zarr")]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_SLIDE.is_file(), reason="shared/data/CMU-1-Small-Region.svs absent")
def test_real_aperio_slide(tmp_path: Path) -> None:
    report = tile_slides([REAL_SLIDE], tmp_path / "t.zarr", progress=False)
    assert report.slides[0]["status"] == "ok"
    t = TileStore(tmp_path / "t.zarr").read("CMU-1-Small-Region")
    assert t.attrs["vendor"] == "aperio" and t.attrs["mpp_level0"] == pytest.approx(0.499)
    # the tissue strip covers roughly 40 % of the 1.1 × 1.5 mm region: 128 µm tiles
    assert 20 <= len(t) <= 80
    with SlideReader(REAL_SLIDE) as r:
        side = round(t.attrs["tile_size_level0"])
        tiles = [r.read_region(tuple(map(int, c)), 0, (side, side)) for c in t.coords[:10]]
    # stained tissue: clearly darker than glass on average
    assert np.mean([x.mean() for x in tiles]) < 215
    assert os.path.exists(tmp_path / "t.zarr" / "zarr.json")
