"""Real TCGA downloads in, correct labels out.

Every layout (GDC folder with both sample-sheet forms, cBioPortal, both Xena flavours, our
own TSV) is written by the tests exactly as shipped, from one known TPM matrix, and must give
the same targets as that clean matrix; every way a download could silently give wrong
targets (slides matched to the wrong sample, units taken for others, other normal types in
the reference) is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histcode.cli import run_captured
from histcode.finetune.labels import (
    build_labels,
    load_labels,
    match_samples,
    match_slides,
    read_expression,
    read_label_table,
    table_from_slide_ids,
)
from tests.finetune.tcga_downloads import (
    REFERENCE,
    TARGET_GENES,
    make_download,
    write_cbioportal,
    write_clean,
    write_gdc,
    write_xena,
)


@pytest.fixture
def download(tmp_path: Path):
    return make_download(tmp_path)


def clean_targets(d, genes=TARGET_GENES, **kw) -> np.ndarray:
    """Targets of the known clean TPM matrix for the download's slides."""
    return load_labels(None, d.clean_tsv, d.slide_ids, genes=genes, strict=False, **kw).log2fc


def cohort_targets(out: Path, d, **kw) -> np.ndarray:
    """Targets from the cohort's own table and matrix, in the slides' order."""
    labels = load_labels(
        out / "cohort.csv", out / "expression.tsv", [], genes=TARGET_GENES, strict=False, **kw
    )
    return labels.log2fc[labels.index(d.slide_ids)]


def run_cohort(*args: str) -> tuple[int, dict | None]:
    return run_captured(["cohort", *args])


# -- matching slides to expression samples ------------------------------------------------------


def test_dx_slide_matches_the_only_rna_sample_of_its_type() -> None:
    assert match_samples(["TCGA-A1-A0SB-01Z-00-DX1"], ["TCGA-A1-A0SB-01A"]) == {
        "TCGA-A1-A0SB-01Z-00-DX1": "TCGA-A1-A0SB-01A"
    }
    slides = [
        "TCGA-A1-A0SB-01Z-00-DX1.8B2E7F40-1C1D-4E0A-9A3F-2B5C0D6E7F81",  # upper-case UUID
        "TCGA-A1-A0SB-01Z-00-DX2.8b2e7f40-1c1d-4e0a-9a3f-2b5c0d6e7f82",  # lower-case UUID
        "tcga-a1-a0sb-01a-01-ts1.8b2e7f40-1c1d-4e0a-9a3f-2b5c0d6e7f83",
        "TCGA-A1-A0SB-11A-01-TS1.8b2e7f40-1c1d-4e0a-9a3f-2b5c0d6e7f84",  # no 11 sample
    ]
    got = match_slides(slides, ["TCGA-A1-A0SB-01A", "TCGA-A1-A0SB-06A"])
    assert [got[s].column for s in slides] == [
        "TCGA-A1-A0SB-01A",
        "TCGA-A1-A0SB-01A",
        "TCGA-A1-A0SB-01A",
        None,
    ]
    assert "diagnostic slide (vial Z)" in got[slides[0]].how
    assert got[slides[3]].how == "no expression sample TCGA-A1-A0SB-11A"
    # two samples of the DX slide's type: ambiguous, named, never a silent pick
    got = match_slides(slides[:1], ["TCGA-A1-A0SB-01A", "TCGA-A1-A0SB-01B"])
    assert got[slides[0]].column is None and got[slides[0]].candidates == (
        "TCGA-A1-A0SB-01A",
        "TCGA-A1-A0SB-01B",
    )
    with pytest.raises(ValueError, match=r"DX1.*→ TCGA-A1-A0SB-01A, TCGA-A1-A0SB-01B"):
        match_samples(slides[:1], ["TCGA-A1-A0SB-01A", "TCGA-A1-A0SB-01B"])


def test_all_dx_cohort_gets_gene_targets(download) -> None:
    """Before: an all-DX cohort stopped ("no tumour slide matches"); a mixed one dropped DX."""
    dx = [s for s in download.slide_ids if "-DX" in s and "A0B3" not in s]
    labels = load_labels(None, download.clean_tsv, dx, genes=["MYC"])
    assert labels.gene_mask.all()
    t = download.tpm
    ref = t[REFERENCE].loc["MYC"].mean()
    expected = np.log2((t.loc["MYC", "TCGA-A1-A0SB-01A"] + 1) / (ref + 1))
    assert labels.log2fc[0, 0] == pytest.approx(expected, rel=1e-6)
    # the two slides of one sample share its targets (metrics average them per sample)
    a04p = [i for i, s in enumerate(dx) if "A04P" in s]
    assert len(a04p) == 2 and labels.sample_ids[a04p[0]] == labels.sample_ids[a04p[1]]


