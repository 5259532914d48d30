"""TCGA barcode parsing."""

from __future__ import annotations

import pytest

from histcode.barcodes import is_tcga, parse_barcode


@pytest.mark.parametrize(
    ("text", "patient", "sample", "kind"),
    [
        ("TCGA-S1-0001-01A-01-TS1", "TCGA-S1-0001", "TCGA-S1-0001-01A", "tumour"),
        ("TCGA-AB-1234-11B-02-BS2", "TCGA-AB-1234", "TCGA-AB-1234-11B", "normal"),
        ("tcga-ab-1234-06a", "TCGA-AB-1234", "TCGA-AB-1234-06A", "tumour"),
        ("TCGA-AB-1234-10", "TCGA-AB-1234", "TCGA-AB-1234-10", "normal"),
        ("TCGA-AB-1234-20A-01R-A00Z-07", "TCGA-AB-1234", "TCGA-AB-1234-20A", "control"),
        ("TCGA-AB-1234-01A.svs", "TCGA-AB-1234", "TCGA-AB-1234-01A", "tumour"),
    ],
)
def test_parse(text: str, patient: str, sample: str, kind: str) -> None:
    b = parse_barcode(text)
    assert (b.patient, b.sample, b.kind) == (patient, sample, kind)
    assert b.sample_no_vial == sample[:15]
    assert is_tcga(text)


@pytest.mark.parametrize(
    "text", ["slide_001", "TCGA-AB-12-01A", "TCGA-AB-1234", "TCGA-AB-1234-99A", "TCGA-AB-1234-011"]
)
def test_not_tcga(text: str) -> None:
    assert not is_tcga(text)
    with pytest.raises(ValueError, match="TCGA"):
        parse_barcode(text)
