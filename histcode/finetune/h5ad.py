"""AnnData (``.h5ad``) in and out: expression as scanpy users keep it, slides for scanpy.

* :func:`histcode.finetune.expression.read_h5ad_expression` (beside the other expression
  readers, :func:`~histcode.finetune.expression.read_expression` sends every ``.h5ad`` path
  there) reads an AnnData file of samples × genes (``X`` dense or sparse, ``obs_names``
  sample ids, ``var_names`` gene symbols or Ensembl ids; a column of ``var`` named in
  :data:`SYMBOL_COLUMNS` gives the symbols). ``uns['histcode_units']`` (``tpm``, ``counts``
  or ``log2tpm``), when present, says the units; otherwise they are detected as for any
  matrix. This module holds what reading and writing share (:func:`require_anndata`).
* :func:`write_slides_h5ad` writes ``slides.h5ad`` after ``histcode finetune --cv.anndata
  true``: ``obs`` one row per slide (the columns of ``predictions.csv``), ``obsm['X_slide']``
  each slide's embedding from the fold model that held it out (:func:`slide_embeddings`),
  ``uns`` the metrics and the provenance.

``anndata`` is the optional extra ``histcode[anndata]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

#: ``var`` columns that hold gene symbols (CELLxGENE: ``feature_name``), first found wins.
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "symbol")
#: ``uns`` key that records the units of ``X``.
UNITS_KEY = "histcode_units"
INSTALL_HINT = "pip install 'histcode[anndata]'"


def anndata_available() -> bool:
    """Whether the ``anndata`` package can be imported."""
    try:
        import anndata  # noqa: F401
    except ImportError:
        return False
    return True


def require_anndata(what: str) -> ModuleType:
    """The ``anndata`` module, or an error that names the extra.

    Args:
        what: what needs it, for the message.

    Raises:
        ImportError: ``anndata`` is not installed.
    """
    try:
        import anndata
    except ImportError as exc:
        raise ImportError(
            f"{what} needs the anndata package, which is not installed; install the extra: "
            f"{INSTALL_HINT}"
        ) from exc
    return anndata


def slide_embeddings(folds: Sequence[Any], bags: Any, slide_ids: Sequence[str]) -> np.ndarray:
    """Each slide's embedding from the fold model that held it out.

    Every slide's whole bag goes through its fold's module in eval mode, one slide at a time
    (no padding), on the CPU, as in :func:`histcode.finetune.cv.predict` without precision
    plugins.

    Args:
        folds: the :class:`histcode.finetune.cv.FoldResult` s of a cross-validation.
        bags: :class:`histcode.finetune.bags.FeatureBags` (slide id → (N, D) features).
        slide_ids: the slides, in the order of the rows returned.

    Returns:
        (len(slide_ids), hidden) float32.

    Raises:
        ValueError: a slide in no fold's test part.
    """
    import torch

    holder: dict[str, Any] = {}
    for result in folds:
        module = result.module
        for sid in result.predictions.get("slide_ids", []):
            holder[str(sid)] = module
    missing = [s for s in slide_ids if s not in holder]
    if missing:
        raise ValueError(f"slides held out by no fold: {', '.join(missing[:8])}")
    rows = []
    with torch.inference_mode():
        for sid in slide_ids:
            module = holder[sid]
            module.eval()
            param = next(module.parameters())
            features = torch.from_numpy(np.asarray(bags[sid], dtype=np.float32))[None]
            features = features.to(device=param.device, dtype=param.dtype)
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=param.device)
            rows.append(module(features, mask).embedding[0].float().cpu().numpy())
    return np.stack(rows).astype(np.float32)


def _obs_frame(predictions: pd.DataFrame) -> pd.DataFrame:
    """``predictions.csv`` as ``obs``: indexed by slide id, text columns as strings."""
    obs = predictions.copy()
    for column in obs.columns:
        if obs[column].dtype == object or isinstance(obs[column].dtype, pd.StringDtype):
            obs[column] = obs[column].map(lambda v: "" if pd.isna(v) else str(v)).astype(object)
    obs.index = pd.Index(obs["slide_id"].astype(str).to_numpy(), name="slide")
    return obs


def write_slides_h5ad(
    path: Path,
    predictions: pd.DataFrame,
    embeddings: np.ndarray,
    metrics_json: str,
    provenance: Mapping[str, str],
) -> Path:
    """Write out-of-fold predictions and slide embeddings as AnnData (atomically).

    Args:
        path: the file (``OUT/slides.h5ad``).
        predictions: ``predictions.csv`` (one row per slide).
        embeddings: (n_slides, hidden), rows in the order of ``predictions``.
        metrics_json: ``metrics.json`` text, kept in ``uns['metrics_json']``.
        provenance: strings kept in ``uns['provenance']`` (encoder, feature store, …).

    Returns:
        ``path``.

    Raises:
        ImportError: ``anndata`` is not installed (names the extra).
    """
    ad = require_anndata("--cv.anndata true")
    metrics = json.loads(metrics_json)
    summary = {
        k: v
        for k, v in {
            "folds": metrics.get("folds"),
            "cv_group": metrics.get("cv_group"),
            "tumour_auc_mean": (metrics.get("tumour", {}).get("auc") or {}).get("mean"),
            "mean_gene_auc_up": metrics.get("mean_gene_auc_up"),
            "significant_genes": len(metrics.get("significant_genes") or []),
        }.items()
        if isinstance(v, int | float | str) and not isinstance(v, bool)
    }
    adata = ad.AnnData(
        obs=_obs_frame(predictions),
        obsm={"X_slide": np.asarray(embeddings, dtype=np.float32)},
        uns={
            "metrics_summary": summary,
            "metrics_json": metrics_json,
            "provenance": {k: str(v) for k, v in provenance.items()},
        },
    )
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    adata.write_h5ad(tmp)
    tmp.replace(path)
    return path


__all__ = [
    "INSTALL_HINT",
    "SYMBOL_COLUMNS",
    "UNITS_KEY",
    "anndata_available",
    "require_anndata",
    "slide_embeddings",
    "write_slides_h5ad",
]