# -- the normal reference -----------------------------------------------------------------------


def test_other_normal_types_stay_out_of_the_reference(download) -> None:
    """Before: blood (10) and bone-marrow (14) normals entered every fold change."""
    labels = load_labels(None, download.clean_tsv, download.slide_ids, genes=["MYC"], strict=False)
    assert labels.reference == REFERENCE
    assert any("TCGA-AR-A1AR-10A (10 Blood Derived Normal)" in w for w in labels.warnings)
    t = download.tpm.loc["MYC"]
    row = labels.index([download.slide_ids[0]])[0]
    assert labels.log2fc[row, 0] == pytest.approx(
        np.log2((t["TCGA-A1-A0SB-01A"] + 1) / (t[REFERENCE].mean() + 1)), rel=1e-6
    )
    every = load_labels(
        None,
        download.clean_tsv,
        download.slide_ids,
        genes=["MYC"],
        strict=False,
        normal_types=[10, 11, 14],
    )
    assert sorted(every.reference) == sorted([*REFERENCE, "TCGA-AR-A1AR-10A", "TCGA-B6-A0RE-14A"])
    assert not np.allclose(every.log2fc[row], labels.log2fc[row])
    with pytest.raises(ValueError, match="normal_types must be TCGA normal sample types"):
        load_labels(
            None,
            download.clean_tsv,
            download.slide_ids,
            genes=["MYC"],
            strict=False,
            normal_types=[1],
        )


# -- units --------------------------------------------------------------------------------------


def test_xena_log_matrix_is_refused_as_tpm_and_unlogged_on_request(download) -> None:
    """Before: taken as linear TPM (tiny fold changes, no 'up' gene, no warning)."""
    xena, _ = write_xena(download, "symbols")
    with pytest.raises(ValueError, match=r"HiSeqV2: every value is below 30.*--data.units log2tpm"):
        load_labels(None, xena, download.slide_ids, genes=TARGET_GENES, strict=False)
    with pytest.raises(ValueError, match=r"HiSeqV2.*counts"):
        load_labels(None, xena, download.slide_ids, genes=["MYC"], units="counts", strict=False)
    got = load_labels(
        None, xena, download.slide_ids, genes=TARGET_GENES, units="log2tpm", strict=False
    )
    np.testing.assert_allclose(got.log2fc, clean_targets(download), atol=2e-4)
    # log2tpm on linear values is refused too
    with pytest.raises(ValueError, match=r"not log2 scale.*ACTB.*--data.units tpm"):
        load_labels(None, download.clean_tsv, download.slide_ids, units="log2tpm", strict=False)


def test_log2_offset_0001_needs_its_offset(download) -> None:
    xena, probemap = write_xena(download, "ensembl_001")
    frame = read_expression(xena, {"ENSG00000136997": "MYC"} | _probemap(probemap))
    table = table_from_slide_ids(download.slide_ids)
    with pytest.raises(ValueError, match=r"below log2\(1\).*--data.log_offset 0.001"):
        build_labels(table, frame, TARGET_GENES, units="log2tpm", strict=False)
    got = build_labels(table, frame, TARGET_GENES, units="log2tpm", log_offset=0.001, strict=False)
    np.testing.assert_allclose(got.log2fc, clean_targets(download), atol=2e-4)


def _probemap(path: Path) -> dict[str, str]:
    from histcode.finetune.expression import read_gene_map

    return read_gene_map(path)


def test_count_summary_rows_never_enter_the_library_size(download, tmp_path: Path) -> None:
    """Before: N_* rows kept in a counts matrix entered the library (MYC 0.76 → 1.15)."""
    counts = download.counts
    plain = write_clean(tmp_path / "counts.tsv", counts)
    extra = pd.DataFrame(
        [[2_000_000] * counts.shape[1]] * 4,
        index=pd.Index(["N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"]),
        columns=counts.columns,
    )
    with_rows = write_clean(tmp_path / "counts_n.tsv", pd.concat([extra, counts]))
    a = load_labels(
        None, plain, download.slide_ids, genes=TARGET_GENES, units="counts", strict=False
    )
    b = load_labels(
        None, with_rows, download.slide_ids, genes=TARGET_GENES, units="counts", strict=False
    )
    np.testing.assert_allclose(b.log2fc, a.log2fc, rtol=1e-12)
    assert "N_unmapped" not in read_expression(with_rows).index


