"""Test-made TCGA downloads, laid out exactly as the GDC portal, cBioPortal and UCSC Xena ship
them, from one known linear TPM matrix (so every layout must give the same targets).

Cohort (BRCA-like barcodes, five tissue source sites):

=============  ============================  =========================================
patient        RNA-seq samples               slides
=============  ============================  =========================================
TCGA-A1-A0SB   01A, 11A                      01Z DX1 (upper-case UUID), 01A TS1, 11A TS1
TCGA-A2-A04P   01A                           01Z DX1 and DX2 (one sample, two slides)
TCGA-AR-A1AR   01A, 10A (blood normal)       01Z DX1
TCGA-B6-A0RE   01A, 14A (bone marrow normal) 01A TS1 (lower-case UUID)
TCGA-BH-A0B3   11A                           01Z DX1 (tumour slide without RNA)
TCGA-BH-A0BZ   01A, 11A                      none
=============  ============================  =========================================

``extra=k`` adds ``k`` patients ``TCGA-E2-A1xx`` with 01A and 11A samples, a DX1 slide of the
tumour and a TS1 slide of the normal (enough patients for a cross-validated finetune run).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

#: symbol, Ensembl id (GENCODE v36), baseline TPM
GENES = [
    ("MYC", "ENSG00000136997.21", 40.0),
    ("CD8A", "ENSG00000153563.16", 12.0),
    ("TP53", "ENSG00000141510.18", 30.0),
    ("CD99", "ENSG00000002586.20", 80.0),  # pseudo-autosomal: has a _PAR_Y twin
    ("MATR3", "ENSG00000015479.19", 25.0),  # a second id of MATR3 follows, lower
    ("ACTB", "ENSG00000075624.17", 2500.0),
    ("GAPDH", "ENSG00000111640.15", 1800.0),
]
MATR3_TWIN = "ENSG00000280987.4"
PAR_Y = "ENSG00000002586.20_PAR_Y"
SYMBOLS = [g for g, _, _ in GENES]
TARGET_GENES = ["MYC", "CD8A", "TP53", "CD99", "MATR3"]

SAMPLES = [
    "TCGA-A1-A0SB-01A",
    "TCGA-A1-A0SB-11A",
    "TCGA-A2-A04P-01A",
    "TCGA-AR-A1AR-01A",
    "TCGA-AR-A1AR-10A",
    "TCGA-B6-A0RE-01A",
    "TCGA-B6-A0RE-14A",
    "TCGA-BH-A0B3-11A",
    "TCGA-BH-A0BZ-01A",
    "TCGA-BH-A0BZ-11A",
]
REFERENCE = ["TCGA-A1-A0SB-11A", "TCGA-BH-A0B3-11A", "TCGA-BH-A0BZ-11A"]


def slide_name(barcode: str, upper: bool = False, seed: int = 0) -> str:
    """``<barcode>.<UUID>.svs`` as GDC names slide files."""
    u = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{barcode}/{seed}"))
    return f"{barcode}.{u.upper() if upper else u}.svs"


SLIDE_BARCODES = [
    ("TCGA-A1-A0SB-01Z-00-DX1", True),
    ("TCGA-A1-A0SB-01A-01-TS1", False),
    ("TCGA-A1-A0SB-11A-01-TS1", False),
    ("TCGA-A2-A04P-01Z-00-DX1", False),
    ("TCGA-A2-A04P-01Z-00-DX2", False),
    ("TCGA-AR-A1AR-01Z-00-DX1", True),
    ("TCGA-B6-A0RE-01A-01-TS1", False),
    ("TCGA-BH-A0B3-01Z-00-DX1", False),
]


def extra_patients(extra: int) -> list[str]:
    return [f"TCGA-E2-A{100 + k:03d}" for k in range(extra)]


def tpm_matrix(seed: int = 0, extra: int = 0) -> pd.DataFrame:
    """The known truth: symbols × 16-character samples, TPM with 4 decimals (as GDC)."""
    rng = np.random.default_rng(seed)
    base = np.array([b for _, _, b in GENES])
    cols = {}
    more = [f"{p}-{t}" for p in extra_patients(extra) for t in ("01A", "11A")]
    for s in SAMPLES + more:
        tumour = s[13:15] < "10"
        effect = rng.normal(0, 0.2, len(GENES))
        if tumour:
            effect[:4] += rng.choice([-2.5, -1.5, 1.5, 2.5], 4)
        cols[s] = np.round(base * 2.0**effect, 4)
    frame = pd.DataFrame(cols, index=pd.Index(SYMBOLS, name="gene"))
    frame.loc["CD8A", "TCGA-B6-A0RE-14A"] = 0.0  # real matrices have zeros
    return frame


def counts_matrix(tpm: pd.DataFrame) -> pd.DataFrame:
    """Whole-number counts of the same samples."""
    return np.round(tpm * 37.0).astype(np.int64)


@dataclass
class Download:
    """Files of one test-made download."""

    root: Path
    slides: Path
    tpm: pd.DataFrame
    counts: pd.DataFrame
    clean_tsv: Path
    slide_ids: list[str]


def write_slides(folder: Path, gdc_layout: bool = True, extra: int = 0) -> list[str]:
    """Empty ``.svs`` files named like GDC slides (``<file UUID>/<name>.svs``)."""
    ids = []
    more = [
        (f"{p}-{t}", False) for p in extra_patients(extra) for t in ("01Z-00-DX1", "11A-01-TS1")
    ]
    for i, (barcode, upper) in enumerate(SLIDE_BARCODES + more):
        name = slide_name(barcode, upper, i)
        where = folder / str(uuid.UUID(int=1000 + i)) if gdc_layout else folder
        where.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(b"")
        ids.append(name.removesuffix(".svs"))
    return ids


def write_clean(path: Path, matrix: pd.DataFrame) -> Path:
    matrix.reset_index().to_csv(path, sep="\t", index=False)
    return path


def make_download(root: Path, seed: int = 0, extra: int = 0) -> Download:
    tpm = tpm_matrix(seed, extra)
    slides = root / "slides"
    ids = write_slides(slides, extra=extra)
    return Download(
        root, slides, tpm, counts_matrix(tpm), write_clean(root / "clean.tsv", tpm), ids
    )


def star_file_text(tpm: pd.Series, counts: pd.Series) -> str:
    """One GDC ``augmented_star_gene_counts.tsv``."""
    lines = [
        "# gene-model: GENCODE v36",
        "gene_id\tgene_name\tgene_type\tunstranded\tstranded_first\tstranded_second\t"
        "tpm_unstranded\tfpkm_unstranded\tfpkm_uq_unstranded",
        "N_unmapped\t\t\t2150377\t2150377\t2150377\t\t\t",
        "N_multimapping\t\t\t3178236\t3178236\t3178236\t\t\t",
        "N_noFeature\t\t\t1621958\t30524601\t30488112\t\t\t",
        "N_ambiguous\t\t\t3484925\t1247640\t1252883\t\t\t",
    ]
    for (symbol, gid, _), t, c in zip(GENES, tpm, counts, strict=True):
        half = c // 2
        lines.append(
            f"{gid}\t{symbol}\tprotein_coding\t{c}\t{half}\t{c - half}\t{t:.4f}\t"
            f"{t * 0.4:.4f}\t{t * 0.5:.4f}"
        )
        if symbol == "MATR3":  # a second Ensembl id of the same symbol, lower: dropped
            lines.append(f"{MATR3_TWIN}\tMATR3\tprotein_coding\t0\t0\t0\t0.5000\t0.2000\t0.2500")
        if symbol == "CD99":
            lines.append(f"{PAR_Y}\tCD99\tprotein_coding\t0\t0\t0\t0.0000\t0.0000\t0.0000")
    return "\n".join(lines) + "\n"


def write_gdc(
    d: Download, sheet_columns: int = 11, extra_aliquot: bool = False
) -> tuple[Path, Path]:
    """A GDC download folder (``<file UUID>/<uuid>.rna_seq.augmented_star_gene_counts.tsv``)
    and its sample sheet (11 or 8 columns), plus a slide row of the same cart.

    Returns:
        (download folder, sample sheet).
    """
    folder = d.root / "gdc_download_20240101"
    rows = []
    for i, s in enumerate(d.tpm.columns):
        file_id = str(uuid.UUID(int=5000 + i))
        name = f"{uuid.UUID(int=9000 + i)}.rna_seq.augmented_star_gene_counts.tsv"
        (folder / file_id).mkdir(parents=True, exist_ok=True)
        (folder / file_id / name).write_text(star_file_text(d.tpm[s], d.counts[s]))
        rows.append((file_id, name, s))
    if extra_aliquot:  # a second file of the first sample: averaged
        s = d.tpm.columns[0]
        file_id, name = str(uuid.UUID(int=7777)), "extra.rna_seq.augmented_star_gene_counts.tsv"
        (folder / file_id).mkdir(parents=True)
        (folder / file_id / name).write_text(star_file_text(d.tpm[s], d.counts[s]))
        rows.append((file_id, name, s))
    (folder / "MANIFEST.txt").write_text("id\tfilename\tmd5\tsize\tstate\n")
    if sheet_columns == 11:
        header = (
            "File ID\tFile Name\tData Category\tData Type\tProject ID\tCase ID\tSample ID\t"
            "Tissue Type\tTumor Descriptor\tSpecimen Type\tPreservation Method"
        )
    else:
        header = (
            "File ID\tFile Name\tData Category\tData Type\tProject ID\tCase ID\tSample ID\t"
            "Sample Type"
        )
    names = {"01": "Primary Tumor", "10": "Blood Derived Normal", "11": "Solid Tissue Normal"}
    names["14"] = "Bone Marrow Normal"
    lines = [header]
    for file_id, name, s in rows:
        code = s[13:15]
        tumour = code < "10"
        sample_cell = s if s != d.tpm.columns[1] else f"{s}, {s}"  # a repeated id
        common = (
            f"{file_id}\t{name}\tTranscriptome Profiling\tGene Expression Quantification\t"
            f"TCGA-BRCA\t{s[:12]}\t{sample_cell}"
        )
        if sheet_columns == 11:
            specimen = "Peripheral Whole Blood" if code == "10" else "Solid Tissue"
            lines.append(
                f"{common}\t{'Tumor' if tumour else 'Normal'}\t"
                f"{'Primary' if tumour else 'Not Applicable'}\t{specimen}\tUnknown"
            )
        else:
            lines.append(f"{common}\t{names[code]}")
    slide_row = (
        f"{uuid.UUID(int=4242)}\t{slide_name('TCGA-A1-A0SB-01Z-00-DX1', True)}\tBiospecimen\t"
        "Slide Image\tTCGA-BRCA\tTCGA-A1-A0SB\tTCGA-A1-A0SB-01Z"
    )
    lines.append(
        slide_row
        + ("\tTumor\tPrimary\tSolid Tissue\tFFPE" if sheet_columns == 11 else "\tPrimary Tumor")
    )
    sheet = d.root / "gdc_sample_sheet.2024-01-01.tsv"
    sheet.write_text("\n".join(lines) + "\n")
    return folder, sheet


def write_cbioportal(d: Download) -> Path:
    """``data_mrna_seq_v2_rsem.txt``: Hugo_Symbol, Entrez_Gene_Id, 15-character samples; one
    row without symbol and a lower duplicate of MATR3."""
    frame = d.tpm.copy()
    frame.columns = [c[:15] for c in frame.columns]
    entrez = {"MYC": 4609, "CD8A": 925, "TP53": 7157, "CD99": 4267, "MATR3": 9782}
    entrez |= {"ACTB": 60, "GAPDH": 2597}
    lines = ["\t".join(["Hugo_Symbol", "Entrez_Gene_Id", *frame.columns])]
    for g, row in frame.iterrows():
        lines.append("\t".join([g, str(entrez[g]), *(f"{v:.4f}" for v in row)]))
    lines.append("\t".join(["", "100130426", *(["0.0000"] * frame.shape[1])]))
    lines.append("\t".join(["MATR3", "100302189", *(["1.2000"] * frame.shape[1])]))
    path = d.root / "data_mrna_seq_v2_rsem.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_xena(d: Download, flavour: str) -> tuple[Path, Path | None]:
    """A UCSC Xena matrix: ``ensembl`` (``Ensembl_ID``, versioned ids, 16-character samples,
    log2(x + 1), with its probemap), ``symbols`` (``sample``, 15-character, log2(x + 1)) or
    ``ensembl_001`` (log2(x + 0.001)).

    Returns:
        (matrix, probemap or None).
    """
    offset = 0.001 if flavour == "ensembl_001" else 1.0
    logged = np.log2(d.tpm + offset)
    if flavour == "symbols":
        logged.columns = [c[:15] for c in logged.columns]
        lines = ["\t".join(["sample", *logged.columns])]
        lines += ["\t".join([g, *(f"{v:.4f}" for v in row)]) for g, row in logged.iterrows()]
        path = d.root / "HiSeqV2"
        path.write_text("\n".join(lines) + "\n")
        return path, None
    ids = {g: gid for g, gid, _ in GENES}
    lines = ["\t".join(["Ensembl_ID", *logged.columns])]
    for g, row in logged.iterrows():
        lines.append("\t".join([ids[g], *(f"{v:.4f}" for v in row)]))
    lines.append("\t".join([PAR_Y, *([f"{np.log2(offset):.4f}"] * logged.shape[1])]))
    path = d.root / "TCGA-BRCA.star_tpm.tsv"
    path.write_text("\n".join(lines) + "\n")
    probemap = d.root / "gencode.v36.annotation.gtf.gene.probemap"
    rows = ["id\tgene\tchrom\tchromStart\tchromEnd\tstrand"]
    rows += [f"{gid}\t{g}\tchr1\t1\t2\t+" for g, gid, _ in GENES]
    rows += [f"{MATR3_TWIN}\tMATR3\tchr5\t1\t2\t+", f"{PAR_Y}\tCD99\tchrY\t1\t2\t+"]
    probemap.write_text("\n".join(rows) + "\n")
    return path, probemap
