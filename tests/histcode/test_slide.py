"""µm/px resolution, slide ids and segmentation."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from histcode.segmentation import otsu_threshold, segment_tissue
from histcode.slide import MissingMppError, SlideError, SlideReader, resolve_mpp, slide_id


def test_mpp_from_openslide_properties() -> None:
    props = {"openslide.mpp-x": "0.2501", "openslide.mpp-y": "0.2499"}
    got = resolve_mpp(props, "s.svs")
    assert got.mpp == pytest.approx(0.25) and got.source == "openslide"


@pytest.mark.parametrize(
    ("unit", "res", "mpp"), [("centimeter", 40000.0, 0.25), ("inch", 50800.0, 0.5)]
)
def test_mpp_from_tiff_resolution(unit: str, res: float, mpp: float) -> None:
    props = {
        "tiff.ResolutionUnit": unit,
        "tiff.XResolution": str(res),
        "tiff.YResolution": str(res),
    }
    got = resolve_mpp(props, "s.tiff")
    assert got.mpp == pytest.approx(mpp) and got.source == "tiff-resolution"


def test_tiff_resolution_without_unit_is_ignored() -> None:
    props = {"tiff.ResolutionUnit": "none", "tiff.XResolution": "1", "tiff.YResolution": "1"}
    with pytest.raises(MissingMppError, match="--mpp_override"):
        resolve_mpp(props, "s.tiff")


def test_mpp_from_objective_power_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        got = resolve_mpp({"openslide.objective-power": "20"}, "s.svs")
    assert got.mpp == pytest.approx(0.5) and got.source == "objective-power"
    assert "assuming 0.5 µm/px from objective power 20x" in caplog.text


def test_override_wins_and_is_checked() -> None:
    assert (
        resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, "s", 0.5).source
        == "override"
    )
    with pytest.raises(ValueError, match="not a plausible"):
        resolve_mpp({}, "s", 250.0)


NDPI_228 = {"openslide.mpp-x": "0.228", "openslide.mpp-y": "0.228"}


def test_fallback_applies_only_without_metadata(caplog: pytest.LogCaptureFixture) -> None:
    """--mpp_override: an NDPI at 0.228 µm/px keeps it; a slide without µm/px gets it."""
    got = resolve_mpp(NDPI_228, "s.ndpi", mpp_fallback=0.5)
    assert got.mpp == pytest.approx(0.228) and got.source == "openslide"
    got = resolve_mpp({}, "s.tiff", mpp_fallback=0.5)
    assert got.mpp == 0.5 and got.source == "override" and got.replaced is None
    with caplog.at_level(logging.WARNING):  # it beats the objective-power guess, silently
        got = resolve_mpp({"openslide.objective-power": "20"}, "s.svs", mpp_fallback=0.25)
    assert got.mpp == 0.25 and got.source == "override" and "assuming" not in caplog.text
    with pytest.raises(ValueError, match=r"--mpp_override 0\.001 is not a plausible"):
        resolve_mpp({}, "s.tiff", mpp_fallback=0.001)


def test_override_records_the_metadata_it_replaces() -> None:
    got = resolve_mpp(NDPI_228, "s.ndpi", mpp_override=0.5)
    assert got.mpp == 0.5 and got.source == "override" and got.replaced == (0.228, "openslide")
    assert resolve_mpp({}, "s.tiff", mpp_override=0.5).replaced is None


def test_missing_mpp_names_file_and_fix() -> None:
    with pytest.raises(MissingMppError, match=r"x\.tiff.*--mpp_override.*--mpp_csv"):
        resolve_mpp({}, "x.tiff")


def test_slide_ids() -> None:
    assert slide_id("/a/TCGA-AA-0001-01A-01-TS1.svs") == "TCGA-AA-0001-01A-01-TS1"
    assert slide_id("b/x.ome.tiff") == "x.ome"
    with pytest.raises(ValueError, match="cannot name an output"):
        slide_id("/a/.hidden.svs")
    # a DICOM slide is a folder of .dcm files (one per level): the folder names it
    assert slide_id("/data/TCGA-AA-0002-01A/level-0.dcm") == "TCGA-AA-0002-01A"


def test_reader_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.svs"):
        SlideReader(tmp_path / "missing.svs")
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    with pytest.raises(SlideError, match=r"bad\.svs: not a slide"):
        SlideReader(bad)


def test_otsu_splits_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 5000)])
    assert 0.2 < otsu_threshold(np.clip(values, 0, 1)) < 0.5


@pytest.mark.parametrize("glass", [245, 205], ids=["white", "grey"])
def test_segmentation_finds_pink_tissue_not_glass(glass: int) -> None:
    rng = np.random.default_rng(0)
    image = np.full((200, 200, 3), glass, np.float64) + rng.normal(0, 2, (200, 200, 3))
    image[50:150, 60:160] = (215, 150, 190)  # eosin pink
    image[100:110, 100:110] = (120, 60, 140)  # a nucleus cluster
    mask = segment_tissue(np.clip(image, 0, 255).astype(np.uint8), mpp=8.0)
    assert mask[55:145, 65:155].all() and mask[:40].sum() == 0 and mask[:, :50].sum() == 0


def test_segmentation_of_blank_glass_is_empty() -> None:
    rng = np.random.default_rng(1)
    image = np.clip(240 + rng.normal(0, 3, (300, 300, 3)), 0, 255).astype(np.uint8)
    assert not segment_tissue(image, mpp=8.0).any()
