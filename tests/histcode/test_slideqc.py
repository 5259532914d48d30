"""Brightfield QC at tiling: H&E slides pass, fluorescence, inverted and mis-decoded ones fail."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from histcode.cli import main as cli_main
from histcode.slideqc import STAIN_VECTORS, angle_to_cone, measure_brightfield, optical_density
from histcode.synth import make_cohort, write_test_slide
from histcode.tilestore import TileStore
from histcode.tiling import TilingParams, tile_slides
from tests.histcode.recoloured_slides import write_recoloured

REAL_SLIDE = Path(__file__).parents[2] / ".." / "shared" / "data" / "CMU-1-Small-Region.svs"
needs_real_slide = pytest.mark.skipif(
    not REAL_SLIDE.is_file(), reason="shared/data/CMU-1-Small-Region.svs absent"
)
PARAMS = TilingParams(mpp=1.0, tile_size=64)

#: the checks each kind of bad slide must fail (it may fail more)
MUST_FAIL = {
    "fluorescence": {"background_bright", "tissue_absorbs", "tissue_h_and_e"},
    "inverted": {"background_bright", "tissue_absorbs", "tissue_h_and_e"},
    "ycbcr": {"background_neutral", "tissue_h_and_e"},
    "grb": {"tissue_h_and_e"},
}


@pytest.fixture(scope="module")
def good_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Synthetic H&E: a hard cohort (4 sites: every stain variant's cast), an easy one, and
    test slides on grey glass, pale, hard."""
    root = tmp_path_factory.mktemp("good")
    small = {"slide_mm": (1.0, 0.8), "progress": False, "workers": 1}
    hard = make_cohort(root / "hard", patients=4, sites=4, difficulty="hard", **small)
    easy = make_cohort(root / "easy", patients=2, sites=2, difficulty="easy", **small)
    assert {row["site"] for row in hard.slides} == {"S1", "S2", "S3", "S4"}
    groups = {c.params["difficulty"]: [c.out / r["path"] for r in c.slides] for c in (hard, easy)}
    size = {"width_um": 1000, "height_um": 800, "mpp": 0.5}
    for name, kwargs in {
        "grey": dict(seed=2, background="grey"),
        "pale": dict(seed=3, pale=True),
        "hard-pale-grey": dict(seed=7, difficulty="hard", pale=True, background="grey"),
    }.items():
        write_test_slide(root / f"{name}.svs", **size, **kwargs)
    groups["test slides"] = sorted(root.glob("*.svs"))
    return groups


