"""Labels: expression → log2FC by hand, the labels CSV, and every bad input named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histcode.finetune.labels import (
    build_labels,
    classify,
    default_genes,
    load_labels,
    match_samples,
    read_expression,
    read_gene_list,
    read_label_table,
    resolve_genes,
    table_from_slide_ids,
)

T1, T2, N1, N2 = (
    "TCGA-S1-0001-01A",
    "TCGA-S1-0002-01A",
    "TCGA-S1-0001-11A",
    "TCGA-S1-0003-11A",
)
SLIDES = [f"{T1}-01-TS1", f"{T2}-01-TS1", f"{N1}-01-TS1"]


def write_matrix(path: Path, rows: dict[str, list[object]], columns: list[str]) -> Path:
    lines = ["\t".join(["gene", *columns])]
    lines += ["\t".join([g, *map(str, v)]) for g, v in rows.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def matrix(tmp_path: Path) -> Path:
    #             T1   T2   N1   N2
    rows = {"MYC": [7, 1, 1, 3], "CD8A": [0, 12, 2, 2], "TP53": [5, 5, 5, 5]}
    return write_matrix(tmp_path / "expr.tsv", rows, [T1, T2, N1, N2])


def test_log2fc_by_hand_tpm(matrix: Path) -> None:
    labels = load_labels(None, matrix, SLIDES, genes=["MYC", "CD8A", "TP53"], threshold=1.0)
    assert labels.patient_ids == ["TCGA-S1-0001", "TCGA-S1-0002", "TCGA-S1-0001"]
    np.testing.assert_array_equal(labels.tumour, [1, 1, 0])
    # log2((x + 1) / (mean of normals + 1)); normal means: MYC 2, CD8A 2, TP53 5
    expected = np.log2(np.array([[8 / 3, 1 / 3, 1.0], [2 / 3, 13 / 3, 1.0]]))
    np.testing.assert_allclose(labels.log2fc[:2], expected, rtol=1e-6)
    assert np.isnan(labels.log2fc[2]).all()  # normal slide: no target
    names = labels.class_names()
    assert names[0].tolist() == ["up", "down", "unchanged"]
    assert names[1].tolist() == ["unchanged", "up", "unchanged"]
    assert names[2].tolist() == ["", "", ""]
    assert labels.sample_ids[:2] == [T1, T2]


def test_log2fc_counts_are_cpm_scaled(tmp_path: Path) -> None:
    rows = {"MYC": [10, 40, 10], "OTHER": [90, 60, 190]}
    path = write_matrix(tmp_path / "counts.csv", rows, [T1, T2, N1])
    path.write_text(path.read_text().replace("\t", ","))
    labels = load_labels(None, path, SLIDES, genes=["MYC"], units="counts", pseudocount=0.5)
    cpm = {T1: 10 / 100 * 1e6, T2: 40 / 100 * 1e6, N1: 10 / 200 * 1e6}
    expected = [np.log2((cpm[s] + 0.5) / (cpm[N1] + 0.5)) for s in (T1, T2)]
    np.testing.assert_allclose(labels.log2fc[:2, 0], expected, rtol=1e-6)


def test_pseudocount_zero_with_zeros_is_an_error(matrix: Path) -> None:
    with pytest.raises(ValueError, match="pseudocount"):
        load_labels(None, matrix, SLIDES, genes=["CD8A"], pseudocount=0.0)


def test_classify() -> None:
    np.testing.assert_array_equal(
        classify(np.array([-2, -1, -0.5, 0, 0.99, 1, np.nan]), 1.0), [-1, -1, 0, 0, 0, 1, 0]
    )
    with pytest.raises(ValueError, match="threshold"):
        classify(np.zeros(2), 0)


def test_match_samples_by_barcode_prefix() -> None:
    columns = ["TCGA-S1-0001-01A", "TCGA-S1-0002-01", "slide-x", "TCGA-S1-0003-11B"]
    slides = [
        "TCGA-S1-0001-01A-01-TS1",  # 16-char sample
        "TCGA-S1-0002-01B-01-TS1",  # 15-char column matches any vial
        "slide-x",  # exact id
        "TCGA-S1-0003-11A-01-TS1",  # other vial: no match
        "nothing",
    ]
    got = match_samples(slides, columns)
    assert got == {
        slides[0]: "TCGA-S1-0001-01A",
        slides[1]: "TCGA-S1-0002-01",
        "slide-x": "slide-x",
        slides[3]: None,
        "nothing": None,
    }
    assert match_samples(["a"], ["s1"], {"a": "s1"}) == {"a": "s1"}


def test_ambiguous_aliquots_are_named() -> None:
    columns = ["TCGA-S1-0001-01A-11R", "TCGA-S1-0001-01A-21R"]
    with pytest.raises(ValueError, match=r"TCGA-S1-0001-01A-01-TS1 → .*11R.*21R"):
        match_samples(["TCGA-S1-0001-01A-01-TS1"], columns)


def test_default_genes_ship_and_are_used(matrix: Path) -> None:
    genes = default_genes()
    assert len(genes) > 100 and {"TP53", "MYC", "CD8A", "PTPRC", "MKI67"} <= set(genes)
    labels = load_labels(None, matrix, SLIDES)  # default list ∩ matrix, in list order
    assert labels.genes == ["TP53", "MYC", "CD8A"]
    with pytest.raises(ValueError, match="none of the"):
        resolve_genes(["GENE1", "GENE2"])


def test_gene_list_file(tmp_path: Path) -> None:
    path = tmp_path / "genes.txt"
    path.write_text("# mine\nMYC\n\nCD8A  # immune\n")
    assert read_gene_list(path) == ["MYC", "CD8A"]
    path.write_text("MYC\nMYC\n")
    with pytest.raises(ValueError, match="more than once: MYC"):
        read_gene_list(path)


def test_plain_csv_cohort(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(
        "Slide,Patient,Tumor,MYC_log2fc,CD8A_log2fc,extra\n"
        "a1,p1,tumour,1.5,-0.2,x\n"
        "a2,p1,normal,,,y\n"
        "b1,p2,1,-2,0.1,z\n"
        "c1,p3,0,0.4,,w\n"
    )
    table = read_label_table(path)
    labels = build_labels(table)  # genes: the default list ∩ the <GENE>_log2fc columns
    assert labels.genes == ["MYC", "CD8A"]
    assert labels.patient_ids == ["p1", "p1", "p2", "p3"]
    np.testing.assert_array_equal(labels.tumour, [1, 0, 1, 0])
    np.testing.assert_allclose(labels.log2fc[0], [1.5, -0.2])
    assert np.isnan(labels.log2fc[3]).all()  # a normal slide's target is dropped, with a warning
    assert any("normal slides are ignored" in w for w in labels.warnings)
    assert labels.class_names()[2].tolist() == ["down", "unchanged"]


def test_sample_type_codes_and_barcode_fill(tmp_path: Path) -> None:
    path = tmp_path / "cohort.csv"
    path.write_text(
        "slide_id,sample_type\nTCGA-S1-0001-01A-01-TS1,01\nTCGA-S1-0001-11A-01-TS1,11\n"
    )
    table = read_label_table(path)
    assert table["tumour"].tolist() == [1.0, 0.0]
    assert table["patient_id"].tolist() == ["TCGA-S1-0001"] * 2
    assert table["site"].tolist() == ["S1"] * 2  # barcode characters 6-7


def test_site_column_of_a_plain_csv(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,patient_id,tumour,site\na1,p1,1,Leeds\na2,p1,0,Leeds\nb1,p2,1,\n")
    labels = build_labels(read_label_table(path), with_genes=False)
    assert labels.sites == ["Leeds", "Leeds", ""]  # unknown where empty and not TCGA
    assert labels.subset([2, 0]).sites == ["", "Leeds"]
    assert labels.to_frame()["site"].tolist() == ["Leeds", "Leeds", ""]


# -- every bad input is an error naming the offending ids -------------------------------------


def test_tumour_slides_without_expression_are_named(matrix: Path) -> None:
    slides = [*SLIDES, "TCGA-S1-0009-01A-01-TS1"]
    with pytest.raises(ValueError, match=r"TCGA-S1-0009-01A-01-TS1.*strict_ids"):
        load_labels(None, matrix, slides, genes=["MYC"])
    labels = load_labels(None, matrix, slides, genes=["MYC"], strict=False)
    assert np.isnan(labels.log2fc[3]).all() and labels.tumour[3] == 1
    assert "TCGA-S1-0009-01A-01-TS1" in labels.warnings[0]


def test_no_matching_ids_names_both_sides(matrix: Path) -> None:
    slides = ["TCGA-S2-0100-01A-01-TS1", "TCGA-S2-0100-11A-01-TS1"]
    with pytest.raises(ValueError, match=r"no tumour slide matches.*TCGA-S2-0100-01A.*TCGA-S1"):
        load_labels(None, matrix, slides, genes=["MYC"])


def test_missing_genes_are_named_with_close_matches(matrix: Path) -> None:
    with pytest.raises(ValueError, match=r"not in .*MYCN \(did you mean MYC\?\).*FOO"):
        load_labels(None, matrix, SLIDES, genes=["MYC", "MYCN", "FOO"])


@pytest.mark.parametrize(
    ("value", "match"),
    [("", r"missing or infinite.*CD8A/TCGA-S1-0001-11A"), ("nan", r"CD8A/TCGA-S1-0001-11A")],
)
def test_nan_expression_is_named(tmp_path: Path, value: str, match: str) -> None:
    rows = {"MYC": [7, 1, 1, 3], "CD8A": [0, 12, value, 2]}
    path = write_matrix(tmp_path / "e.tsv", rows, [T1, T2, N1, N2])
    with pytest.raises(ValueError, match=match):
        load_labels(None, path, SLIDES, genes=["MYC", "CD8A"])
    load_labels(None, path, SLIDES, genes=["MYC"])  # a NaN in an unused gene is fine


def test_negative_expression_is_named(tmp_path: Path) -> None:
    rows = {"MYC": [7, -1.5, 1, 3]}
    path = write_matrix(tmp_path / "e.tsv", rows, [T1, T2, N1, N2])
    with pytest.raises(ValueError, match=r"negative.*MYC/TCGA-S1-0002-01A.*log-transformed"):
        load_labels(None, path, SLIDES, genes=["MYC"])


def test_non_numeric_expression_is_named(tmp_path: Path) -> None:
    path = write_matrix(tmp_path / "e.tsv", {"MYC": [7, "high", 1, 3]}, [T1, T2, N1, N2])
    with pytest.raises(ValueError, match=r"non-numeric.*MYC/TCGA-S1-0002-01A='high'"):
        read_expression(path)


def test_no_normal_samples(tmp_path: Path) -> None:
    path = write_matrix(tmp_path / "e.tsv", {"MYC": [7, 1]}, [T1, T2])
    with pytest.raises(ValueError, match=r"no normal samples.*TCGA-S1-0001-01A"):
        load_labels(None, path, SLIDES[:2], genes=["MYC"])


def test_duplicate_ids(tmp_path: Path) -> None:
    path = write_matrix(tmp_path / "e.tsv", {"MYC": [1, 2], "TP53": [1, 2]}, [T1, T1])
    with pytest.raises(ValueError, match=f"duplicate columns {T1}"):
        read_expression(path)
    path = write_matrix(tmp_path / "e.tsv", {"MYC": [1, 2]}, [T1, N1])
    path.write_text(path.read_text() + "MYC\t3\t4\n")
    with pytest.raises(ValueError, match=r"genes more than once: MYC \(lines 2, 3\)"):
        read_expression(path)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,patient_id\na,p1\nb,p2\na,p3\n")
    with pytest.raises(ValueError, match=r"more than once: a \(line 2\), a \(line 4\)"):
        read_label_table(labels)


def test_bad_label_tables(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("name,patient_id\na,p1\n")
    with pytest.raises(ValueError, match="no slide column"):
        read_label_table(path)
    path.write_text("slide_id,patient_id\nslide_a,p1\nslide_b,\n")
    with pytest.raises(ValueError, match=r"no patient id for slide_b \(line 3\)"):
        read_label_table(path)
    path.write_text("slide_id,patient_id,tumour\na,p1,1\nb,p2,maybe\n")
    with pytest.raises(ValueError, match=r"b='maybe' \(line 3\)"):
        read_label_table(path)
    path.write_text("slide_id,patient_id,MYC_log2fc\na,p1,1\nb,p2,up\n")
    with pytest.raises(ValueError, match=r"MYC_log2fc.*b \(line 3\)"):
        read_label_table(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_label_table(tmp_path / "absent.csv")


def test_non_tcga_ids_need_a_labels_file() -> None:
    with pytest.raises(ValueError, match=r"not TCGA barcodes.*slide_9.*--labels"):
        table_from_slide_ids(["TCGA-S1-0001-01A-01-TS1", "slide_9"])


def test_labels_subset_and_frame(matrix: Path) -> None:
    labels = load_labels(None, matrix, SLIDES, genes=["MYC", "CD8A"])
    sub = labels.subset([2, 0])
    assert sub.slide_ids == [SLIDES[2], SLIDES[0]]
    np.testing.assert_array_equal(sub.log2fc[1], labels.log2fc[0])
    frame = labels.to_frame()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns[-4:]) == ["MYC_log2fc", "MYC_class", "CD8A_log2fc", "CD8A_class"]
