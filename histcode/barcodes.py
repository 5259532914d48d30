"""TCGA barcodes: patient, sample and sample type of a slide or an expression column.

A TCGA barcode reads ``TCGA-<TSS>-<participant>-<sample type><vial>-…``, e.g. the slide
``TCGA-S1-0001-01A-01-TS1``: tissue source site ``S1`` (characters 6–7), patient
``TCGA-S1-0001`` (the first 12 characters), sample
``TCGA-S1-0001-01A`` (16 characters with the vial letter, 15 without), sample type ``01``
(characters 14–15). Sample types ``01``–``09`` are tumour, ``10``–``19`` normal and ``20``–``29``
controls (GDC "Sample Type Codes"; :data:`SAMPLE_TYPES`).

Slides name their kind after the portion: ``TCGA-A1-A0SB-01Z-00-DX1`` is a diagnostic (FFPE)
slide, whose vial is the placeholder ``Z`` (it matches the one RNA sample of its sample type:
:attr:`TCGABarcode.vial` is ``Z``, :attr:`TCGABarcode.rna_vial` ``""``);
``TCGA-A1-A0SB-01A-01-TS1`` a frozen top slide of vial ``A`` (``BS`` bottom, ``MS`` middle).
GDC slide files add ``.<file UUID>`` to the barcode (``…-DX1.<UUID>.svs``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_BARCODE_RE = re.compile(
    r"^(?P<patient>TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-(?P<type>\d{2})(?P<vial>[A-Z])?(?=$|[-._])",
    re.IGNORECASE,
)

_SLIDE_RE = re.compile(r"-(?P<kind>DX|TS|BS|MS)(?P<n>\d+)(?=$|[-._])", re.IGNORECASE)

SampleKind = Literal["tumour", "normal", "control"]

#: GDC sample type codes (those a TCGA barcode can carry here).
SAMPLE_TYPES: dict[int, str] = {
    1: "Primary Solid Tumor",
    2: "Recurrent Solid Tumor",
    3: "Primary Blood Derived Cancer - Peripheral Blood",
    4: "Recurrent Blood Derived Cancer - Bone Marrow",
    5: "Additional - New Primary",
    6: "Metastatic",
    7: "Additional Metastatic",
    8: "Human Tumor Original Cells",
    9: "Primary Blood Derived Cancer - Bone Marrow",
    10: "Blood Derived Normal",
    11: "Solid Tissue Normal",
    12: "Buccal Cell Normal",
    13: "EBV Immortalized Normal",
    14: "Bone Marrow Normal",
    20: "Control Analyte",
}

#: Slide kinds of the portion code.
SLIDE_KINDS = {"DX": "diagnostic (FFPE)", "TS": "frozen top", "BS": "frozen bottom", "MS": "frozen"}


@dataclass(frozen=True)
class TCGABarcode:
    """The parts of a TCGA barcode that the labels need.

    Attributes:
        barcode: the full string as given.
        patient: ``TCGA-XX-XXXX`` (upper case).
        sample_type: the two-digit sample type code (1–29).
        vial: the vial letter (``A``, ``B``, …) or ``""`` when the barcode stops before it.
    """

    barcode: str
    patient: str
    sample_type: int
    vial: str

    @property
    def site(self) -> str:
        """The tissue source site code, characters 6–7 (``S1`` of ``TCGA-S1-0001``)."""
        return self.patient[5:7]

    @property
    def sample(self) -> str:
        """The sample barcode with the vial letter when known (``TCGA-XX-XXXX-01A``)."""
        return f"{self.patient}-{self.sample_type:02d}{self.vial}"

    @property
    def sample_no_vial(self) -> str:
        """The 15-character sample barcode without vial (``TCGA-XX-XXXX-01``)."""
        return f"{self.patient}-{self.sample_type:02d}"

    @property
    def rna_vial(self) -> str:
        """The vial that an expression sample of this barcode can carry: ``""`` for the
        placeholder ``Z`` of diagnostic slides (any vial of the sample type)."""
        return "" if self.vial == "Z" else self.vial

    @property
    def sample_type_name(self) -> str:
        """GDC name of the sample type (``Solid Tissue Normal``)."""
        return SAMPLE_TYPES.get(self.sample_type, f"sample type {self.sample_type:02d}")

    @property
    def kind(self) -> SampleKind:
        """``tumour`` (types 01–09), ``normal`` (10–19) or ``control`` (20–29)."""
        if 1 <= self.sample_type <= 9:
            return "tumour"
        if 10 <= self.sample_type <= 19:
            return "normal"
        return "control"

    @property
    def is_tumour(self) -> bool:
        return self.kind == "tumour"

    @property
    def is_normal(self) -> bool:
        return self.kind == "normal"


def is_tcga(text: str) -> bool:
    """Whether ``text`` starts with a TCGA patient and sample type (``TCGA-XX-XXXX-NN``)."""
    match = _BARCODE_RE.match(text.strip())
    return bool(match) and 1 <= int(match["type"]) <= 29


def parse_barcode(text: str) -> TCGABarcode:
    """Parse a TCGA sample, aliquot or slide barcode (or a slide file stem).

    Args:
        text: e.g. ``TCGA-S1-0001-01A-01-TS1`` or ``TCGA-S1-0001-11``.

    Returns:
        The parsed barcode.

    Raises:
        ValueError: ``text`` is not a TCGA barcode with a sample type in 01–29; says the
            expected form.

    Example:
        >>> b = parse_barcode("TCGA-S1-0001-01A-01-TS1")
        >>> b.patient, b.site, b.sample, b.kind
        ('TCGA-S1-0001', 'S1', 'TCGA-S1-0001-01A', 'tumour')
    """
    match = _BARCODE_RE.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError(
            f"{text!r} is not a TCGA barcode: expected 'TCGA-<TSS>-<participant>-<sample type>"
            "<vial>…' such as 'TCGA-S1-0001-01A-01-TS1'. For other cohorts pass a labels CSV "
            "with slide_id, patient_id and tumour columns."
        )
    sample_type = int(match["type"])
    if not 1 <= sample_type <= 29:
        raise ValueError(
            f"{text!r}: sample type {match['type']!r} is not a TCGA sample type (01–09 tumour, "
            "10–19 normal, 20–29 control)"
        )
    return TCGABarcode(
        barcode=text,
        patient=match["patient"].upper(),
        sample_type=sample_type,
        vial=(match["vial"] or "").upper(),
    )


def slide_kind(text: str) -> str:
    """The slide code of a TCGA slide id (``DX1``, ``TS1``…), or ``""`` when it has none.

    Example:
        >>> slide_kind("TCGA-A1-A0SB-01Z-00-DX1.2C1F9E73-5E2B-4A6B-9A1E-0E6C6F0F0A11")
        'DX1'
    """
    match = _SLIDE_RE.search(text)
    return f"{match['kind'].upper()}{match['n']}" if match else ""


__all__ = [
    "SAMPLE_TYPES",
    "SLIDE_KINDS",
    "SampleKind",
    "TCGABarcode",
    "is_tcga",
    "parse_barcode",
    "slide_kind",
]