def test_negative_matrix_names_the_cell_and_fix(tmp_path: Path, download) -> None:
    frame = download.tpm - 5
    path = write_clean(tmp_path / "z.tsv", frame)
    with pytest.raises(
        ValueError, match=r"z.tsv: \d+ negative value\(s\), e.g. \w+/TCGA-.*log2tpm"
    ):
        load_labels(None, path, download.slide_ids, genes=["MYC"], strict=False)


# -- histcode cohort on every download layout ---------------------------------------------------


def _check_tables(out: Path, d) -> dict:
    table = pd.read_csv(out / "cohort.csv", dtype=str, keep_default_na=False).set_index("slide_id")
    assert sorted(table.index) == sorted(d.slide_ids)
    dx = next(s for s in d.slide_ids if s.startswith("TCGA-A1-A0SB-01Z-00-DX1"))
    row = table.loc[dx]
    assert row["site"] == "A1" and row["patient_id"] == "TCGA-A1-A0SB"
    assert row["sample"] == "TCGA-A1-A0SB-01Z" and row["slide_type"].startswith("DX1 diagnostic")
    assert row["sample_id"].startswith("TCGA-A1-A0SB-01") and row["gene_targets"] == "yes"
    assert row["slides_of_sample"] == "2"  # the DX1 and the TS1 slide of 01A
    assert row["aggregation"] == "per sample: mean of 2 slides"
    missing = next(s for s in d.slide_ids if s.startswith("TCGA-BH-A0B3-01Z"))
    assert table.loc[missing, "sample_id"] == ""
    assert table.loc[missing, "match"].startswith("no expression sample TCGA-BH-A0B3-01")
    samples = pd.read_csv(out / "samples.csv", dtype=str, keep_default_na=False)
    roles = dict(zip(samples["sample_id"].str[:15], samples["role"], strict=True))
    assert roles["TCGA-BH-A0B3-11"] == "normal reference"
    assert roles["TCGA-AR-A1AR-10"].startswith("left out of the reference: type 10")
    assert roles["TCGA-BH-A0BZ-01"] == "tumour without slide"
    summary = json.loads((out / "cohort.json").read_text())
    assert summary["slides"] == 8 and summary["patients"] == 5
    assert summary["slides_per_patient"] == {"1": 3, "2": 1, "3": 1}
    assert summary["tumour_slides"] == 7 and summary["normal_slides"] == 1
    assert summary["tumour_slides_with_targets"] == 6
    assert [s[:15] for s in summary["normal_reference"]] == [r[:15] for r in REFERENCE]
    assert list(summary["tumour_slides_without_sample"]) == [missing]
    head = (out / "expression.tsv").read_text().splitlines()
    assert head[0] == "# units: tpm" and head[4].startswith("gene\t")
    labels = read_label_table(out / "cohort.csv")  # the table is a labels CSV
    assert labels["site"].tolist()[:1] == ["A1"]
    return summary


@pytest.mark.parametrize("sheet_columns", [11, 8])
def test_gdc_download_gives_the_clean_matrix_targets(download, sheet_columns: int) -> None:
    folder, sheet = write_gdc(download, sheet_columns)
    out = download.root / "cohort"
    code, result = run_cohort(
        "--slides", str(download.slides), "--expression", str(folder),
        "--sample_sheet", str(sheet), "--out", str(out),
    )  # fmt: skip
    assert code == 0, result
    summary = _check_tables(out, download)
    assert "--data.strict_ids false" in result["finetune"]
    assert any("4 count-summary" in n or "_PAR_Y" in n for n in summary["notes"])
    assert any("MATR3" in n for n in summary["notes"])  # the rule for repeated symbols
    np.testing.assert_allclose(cohort_targets(out, download), clean_targets(download), atol=1e-5)