@pytest.fixture(scope="module")
def bad_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A hard synthetic slide on grey glass and its recoloured copies, by kind."""
    root = tmp_path_factory.mktemp("bad")
    source = root / "source.svs"
    write_test_slide(
        source, width_um=1200, height_um=1000, seed=5, difficulty="hard", background="grey"
    )
    made = {kind: write_recoloured(source, root / f"{kind}.svs", kind) for kind in MUST_FAIL}
    return {"source": source, **made}


@pytest.mark.parametrize("group", ["hard", "easy", "test slides"])
def test_good_slides_pass(good_slides: dict[str, list[Path]], tmp_path: Path, group: str) -> None:
    report = tile_slides(good_slides[group], tmp_path / "t.zarr", PARAMS, progress=False)
    assert len(report.slides) == len(good_slides[group]) >= 3
    store = TileStore(tmp_path / "t.zarr")
    for row in report.slides:
        assert row["status"] == "ok", row["error"]
        qc = store.read(row["slide_id"]).attrs["qc"]
        assert qc["passed"] and qc["failed"] == [] and qc["mode"] == "fail"
        assert qc["background_od"] < 0.1 and qc["stain_angle"] < 6, (row["slide_id"], qc)
        assert qc["tissue_od"] > 0.08 and qc["message"] is None


@needs_real_slide
def test_real_slide_passes_and_its_recoloured_copies_fail(tmp_path: Path) -> None:
    bad = {kind: write_recoloured(REAL_SLIDE, tmp_path / f"{kind}.svs", kind) for kind in MUST_FAIL}
    report = tile_slides([REAL_SLIDE, *bad.values()], tmp_path / "t.zarr", progress=False)
    status = {s["slide_id"]: s["status"] for s in report.slides}
    assert status == {"CMU-1-Small-Region": "ok", **{kind: "failed" for kind in bad}}
    store = TileStore(tmp_path / "t.zarr")
    qc = store.read("CMU-1-Small-Region").attrs["qc"]
    assert qc["passed"] and qc["background_from"] == "glass" and qc["stain_angle"] < 3
    for kind, checks in MUST_FAIL.items():
        assert checks <= set(store.read(kind).attrs["qc"]["failed"]), kind


def test_bad_slides_fail_with_the_check_named(
    bad_slides: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "t.zarr"
    argv = ["tile", "--slides", *map(str, bad_slides.values()), "--out", str(out)]
    code = cli_main([*argv, "--mpp", "1.0", "--tile_size", "64", "--progress", "false"])
    assert code == 1
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["ok"] == 1 and sorted(line["failed_slides"]) == sorted(MUST_FAIL)
    store = TileStore(out)
    assert store.read("source").status == "ok" and store.read("source").attrs["qc"]["passed"]
    for kind, checks in MUST_FAIL.items():
        tiles = store.read(kind)
        assert tiles.status == "failed" and len(tiles) == 0
        error, qc = tiles.attrs["error"], tiles.attrs["qc"]
        assert checks <= set(qc["failed"]) and not qc["passed"], (kind, qc)
        assert f"{kind}.svs: not a brightfield H&E scan" in error
        for check in checks:
            assert f"{check}: " in error, (check, error)
        assert "--brightfield_qc warn" in error
    # the values against their limits
    assert "median angle of tissue OD to the H&E stain vectors" in store.read("grb").attrs["error"]
    assert "OD 1." in store.read("fluorescence").attrs["error"]  # dark glass: OD > 1
    assert "(at the border)" in store.read("ycbcr").attrs["error"]  # salmon everywhere


def test_warn_keeps_a_bad_slide_with_a_warning(
    bad_slides: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    out = tmp_path / "t.zarr"
    assert tile_slides([bad_slides["ycbcr"]], out, PARAMS, progress=False).failed  # default
    argv = ["tile", "--slides", str(bad_slides["ycbcr"]), "--out", str(out), "--mpp", "1.0"]
    with caplog.at_level(logging.WARNING):
        code = cli_main(
            [*argv, "--tile_size", "64", "--progress", "false", "--brightfield_qc", "warn"]
        )
    assert code == 0  # the failed slide is retried and now tiled
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["ok"] == 1 and line["qc_warned_slides"] == ["ycbcr"]
    tiles = TileStore(out).read("ycbcr")
    assert tiles.status == "ok" and len(tiles) > 0 and tiles.attrs["error"] is None
    assert tiles.attrs["qc"]["mode"] == "warn" and not tiles.attrs["qc"]["passed"]
    assert "ycbcr: brightfield QC failed (background_neutral" in caplog.text
    assert "--brightfield_qc warn" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        report = tile_slides(
            [bad_slides["fluorescence"]], out, PARAMS, progress=False, brightfield_qc="off"
        )
    assert report.slides[0]["status"] == "ok" and "brightfield QC" not in caplog.text
    assert TileStore(out).read("fluorescence").attrs["qc"]["mode"] == "off"
    with pytest.raises(ValueError, match="--brightfield_qc 'loose': choose one of"):
        tile_slides([bad_slides["source"]], out, PARAMS, brightfield_qc="loose")  # type: ignore[arg-type]


def test_help_explains_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["tile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--brightfield_qc {fail,warn,off}" in text
    assert "fluorescence, inverted or mis" in text and "'warn' tiles it with a warning" in text
    assert "Slides whose metadata has a µm/px keep it" in text and "--mpp_csv" in text


# -- the measures on arrays -----------------------------------------------------------------------


def _he_thumbnail(glass: int = 245) -> tuple[np.ndarray, np.ndarray]:
    """Pink stroma with purple nuclei on glass, and its tissue mask (light through the stain
    scales with the light through the glass)."""
    rng = np.random.default_rng(0)
    image = np.full((120, 160, 3), glass, np.float64) + rng.normal(0, 2, (120, 160, 3))
    mask = np.zeros((120, 160), bool)
    mask[30:90, 40:120] = True
    image[mask] = np.array([215, 150, 190]) * glass / 245  # eosin pink
    image[50:70, 60:80] = np.array([120, 60, 140]) * glass / 245  # haematoxylin purple
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.mark.parametrize("glass", [245, 207], ids=["white", "grey"])
def test_measures_of_h_and_e_and_its_corruptions(glass: int) -> None:
    he, mask = _he_thumbnail(glass)
    good = measure_brightfield(he, mask)
    assert good.passed and good.background_from == "glass"
    assert good.background_od == pytest.approx(np.log10(256 / (glass + 1)), abs=0.01)
    assert good.stain_angle is not None and good.stain_angle < 6

    inverted = measure_brightfield(255 - he, mask)
    assert {"background_bright", "tissue_absorbs", "tissue_h_and_e"} <= set(inverted.failed)
    assert inverted.tissue_od is not None and inverted.tissue_od < -0.2

    teal = he[..., [1, 2, 0]].copy()  # G, B, R → teal-ish tissue
    teal[~mask] = (245, 128, 128)  # salmon glass everywhere else
    everything = np.ones_like(mask)  # saturated glass is segmented as tissue too
    misdecoded = measure_brightfield(teal, everything)
    assert misdecoded.background_from == "border" and "background_neutral" in misdecoded.failed


def test_blank_glass_passes_without_tissue_measures() -> None:
    glass = np.full((50, 50, 3), 240, np.uint8)
    qc = measure_brightfield(glass, np.zeros((50, 50), bool))
    assert qc.passed and qc.tissue_od is None and qc.stain_angle is None
    dark = measure_brightfield(np.full((50, 50, 3), 10, np.uint8), np.zeros((50, 50), bool))
    assert dark.failed == ["background_bright"]


def test_optical_density() -> None:
    od = optical_density(np.array([[255, 25, 2]]), (255, 255, 255))
    assert od[0] == pytest.approx([0.0, np.log10(256 / 26), np.log10(256 / 3)], abs=1e-5)
    assert optical_density(np.array([200.0, 200, 200]), (100, 100, 100))[0] < 0  # brighter


def test_angle_to_cone_matches_a_brute_force_search() -> None:
    generators = np.asarray(list(STAIN_VECTORS.values()))
    rng = np.random.default_rng(0)
    # the cone, densely: every pair of generators mixed finely, and random mixtures of all
    t = np.linspace(0, 1, 2001)[:, None]
    pairs = [(1 - t) * generators[i] + t * generators[j] for i in range(4) for j in range(i + 1, 4)]
    points = np.concatenate([*pairs, rng.dirichlet(np.ones(4), 20000) @ generators])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    vectors = np.concatenate(
        [rng.normal(size=(300, 3)), rng.dirichlet(np.ones(4), 50) @ generators]
    )
    exact = angle_to_cone(vectors, generators)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    brute = np.degrees(np.arccos(np.clip(unit @ points.T, -1, 1))).min(axis=1)
    assert np.all(exact <= brute + 1e-3)  # never farther than a point of the cone
    outside = exact > 0  # the nearest point is on a face: sampled densely
    assert np.abs(exact - brute)[outside].max() < 0.05  # as close as the search finds
    assert np.all(exact[-50:] == 0)  # mixtures lie inside
    assert angle_to_cone(np.array([[0.83, 0.37, 0.41]]), generators)[0] > 20  # teal
