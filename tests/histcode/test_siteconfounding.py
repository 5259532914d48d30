"""Site confounding: the site-only AUC, its permutation test and the warning, from labels and
from slide file names (the demo's check before tiling)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from histcode.siteconfounding import site_confounding, site_confounding_warning


def test_site_confounding_names_the_shortcut_and_stays_quiet_on_chance() -> None:
    """Every normal slide from site S1 of three (as ``histcode synth --normal_sites 1``): the
    site alone ranks tumour above normal at AUC 0.83 (S1's tumour share 0.5, the others' 1;
    hand count: 20 of 30 tumours above every normal, 10 tied), far above what shuffled labels
    give. Sites holding tumour and normal in like shares, or drawn at random, do not warn."""
    sites = ["S1"] * 20 + ["S2"] * 10 + ["S3"] * 10
    tumour = [1.0] * 10 + [0.0] * 10 + [1.0] * 20
    found = site_confounding(sites, tumour)
    assert math.isclose(found["site_only_auc"], (20 * 10 + 0.5 * 10 * 10) / 300)
    assert found["confounded"] and found["p_value"] < 0.01 and found["chance_auc"] < 0.7
    assert found["tumour_only_sites"] == ["S2", "S3"] and found["normal_by_site"]["S1"] == 10
    warning = site_confounding_warning(found)
    assert "AUC 0.83" in warning and "S1 10" in warning and "S2, S3" in warning
    assert "--stain_norm macenko" in warning and "within-site" in warning
    normalised = site_confounding_warning(found, "macenko")
    assert "stain-normalised (macenko)" in normalised and "--stain_norm macenko" not in normalised

    balanced = site_confounding(sites, [1.0, 0.0] * 20)
    assert balanced["site_only_auc"] == 0.5 and not balanced["confounded"]
    assert site_confounding_warning(balanced) is None
    rng = np.random.default_rng(0)
    alarms = [
        site_confounding(rng.choice(["A", "B", "C"], 45), rng.permutation([1.0] * 30 + [0.0] * 15),
                         resamples=500)["confounded"]
        for _ in range(40)
    ]  # fmt: skip
    assert sum(alarms) <= 2  # the test's 1 % (random site-only AUCs reach 0.7 one time in 20)
    unknown = site_confounding(["", "", "A", "A"], [1.0, 0.0, 1.0, float("nan")])
    assert not unknown["available"] and math.isnan(unknown["site_only_auc"])


class _Said:
    """Collects what the demo's runner would print."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)


def test_demo_warns_from_the_slide_names_before_tiling(tmp_path: Path) -> None:
    """30 patients over sites S1-S3, a normal slide for the 10 patients of S1 only: the demo
    names the shortcut from the file names alone (empty files: nothing is read), before any
    tiling; a cohort with normals at every site, or without TCGA names, says nothing."""
    from histcode.demo import _check_sites

    confounded, balanced = tmp_path / "confounded", tmp_path / "balanced"
    for folder in (confounded, balanced):
        folder.mkdir()
        (folder / "notes.svs").touch()  # no barcode: left to the tile step
    for i in range(30):
        site = f"S{i % 3 + 1}"
        for folder in (confounded, balanced):
            (folder / f"TCGA-{site}-{i:04d}-01A-01-TS1.svs").touch()
        if site == "S1":
            (confounded / f"TCGA-{site}-{i:04d}-11A-01-TS1.svs").touch()
        if i < 15:  # five normals at each site
            (balanced / f"TCGA-{site}-{i:04d}-11A-01-TS1.svs").touch()
    said = _Said()
    found = _check_sites(said, confounded, "macenko")
    assert found is not None and found["confounded"] and found["slides"] == 40
    assert len(said.lines) == 1 and "from the slide file names" in said.lines[0]
    assert "S1 10" in said.lines[0] and "stain-normalised (macenko)" in said.lines[0]
    said = _Said()
    found = _check_sites(said, balanced, "none")
    assert found is not None and not found["confounded"] and said.lines == []
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "slide-1.svs").touch()
    assert _check_sites(_Said(), plain, "none") is None
