"""Generated cohorts with a known signal, for the finetune tests (no synth dependency)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.featurestore import FeatureStore

#: gene → what drives its log2FC: the tumour tile fraction, the lymphocyte fraction, or nothing
TUMOUR_GENES = ("MYC",)
LYMPH_GENES = ("CD8A",)
NOISE_GENES = ("TP53", "KRAS", "EGFR", "PTEN")
GENES = (*TUMOUR_GENES, *LYMPH_GENES, *NOISE_GENES)


@dataclass
class SignalCohort:
    """Paths and truth of a generated cohort (``*_tiles``: (N,) bool, which tiles are which)."""

    features: Path
    labels: Path
    expression: Path
    slides: list[str]
    patients: dict[str, str]
    tumour_fraction: dict[str, float] = field(default_factory=dict)
    lymph_fraction: dict[str, float] = field(default_factory=dict)
    tumour_tiles: dict[str, np.ndarray] = field(default_factory=dict)
    lymph_tiles: dict[str, np.ndarray] = field(default_factory=dict)
    subtype: dict[str, str] = field(default_factory=dict)


def _feature_store(path: Path, dim: int) -> FeatureStore:
    store = FeatureStore(path)
    store.initialise(
        {
            "encoder_ref": "test-encoder@1",
            "encoder_sha256": "ab" * 32,
            "embed_dim": dim,
            "input_spec": None,
            "tiles": "/nowhere/tiles.zarr",
            "tiles_fingerprint": "fp-test",
            "mpp": 0.5,
            "tile_size": 224,
            "dtype": "float32",
        }
    )
    return store


def write_bag(store: FeatureStore, slide_id: str, features: np.ndarray) -> None:
    """Write one slide's (N, D) features with status ok."""
    n, dim = features.shape
    coords = np.stack([np.arange(n) * 224, np.zeros(n)], 1).astype(np.int64)
    writer = store.writer(slide_id, coords, dim, "float32")
    writer.append(features.astype(np.float32))
    writer.close()
    store.commit(writer.group, slide_id, {"status": "ok", "error": None, "path": "", "n_tiles": n})


def write_signal_cohort(
    root: Path,
    n_patients: int = 30,
    dim: int = 32,
    tiles: tuple[int, int] = (30, 90),
    seed: int = 0,
    shift: float = 3.0,
    subtypes: int = 0,
) -> SignalCohort:
    """A TCGA-style cohort whose features carry a known signal.

    Each patient has two tumour samples (``-01A``, ``-01B``) and every second patient a
    normal sample (``-11A``), one slide each. Tiles are N(0, I) in ``dim`` dimensions; a
    tumour fraction of a tumour slide's tiles is shifted by ``shift`` along one direction,
    a lymphocyte fraction of any slide's tiles along another. MYC's log2FC follows the tumour
    fraction, CD8A's the lymphocyte fraction, TP53 / KRAS / EGFR / PTEN are pure noise.
    Expression (TPM) of normal samples scatters around a base level; tumour samples are
    the base times 2^log2FC.

    With ``subtypes`` k > 0, each patient's tumour has one of k subtypes (``A``, ``B``, …,
    drawn from their own random stream, so the rest of the cohort is unchanged but for the
    shift): the tumour tiles of subtype ``j`` are further shifted by ``shift`` along a
    direction of its own, and the labels CSV gets a ``subtype`` column (empty for normals).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
    u_tumour, u_lymph = basis[:, 0], basis[:, 1]
    store = _feature_store(root / "features.zarr", dim)
    base = rng.uniform(20, 200, len(GENES))
    cohort = SignalCohort(
        root / "features.zarr", root / "labels.csv", root / "expression.tsv", [], {}
    )
    expression: dict[str, np.ndarray] = {}
    rows = []
    sub_rng = np.random.default_rng(seed + 7919)
    sub_dirs = sub_rng.normal(size=(max(subtypes, 1), dim))
    sub_dirs /= np.linalg.norm(sub_dirs, axis=1, keepdims=True)
    sub_of = [
        chr(65 + int(sub_rng.integers(subtypes))) if subtypes else "" for _ in range(n_patients)
    ]
    for p in range(n_patients):
        patient = f"TCGA-S{p % 3 + 1}-{p + 1:04d}"
        samples = ["01A", "01B"] + (["11A"] if p % 2 == 0 else [])
        for sample in samples:
            tumour = sample.startswith("01")
            f_t = rng.uniform(0.15, 0.8) if tumour else 0.0
            f_l = rng.uniform(0.0, 0.5) if tumour else rng.uniform(0.0, 0.3)
            n = int(rng.integers(*tiles))
            x = rng.normal(size=(n, dim))
            kinds = rng.random(n)
            x[kinds < f_t] += shift * u_tumour
            x[(kinds >= f_t) & (kinds < f_t + f_l)] += shift * u_lymph
            subtype = sub_of[p] if tumour else ""
            if subtype:
                x[kinds < f_t] += shift * sub_dirs[ord(subtype) - 65]
            slide = f"{patient}-{sample}-01-TS1"
            write_bag(store, slide, x)
            cohort.slides.append(slide)
            cohort.patients[slide] = patient
            cohort.tumour_fraction[slide] = f_t
            cohort.lymph_fraction[slide] = f_l
            cohort.tumour_tiles[slide] = kinds < f_t
            cohort.lymph_tiles[slide] = (kinds >= f_t) & (kinds < f_t + f_l)
            row = {"slide_id": slide, "patient_id": patient, "tumour": int(tumour)}
            if subtypes:
                row["subtype"] = subtype
                cohort.subtype[slide] = subtype
            rows.append(row)
            if tumour:
                lfc = np.concatenate(
                    [
                        [4.0 * (f_t - 0.25) + rng.normal(0, 0.2)],
                        [5.0 * (f_l - 0.1) + rng.normal(0, 0.2)],
                        rng.normal(0, 0.9, len(NOISE_GENES)),
                    ]
                )
                expression[f"{patient}-{sample}"] = base * 2.0**lfc
            else:
                expression[f"{patient}-{sample}"] = base * 2.0 ** rng.normal(0, 0.15, len(GENES))
    for k in range(3):  # normal samples without slides still form the reference
        expression[f"TCGA-S9-{9000 + k}-11A"] = base * 2.0 ** rng.normal(0, 0.15, len(GENES))
    frame = pd.DataFrame(expression, index=pd.Index(GENES, name="gene"))
    frame.reset_index().to_csv(cohort.expression, sep="\t", index=False, float_format="%.4f")
    pd.DataFrame(rows).to_csv(cohort.labels, index=False)
    return cohort