def test_gdc_counts_column_is_cpm_over_gene_rows(download, tmp_path: Path) -> None:
    folder, sheet = write_gdc(download, extra_aliquot=True)  # the sheet is found in the folder
    sheet.rename(folder / sheet.name)
    out = download.root / "cohort"
    code, result = run_cohort(
        "--slides", str(download.slides), "--expression", str(folder), "--out", str(out),
        "--gdc_column", "unstranded",
    )  # fmt: skip
    assert code == 0, result
    assert "CPM of GDC 'unstranded' counts over gene rows" in result["units"]
    raw = write_clean(tmp_path / "counts.tsv", download.counts)
    expected = load_labels(
        None, raw, download.slide_ids, genes=TARGET_GENES, units="counts", strict=False
    ).log2fc
    np.testing.assert_allclose(cohort_targets(out, download), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"says its units are 'tpm'.*--data.units tpm"):
        load_labels(out / "cohort.csv", out / "expression.tsv", [], units="counts", strict=False)


def test_cbioportal_file_gives_the_clean_matrix_targets(download) -> None:
    path = write_cbioportal(download)
    out = download.root / "cohort"
    code, result = run_cohort(
        "--slides", str(download.slides), "--expression", str(path), "--out", str(out)
    )
    assert code == 0, result
    _check_tables(out, download)
    np.testing.assert_allclose(cohort_targets(out, download), clean_targets(download), atol=1e-5)


@pytest.mark.parametrize(
    ("flavour", "offset"), [("ensembl", "1"), ("symbols", "1"), ("ensembl_001", "0.001")]
)
def test_xena_matrix_gives_the_clean_matrix_targets(download, flavour: str, offset: str) -> None:
    path, probemap = write_xena(download, flavour)
    out = download.root / "cohort"
    out.mkdir()
    (out / "cohort.csv").write_text("an earlier cohort\n")
    args = ["--slides", str(download.slides), "--expression", str(path), "--out", str(out)]
    if probemap:
        args += ["--gene_map", str(probemap)]
    code, result = run_cohort(*args)
    assert code == 2 and result is None  # refused: log scale, nothing written
    assert (out / "cohort.csv").read_text() == "an earlier cohort\n"
    assert not (out / "expression.tsv").exists()
    code, result = run_cohort(*args, "--units", "log2tpm", "--log_offset", offset)
    assert code == 0, result
    _check_tables(out, download)
    np.testing.assert_allclose(cohort_targets(out, download), clean_targets(download), atol=2e-4)


def test_own_matrix_and_normal_types(download) -> None:
    out = download.root / "cohort"
    code, result = run_cohort(
        "--slides", str(download.slides), "--expression", str(download.clean_tsv),
        "--out", str(out), "--normal_types", "10", "11",
    )  # fmt: skip
    assert code == 0 and "--data.normal_types 10 11" in result["finetune"]
    summary = json.loads((out / "cohort.json").read_text())
    assert "TCGA-AR-A1AR-10A" in summary["normal_reference"]
    assert summary["normals_left_out"] == ["TCGA-B6-A0RE-14A (14 Bone Marrow Normal)"]
    np.testing.assert_allclose(
        cohort_targets(out, download, normal_types=[10, 11]),
        clean_targets(download, normal_types=[10, 11]),
        atol=1e-5,
    )


def test_ambiguous_dx_slide_is_listed_and_exit_1(download) -> None:
    matrix = download.tpm.copy()
    matrix["TCGA-AR-A1AR-01B"] = matrix["TCGA-AR-A1AR-01A"]
    write_clean(download.clean_tsv, matrix)
    out = download.root / "cohort"
    code, result = run_cohort(
        "--slides", str(download.slides), "--expression", str(download.clean_tsv),
        "--out", str(out),
    )  # fmt: skip
    assert code == 1 and result["ambiguous_slides"] == 1
    table = pd.read_csv(out / "cohort.csv", dtype=str, keep_default_na=False)
    row = table[table["slide_id"].str.startswith("TCGA-AR-A1AR-01Z")].iloc[0]
    assert row["match"].startswith("ambiguous: TCGA-AR-A1AR-01A, TCGA-AR-A1AR-01B")


# -- bad inputs: clear errors naming file and row -----------------------------------------------


