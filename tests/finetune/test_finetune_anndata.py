"""AnnData (``.h5ad``) as an expression source, and ``slides.h5ad`` after ``histcode finetune``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from histcode.finetune.cohort import load_source
from histcode.finetune.expression import read_expression
from histcode.finetune.labels import load_labels
from histcode.finetune.options import (
    TRAINER_DEFAULTS,
    CVOptions,
    DataOptions,
    ModelOptions,
)
from histcode.finetune.pipeline import run_finetune
from tests.finetune.finetune_cohort import GENES, SignalCohort

ad = pytest.importorskip("anndata", reason="anndata is not installed (histcode[anndata])")
sparse = pytest.importorskip("scipy.sparse")


def _tsv_matrix(cohort: SignalCohort) -> pd.DataFrame:
    return pd.read_csv(cohort.expression, sep="\t", index_col=0)


def _write_h5ad(
    frame: pd.DataFrame, path: Path, *, ensembl: bool = False, units: str | None = None
) -> Path:
    """Genes × samples ``frame`` as AnnData samples × genes (sparse X)."""
    var = pd.DataFrame(index=[str(g) for g in frame.index])
    if ensembl:  # var_names Ensembl ids, symbols in a var column (as CELLxGENE keeps them)
        var = pd.DataFrame(
            {"feature_name": list(frame.index)},
            index=[f"ENSG{100000 + i:011d}.3" for i in range(len(frame))],
        )
    adata = ad.AnnData(
        X=sparse.csr_matrix(frame.to_numpy(np.float64).T),
        obs=pd.DataFrame(index=[str(c) for c in frame.columns]),
        var=var,
    )
    if units is not None:
        adata.uns["histcode_units"] = units
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("ensembl", [False, True])
def test_h5ad_gives_the_same_targets_as_the_tsv(
    small_signal_cohort: SignalCohort, tmp_path: Path, ensembl: bool
) -> None:
    cohort = small_signal_cohort
    h5ad = _write_h5ad(_tsv_matrix(cohort), tmp_path / "x.h5ad", ensembl=ensembl)
    frame = read_expression(h5ad)
    assert frame.attrs["layout"] == "anndata"
    pd.testing.assert_frame_equal(
        frame, read_expression(cohort.expression), check_names=False, check_exact=False
    )
    from_tsv = load_labels(cohort.labels, cohort.expression, cohort.slides, list(GENES))
    from_h5ad = load_labels(cohort.labels, h5ad, cohort.slides, list(GENES))
    assert from_h5ad.genes == from_tsv.genes
    np.testing.assert_array_equal(from_h5ad.slide_ids, from_tsv.slide_ids)
    np.testing.assert_allclose(from_h5ad.log2fc, from_tsv.log2fc, equal_nan=True)
    assert np.isfinite(from_h5ad.log2fc).sum() > 10
    # histcode cohort reads it through the same path
    source = load_source(h5ad)
    assert source.attrs["layout"] == "anndata"
    pd.testing.assert_frame_equal(source, load_source(cohort.expression), check_exact=False)


def test_log_scale_h5ad_is_refused_with_the_fix(
    small_signal_cohort: SignalCohort, tmp_path: Path
) -> None:
    cohort = small_signal_cohort
    logged = np.log2(_tsv_matrix(cohort) + 1)
    h5ad = _write_h5ad(logged, tmp_path / "logged.h5ad")
    with pytest.raises(ValueError, match=r"logged\.h5ad.*log-transformed.*units log2tpm"):
        load_labels(cohort.labels, h5ad, cohort.slides, list(GENES))
    # recorded units: log2tpm in uns un-logs it (histcode cohort, --units auto)
    recorded = _write_h5ad(logged, tmp_path / "recorded.h5ad", units="log2tpm")
    pd.testing.assert_frame_equal(
        load_source(recorded), load_source(cohort.expression), check_exact=False, atol=1e-6
    )


def test_ensembl_var_names_without_symbols_are_refused(tmp_path: Path) -> None:
    adata = ad.AnnData(
        X=np.ones((2, 2)),
        obs=pd.DataFrame(index=["s1", "s2"]),
        var=pd.DataFrame(index=["ENSG00000136997.21", "ENSG00000141510.18"]),
    )
    adata.write_h5ad(tmp_path / "e.h5ad")
    with pytest.raises(ValueError, match=r"e\.h5ad.*Ensembl.*gene_symbols"):
        read_expression(tmp_path / "e.h5ad")
    mapped = read_expression(tmp_path / "e.h5ad", {"ENSG00000136997": "MYC"})
    assert mapped.index.tolist() == ["MYC"]


def test_finetune_writes_slides_h5ad(
    small_signal_cohort: SignalCohort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histcode.finetune import cv as cvmod
    from histcode.finetune.bags import FeatureBags

    cohort = small_signal_cohort
    kept: list[cvmod.CVResult] = []
    run_cv = cvmod.run_cv

    def keep_cv(*args: object, **kwargs: object) -> cvmod.CVResult:
        kept.append(run_cv(*args, **kwargs))
        return kept[-1]

    monkeypatch.setattr(cvmod, "run_cv", keep_cv)

    run = run_finetune(
        cohort.features,
        "anndata-out",
        labels=cohort.labels,
        expression=cohort.expression,
        out=tmp_path / "run",
        data=DataOptions(tasks=["tumour", "genes"], genes=list(GENES), batch_size=4),
        model=ModelOptions(aggregator="abmil", hidden=8, dropout=0.0),
        cv=CVOptions(folds=3, patience=2, register="none", anndata=True),
        trainer={**TRAINER_DEFAULTS, "max_epochs": 2, "accelerator": "cpu"},
    )
    path = run.out / "slides.h5ad"
    assert path in run.files
    adata = ad.read_h5ad(path)
    predictions = pd.read_csv(run.out / "predictions.csv")
    assert adata.n_obs == len(predictions) == len(run.labels)
    assert adata.obs_names.is_unique
    assert adata.obsm["X_slide"].shape == (adata.n_obs, 8)
    assert np.isfinite(adata.obsm["X_slide"]).all()
    obs = adata.obs.set_index("slide_id").loc[predictions["slide_id"]]
    np.testing.assert_array_equal(obs["fold"].to_numpy(), predictions["fold"].to_numpy())
    np.testing.assert_allclose(obs["tumour_prob"], predictions["tumour_prob"], rtol=1e-6)
    for column in ("patient_id", "sample_id", "site", "MYC_log2fc_pred", "MYC_class_true"):
        assert column in adata.obs.columns
    assert "encoder_ref" in adata.uns["provenance"]
    assert adata.uns["provenance"]["encoder_ref"] == "test-encoder@1"
    assert adata.uns["metrics_summary"]["folds"] == 3
    # one slide's embedding = a recomputation with the fold model that held it out
    sid = str(adata.obs_names[0])
    fold = int(adata.obs.loc[sid, "fold"])
    held = next(r for r in kept[0].folds if r.fold.index == fold)
    assert sid in held.predictions["slide_ids"]
    module = held.module.eval()
    bag = torch.from_numpy(np.asarray(FeatureBags(cohort.features)[sid], np.float32))[None]
    with torch.inference_mode():
        expected = module(bag, torch.ones(bag.shape[:2], dtype=torch.bool)).embedding[0]
    np.testing.assert_allclose(adata.obsm["X_slide"][0], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_missing_anndata_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "anndata", None)  # import anndata → ImportError
    with pytest.raises(ValueError, match=r"histcode\[anndata\].*--cv.anndata false"):
        CVOptions(anndata=True)
    (tmp_path / "x.h5ad").write_bytes(b"")
    with pytest.raises(ImportError, match=r"x\.h5ad.*pip install 'histcode\[anndata\]'"):
        read_expression(tmp_path / "x.h5ad")
