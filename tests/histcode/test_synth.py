"""Synthetic cohort: slide metadata, truth ↔ pixels, 20x ≡ 40x, expression, determinism, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from scipy import ndimage

from histcode.cli import main as cli_main
from histcode.slide import MissingMppError, SlideReader, slide_id
from histcode.synth import SlideTruth, make_cohort, write_test_slide
from histcode.synth.cells import Morphology, place_cells
from histcode.synth.cohort import GENES, expression_matrix, plan_cohort
from histcode.synth.render import SlideRenderer
from histcode.synth.stain import Stain
from histcode.synth.tissue import LayoutParams, make_layout

SMALL = dict(width_um=1000.0, height_um=750.0)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, SlideTruth]]:
    """Small slides (1 × 0.75 mm) and their truth."""
    root = tmp_path_factory.mktemp("synth")
    made = {}
    for name, kwargs in {
        "20x": dict(mpp=0.5, seed=1),
        "40x": dict(mpp=0.25, seed=1),
        "tiff": dict(mpp=0.5, seed=2, fmt="tiff"),
        "tiff-nompp": dict(mpp=0.5, seed=2, fmt="tiff", write_mpp=False),
        "blank": dict(mpp=0.5, seed=4, blank=True),
    }.items():
        path = root / f"{name}.{kwargs.get('fmt', 'svs')}"
        made[name] = (path, write_test_slide(path, **SMALL, **kwargs))
    return made


@pytest.mark.parametrize(("name", "mpp", "power"), [("40x", 0.25, 40), ("20x", 0.5, 20)])
def test_svs_is_aperio_with_mpp_and_power(slides, name: str, mpp: float, power: int) -> None:
    path, truth = slides[name]
    with openslide.OpenSlide(path) as s:
        props = s.properties
        assert props[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert float(props[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)
        assert float(props[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == power
        assert s.dimensions == (round(1000 / mpp), round(750 / mpp))
        assert s.level_count >= 2
    # the truth covers the slide from the level-0 origin at mask_mpp µm per pixel
    assert truth.mask_mpp == 8.0 and truth.tissue.shape == (94, 125)


def test_tiff_is_generic_with_or_without_mpp(slides) -> None:
    with SlideReader(slides["tiff"][0]) as r:
        assert r.vendor == "generic-tiff"
        assert r.mpp == pytest.approx(0.5)  # from the TIFF resolution tags
    with pytest.raises(MissingMppError):
        SlideReader(slides["tiff-nompp"][0])


def _cells_means(path: Path, truth: SlideTruth) -> np.ndarray:
    """Mean RGB of each truth-mask cell, (H_mask, W_mask, 3), from level 0."""
    with SlideReader(path) as r:
        w, h = r.dimensions
        image = r.read_region((0, 0), 0, (w, h)).astype(np.float32)
        k = round(truth.mask_mpp / r.mpp)
    hm, wm = h // k, w // k
    return image[: hm * k, : wm * k].reshape(hm, k, wm, k, 3).mean(axis=(1, 3))


def test_truth_lines_up_with_the_pixels(slides) -> None:
    path, truth = slides["20x"]
    means = _cells_means(path, truth)
    hm, wm = means.shape[:2]
    tissue = ndimage.binary_erosion(truth.tissue[:hm, :wm], iterations=2)
    glass = ~ndimage.binary_dilation(truth.tissue[:hm, :wm], iterations=2)
    brightness = means.mean(-1)
    saturation = means.max(-1) - means.min(-1)
    assert brightness[tissue].mean() < brightness[glass].mean() - 40
    assert saturation[tissue].mean() > saturation[glass].mean() + 30
    assert np.median(brightness[glass]) > 235  # white glass
    # easy tumour: nuclei larger, darker, denser → much more red absorbed than normal tissue
    tumour = ndimage.binary_erosion(truth.tumour[:hm, :wm], iterations=2)
    normal = ndimage.binary_erosion(
        (truth.tissue & ~truth.tumour & ~truth.lymphocyte)[:hm, :wm], iterations=2
    )
    assert tumour.sum() > 20 and normal.sum() > 20
    red = means[..., 0]
    assert red[tumour].mean() < red[normal].mean() - 25


def test_20x_is_the_40x_averaged_2x2(slides) -> None:
    p20, t20 = slides["20x"]
    p40, t40 = slides["40x"]
    assert np.array_equal(t20.tissue, t40.tissue) and np.array_equal(t20.tumour, t40.tumour)
    rng = np.random.default_rng(0)
    diffs = []
    with SlideReader(p20) as r20, SlideReader(p40) as r40:
        for _ in range(12):
            x, y = int(rng.integers(0, 1744)), int(rng.integers(0, 1244))
            a = r20.read_region((x, y), 0, (256, 256)).astype(np.float32)
            b = r40.read_region((2 * x, 2 * y), 0, (512, 512)).astype(np.float32)
            diffs.append(np.abs(a - b.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))).mean())
    assert np.mean(diffs) < 6, f"20x and 40x differ by {np.mean(diffs):.1f} grey levels"


def test_blank_slide_is_glass(slides) -> None:
    path, truth = slides["blank"]
    assert not truth.tissue.any() and truth.tumour_fraction == 0.0
    with SlideReader(path) as r:
        thumb, _ = r.thumbnail(8.0)
    assert np.percentile(thumb, 1) > 225


def test_truth_round_trips(slides, tmp_path: Path) -> None:
    truth = slides["20x"][1]
    loaded = SlideTruth.load(truth.save(tmp_path / "t.npz"))
    assert loaded.mask_mpp == truth.mask_mpp
    for name in ("tissue", "tumour", "lymphocyte"):
        assert np.array_equal(getattr(loaded, name), getattr(truth, name))
    assert 0.3 < truth.tumour_fraction < 0.5  # easy: ~40 % of the tissue
    with pytest.raises(FileNotFoundError):
        SlideTruth.load(tmp_path / "missing.npz")


def test_same_seed_same_pixels(slides, tmp_path: Path) -> None:
    again = tmp_path / "again.svs"
    write_test_slide(again, **SMALL, mpp=0.5, seed=1)
    with SlideReader(slides["20x"][0]) as a, SlideReader(again) as b:
        for level in range(a.level_count):
            size = a.level_dimensions[level]
            assert np.array_equal(
                a.read_region((0, 0), level, size), b.read_region((0, 0), level, size)
            )


def test_any_region_renders_the_same() -> None:
    layout = make_layout(LayoutParams(600.0, 450.0, 0.4, "regions", 0.1), seed=3)
    morph = Morphology.preset("hard")
    render = SlideRenderer(layout, place_cells(layout, morph, 3), morph, Stain(), mpp=0.5)
    full = render.region(0.5, 0, 0, 1200, 900)
    part = render.region(0.5, 317, 211, 300, 257)
    assert np.array_equal(full[211:468, 317:617], part)
    assert full.std() > 10  # not blank


def test_hard_tumour_is_small_foci() -> None:
    params = LayoutParams(3000.0, 2250.0, 0.04, "foci", 0.1)
    truth = make_layout(params, seed=5).truth()
    assert truth.tumour_fraction == pytest.approx(0.04, abs=0.005)
    _, n = ndimage.label(truth.tumour)
    assert 2 <= n <= 12


def test_plan_barcodes_sites_and_scans() -> None:
    plans = plan_cohort(patients=12, seed=0, difficulty="hard")
    ids = [p.slide_id for p in plans]
    assert len(set(ids)) == len(ids) == 18
    for p in plans:
        assert p.slide_id.startswith("TCGA-") and len(p.slide_id) == 23
        assert p.patient_id == p.slide_id[:12]
        code = int(p.slide_id[13:15])
        assert (1 <= code <= 9) == (p.sample_type == "tumour")
        assert (10 <= code <= 19) == (p.sample_type == "normal")
        assert p.slide_id[5:7] == p.site and slide_id(f"/x/{p.file_name}") == p.slide_id
        assert (p.mpp, p.objective_power) in ((0.25, 40), (0.5, 20))
    patients = {p.patient_id for p in plans}
    assert {p.patient_id for p in plans if p.sample_type == "tumour"} == patients
    for site in {p.site for p in plans}:  # sites not confounded with the label
        assert {p.sample_type for p in plans if p.site == site} == {"tumour", "normal"}
    assert {p.mpp for p in plans} == {0.25, 0.5} and {p.fmt for p in plans} == {"svs", "tiff"}
    assert sum(p.sample_type == "normal" for p in plan_cohort(patients=3, normal_fraction=0)) == 2
    with pytest.raises(ValueError, match="patients"):
        plan_cohort(patients=1)


def test_normal_sites_put_normals_only_in_the_first_sites() -> None:
    default = plan_cohort(patients=20, seed=0, difficulty="hard")
    assert plan_cohort(patients=20, seed=0, difficulty="hard", normal_sites=None) == default
    # every site allowed: the same draws as the default, slide for slide
    assert plan_cohort(patients=20, seed=0, difficulty="hard", normal_sites=3) == default
    for k in (1, 2):
        plans = plan_cohort(patients=20, seed=0, difficulty="hard", normal_sites=k)
        allowed = {f"S{i + 1}" for i in range(k)}
        normals = [p for p in plans if p.sample_type == "normal"]
        assert {p.site for p in normals} == allowed  # normals in every chosen site, only there
        assert {p.site for p in plans if p.sample_type == "tumour"} == {"S1", "S2", "S3"}
        assert all(p.slide_id[5:7] == p.site for p in normals)
    # as many normals as without it (10 of 20 patients), at most the patients of S1 (7)
    assert sum(p.sample_type == "normal" for p in plans) == 10
    one = plan_cohort(patients=20, seed=0, difficulty="hard", normal_sites=1)
    assert sum(p.sample_type == "normal" for p in one) == 7
    for bad in (0, 4):
        with pytest.raises(ValueError, match="normal_sites"):
            plan_cohort(patients=20, sites=3, normal_sites=bad)
    with pytest.raises(ValueError, match="≥ 2 normal slides"):
        plan_cohort(patients=3, sites=3, normal_sites=1)


def test_expression_follows_true_fractions() -> None:
    plans = plan_cohort(patients=16, seed=1, difficulty="hard", slide_mm=(2.0, 1.5))
    truths = [make_layout(p.layout, p.seed).truth() for p in plans]
    tumour = np.array([t.tumour_fraction for t in truths])
    lymph = np.array([t.lymphocyte_fraction for t in truths])
    values, genes = expression_matrix([p.sample_id for p in plans], tumour, lymph, "hard", 1)
    assert (values >= 0).all() and values.shape == (len(GENES), len(plans))
    log2 = np.log2(values + 1)
    for (name, role, direction, _), row in zip(GENES, log2, strict=True):
        r_t = np.corrcoef(row, tumour)[0, 1]
        r_l = np.corrcoef(row, lymph)[0, 1]
        assert genes[name]["role"] == role and genes[name]["direction"] == direction
        if role == "tumour":
            assert (r_t if direction == "up" else -r_t) > 0.7, (name, r_t)
        elif role == "lymphocyte":
            assert r_l > 0.7, (name, r_l)
        else:
            assert abs(r_t) < 0.5 and abs(r_l) < 0.5, (name, r_t, r_l)


def test_cohort_files_resume_and_refuse_other_parameters(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    kwargs = dict(
        patients=2, seed=3, difficulty="easy", slide_mm=(0.8, 0.6), progress=False, workers=1
    )
    cohort = make_cohort(out, **kwargs)
    assert len(cohort.written) == 4 and not cohort.skipped  # 2 tumour + 2 normal (minimum)
    with open(out / "cohort.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows] == [r["slide_id"] for r in cohort.slides]
    for row in rows:
        assert (out / row["path"]).is_file()
        assert (out / "truth" / f"{row['slide_id']}.npz").is_file()
        assert (float(row["tumour_fraction"]) > 0.2) == (row["sample_type"] == "tumour")
    with open(out / "expression.tsv") as f:
        header = f.readline().rstrip("\n").split("\t")
    assert header[0] == "gene" and header[1:] == [r["slide_id"][:16] for r in rows]
    genes = json.loads((out / "genes.json").read_text())
    assert {g["role"] for g in genes.values()} == {"tumour", "lymphocyte", "noise"}
    assert json.loads((out / "cohort.json").read_text())["complete"] is True
    again = make_cohort(out, **kwargs)
    assert not again.written and len(again.skipped) == 4
    with pytest.raises(FileExistsError, match="other parameters"):
        make_cohort(out, **{**kwargs, "seed": 4})
    assert "normal_sites" not in json.loads((out / "cohort.json").read_text())["parameters"]
    with pytest.raises(FileExistsError, match="normal_sites"):
        make_cohort(out, **{**kwargs, "normal_sites": 2})


def test_cli_normal_sites_recorded_in_cohort(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c"
    argv = ["synth", "--out", str(out), "--patients", "4", "--sites", "2", "--normal_sites", "1"]
    argv += ["--slide_mm", "[0.6, 0.5]", "--difficulty", "easy", "--progress", "false"]
    assert cli_main([*argv, "--workers", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["sites"] == ["S1", "S2"] and result["sites_with_normals"] == ["S1"]
    assert json.loads((out / "cohort.json").read_text())["parameters"]["normal_sites"] == 1
    with open(out / "cohort.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["site"] for r in rows if r["sample_type"] == "normal"} == {"S1"}
    assert all(r["site"] == r["slide_id"][5:7] for r in rows)
    assert cli_main([*argv[:-2], "--normal_sites", "2", "--workers", "1"]) == 2  # other setting


def test_cli_writes_summary_and_json_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c"
    argv = [
        "synth",
        "--out",
        str(out),
        "--patients",
        "2",
        "--slide_mm",
        "[0.6, 0.5]",
        "--difficulty",
        "easy",
        "--progress",
        "false",
        "--workers",
        "1",
    ]
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["slides"] == 4 and result["patients"] == 2 and result["genes"] == len(GENES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == "histcode synth" and len(summary["slides"]) == 4
    assert cli_main(["synth", "--out", str(out), "--patients", "0"]) == 2
    with pytest.raises(SystemExit) as exit_:
        cli_main(["synth", "--help"])
    assert exit_.value.code == 0 and "--normal_fraction" in capsys.readouterr().out