def test_bad_gdc_inputs_name_file_and_line(download) -> None:
    from histcode.finetune.expression import read_gdc_download

    folder, sheet = write_gdc(download)
    text = sheet.read_text()
    lines = text.splitlines()
    gone = lines[3].split("\t")[1]
    gone_path = next(folder.rglob(gone))
    kept = gone_path.read_text()
    gone_path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{gone} \(line 4\).*gdc-client"):
        read_gdc_download(folder, sheet)
    gone_path.write_text(kept)
    lines[3] = lines[3].replace("TCGA-A2-A04P-01A", "TCGA-A2-A04P-01A,TCGA-A2-A04P-11A")
    sheet.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 4: file .* is of several samples"):
        read_gdc_download(folder, sheet)
    sheet.write_text(text.replace("\tTumor\tPrimary", "\tNormal\tPrimary", 1))
    with pytest.raises(ValueError, match=r"line 2: Tissue Type 'Normal' contradicts .*01A"):
        read_gdc_download(folder, sheet)
    sheet.write_text(text)
    star = next(folder.rglob("*.augmented_star_gene_counts.tsv"))
    body = star.read_text().splitlines()
    fields = body[7].split("\t")
    fields[6] = "high"
    body[7] = "\t".join(fields)
    star.write_text("\n".join(body) + "\n")
    with pytest.raises(
        ValueError, match=rf"{star.name}: column tpm_unstranded .*'high' \(line 8\)"
    ):
        read_gdc_download(folder, sheet)
    with pytest.raises(ValueError, match=r"one GDC STAR-Counts file.*histcode cohort"):
        read_expression(star)
    xena, _ = write_xena(download, "ensembl")
    with pytest.raises(ValueError, match=r"Ensembl id.*--gene_map"):
        read_expression(xena)
    sheet.write_text("File ID\tFile Name\tCase ID\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) Sample ID"):
        read_gdc_download(folder, sheet)


def test_cohort_refuses_non_tcga_slides(download) -> None:
    (download.slides / "slide_07.svs").write_bytes(b"")
    code, _ = run_cohort(
        "--slides", str(download.slides), "--expression", str(download.clean_tsv),
        "--out", str(download.root / "c"),
    )  # fmt: skip
    assert code == 2 and not (download.root / "c").exists()


# -- the README path: GDC download → histcode cohort → histcode finetune ------------------------


def test_gdc_download_to_finetune(tmp_path: Path) -> None:
    """The README's commands on a test-made GDC download; features stand in for tile + embed."""
    from histcode.registry import Registry
    from tests.finetune.finetune_cohort import _feature_store, write_bag

    d = make_download(tmp_path, extra=6)
    folder, sheet = write_gdc(d)
    out = tmp_path / "cohort"
    code, made = run_cohort(
        "--slides", str(d.slides), "--expression", str(folder), "--sample_sheet", str(sheet),
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, made
    rng = np.random.default_rng(0)
    store = _feature_store(tmp_path / "features.zarr", 8)
    for sid in d.slide_ids:
        write_bag(store, sid, rng.normal(size=(12, 8)))
    configs = Path(__file__).parents[2] / "histcode" / "configs" / "finetune"
    argv = made["finetune"].replace("FEATURES.zarr", str(tmp_path / "features.zarr"))
    argv = argv.replace("configs/finetune/deg.yaml", str(configs / "deg.yaml")).split()[1:]
    argv = [a if a != "NAME" else "brca-deg" for a in argv]
    code, result = run_captured(
        [
            *argv,
            "--config",
            str(configs / "cpu_smoke.yaml"),
            "--out",
            str(tmp_path / "run"),
            "--registry",
            str(tmp_path / "registry"),
            "--data.genes",
            "MYC",
            "CD8A",
            "--cv.folds",
            "2",
            "--trainer.max_epochs",
            "2",
        ],
        quiet=True,
    )
    assert code == 0 and result["slides"] == len(d.slide_ids), result
    targets = pd.read_csv(tmp_path / "run" / "targets.csv").set_index("slide_id")
    expected = load_labels(None, d.clean_tsv, d.slide_ids, genes=["MYC", "CD8A"], strict=False)
    np.testing.assert_allclose(
        targets.loc[d.slide_ids, ["MYC_log2fc", "CD8A_log2fc"]].to_numpy(),
        expected.log2fc,
        atol=1e-5,
    )
    assert "units: tpm" in (tmp_path / "run" / "config.yaml").read_text()
    card = Registry(tmp_path / "registry").card("brca-deg@1")
    assert card.extra["units"] == "tpm"
    assert card.extra["normal_reference"] == expected.reference
