"""Scoring tile maps against a synthetic cohort's truth masks (plain arrays in, AUROC out).

Whatever made the maps (a slide model's attention, a gene's tile contributions), these
functions take tile coordinates, one score per tile and the truth masks that
:class:`~histcode.synth.tissue.SlideTruth` holds, and say how well the scores find the true
regions.

- :func:`tile_labels_from_mask`: whether each tile's centre falls on a mask.
- :func:`mask_auroc`: AUROC of scores vs those labels.
- :func:`localisation_auroc`: the figures ``histcode heatmap --truth`` reports — attention and
  tumour maps vs the tumour mask, each lymphocyte gene's log2FC map vs the lymphocyte mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def tile_labels_from_mask(
    coords: np.ndarray, side: float, mpp0: float, mask: np.ndarray, mask_mpp: float
) -> np.ndarray:
    """Whether each tile's centre falls on a mask (e.g. the true tumour).

    Args:
        coords: (N, 2) level-0 top-left corners.
        side: level-0 tile side.
        mpp0: level-0 µm/px of the slide.
        mask: (H, W) bool, covering the slide from its origin at ``mask_mpp`` µm/px.
        mask_mpp: µm per mask pixel.

    Returns:
        (N,) bool.
    """
    centres = (np.asarray(coords, float) + side / 2) * mpp0 / mask_mpp
    cols = np.clip(centres[:, 0].astype(int), 0, mask.shape[1] - 1)
    rows = np.clip(centres[:, 1].astype(int), 0, mask.shape[0] - 1)
    return mask[rows, cols]


def mask_auroc(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray
) -> float | None:
    """AUROC of scores against tile labels; None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, float)))


def localisation_auroc(
    coords: np.ndarray,
    side: float,
    mpp0: float,
    maps: Mapping[str, np.ndarray],
    tumour: np.ndarray,
    lymphocyte: np.ndarray,
    mask_mpp: float,
    gene_roles: Mapping[str, str],
) -> dict[str, float | None]:
    """AUROC of a slide's maps against its truth masks.

    Args:
        coords: (N, 2) level-0 top-left corners.
        side: level-0 tile side.
        mpp0: level-0 µm/px of the slide.
        maps: name → (N,) scores: ``attention``, ``tumour`` and ``<GENE>_log2fc`` are scored
            where present.
        tumour: (H, W) bool, the true tumour, at ``mask_mpp`` µm/px from the slide's origin.
        lymphocyte: (H, W) bool, the true lymphocyte-rich tissue, likewise.
        mask_mpp: µm per mask pixel.
        gene_roles: each gene's role (``genes.json``:
            :func:`histcode.synth.cohort.read_gene_roles`); ``lymphocyte`` genes are scored.

    Returns:
        ``attention_vs_tumour_mask``, ``tumour_vs_tumour_mask`` and
        ``<GENE>_log2fc_vs_lymphocyte_mask`` for the maps present; None where the slide's
        tiles are all on the mask or all off it.
    """
    on_tumour = tile_labels_from_mask(coords, side, mpp0, tumour, mask_mpp)
    on_lymph = tile_labels_from_mask(coords, side, mpp0, lymphocyte, mask_mpp)
    result: dict[str, float | None] = {}
    for name in ("attention", "tumour"):
        if name in maps:
            result[f"{name}_vs_tumour_mask"] = mask_auroc(maps[name], on_tumour)
    for gene, role in gene_roles.items():
        if role == "lymphocyte" and f"{gene}_log2fc" in maps:
            result[f"{gene}_log2fc_vs_lymphocyte_mask"] = mask_auroc(
                maps[f"{gene}_log2fc"], on_lymph
            )
    return result
