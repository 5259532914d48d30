"""Site confounding: how much a cohort's tissue source sites alone tell its tumour slides.

TCGA models learn a tissue source site's stain and scanner signature (Howard et al., Nat
Commun 2021), and in TCGA normal slides come from some sites more than others, so in a cohort
whose labels follow its sites a model can score the site instead of the tumour.
:func:`site_confounding` measures that association from the labels alone (no model, no
prediction), so it can be run before any tiling (``histcode demo`` does, on the slide file
names) and after training (``histcode finetune`` records it in ``metrics.json``);
:func:`site_confounding_warning` words the warning both print.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from histcode.errors import preview

#: Site-only AUC at or above which tumour labels count as confounded with site (with
#: :data:`SITE_CONFOUNDED_P`). Every normal from one site of three, as in ``histcode synth
#: --normal_sites 1``, is 0.83; 45 slides over 3 sites with labels drawn at random are 0.61 on
#: average (95th percentile 0.71), hence the permutation test as well.
SITE_CONFOUNDED_AUC = 0.7
#: Permutation p-value (labels shuffled over the slides, sites kept) below which the site-only
#: AUC is more than the chance association of a small cohort.
SITE_CONFOUNDED_P = 0.01


def _site_only_auc(y: np.ndarray, codes: np.ndarray, axis: int = -1) -> np.ndarray:
    """Site-only AUC of labels ``y`` (0/1) over sites ``codes`` (0…k−1), along ``axis``.

    Args:
        y: (..., n) labels.
        codes: (..., n) site index of each slide.

    Returns:
        (...) the ROC AUC of each slide's site tumour share, ties counting half.
    """
    from scipy.stats import rankdata

    y, codes = np.moveaxis(y, axis, -1), np.moveaxis(codes, axis, -1)
    y, codes = np.broadcast_arrays(y, codes)
    shape, n = y.shape, y.shape[-1]
    k = int(codes.max()) + 1
    rows = np.arange(int(np.prod(shape[:-1], dtype=np.int64)))[:, None]
    where = (codes.reshape(-1, n) + k * rows).ravel()  # one site bin per row and site
    tumours = np.bincount(where, weights=y.reshape(-1).astype(np.float64), minlength=rows.size * k)
    slides = np.bincount(where, minlength=rows.size * k)
    share = tumours / np.maximum(slides, 1)  # each row's sites' tumour shares
    score = share[where].reshape(shape)  # (..., n)
    ranks = rankdata(score, axis=-1)
    n1 = y.sum(-1)
    n0 = y.shape[-1] - n1
    return ((ranks * y).sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def site_confounding(
    sites: Sequence[str], tumour: Sequence[float] | np.ndarray, resamples: int = 2000
) -> dict[str, Any]:
    """How much the tissue source site alone tells tumour from normal slides in a cohort.

    Each slide is scored by its site's share of tumour slides, the best any rule that sees
    only the site can do on these slides; the ROC AUC of that score (ties within a site count
    half) is the *site-only AUC*: near 0.5 when every site holds tumour and normal slides in
    the same share, 1.0 when no site holds both. A model can reach it by learning each site's
    stain or scanner without seeing tumour, and the within-site AUC
    (:func:`histcode.finetune.metrics.within_site_auc`) is then the figure to read. Being
    fitted to the slides it scores, the site-only AUC is above 0.5 by chance in small cohorts
    of few sites, so a permutation test (``scipy.stats.permutation_test``, labels shuffled
    over the slides, sites kept, seeded) says whether the association is more than chance.
    It describes the cohort's labels, not a model, and uses no prediction.

    Args:
        sites: (n,) each slide's site (``""`` unknown).
        tumour: (n,) 1 tumour, 0 normal, NaN unknown.
        resamples: permutations of the test.

    Returns:
        ``{"available", "site_only_auc", "p_value", "chance_auc", "confounded", "rule",
        "slides", "sites", "normal_by_site", "tumour_by_site", "tumour_only_sites",
        "normal_only_sites"}``: ``chance_auc`` the mean site-only AUC over the permutations;
        ``confounded`` when the AUC is at least :data:`SITE_CONFOUNDED_AUC` and ``p_value``
        below :data:`SITE_CONFOUNDED_P`; ``available`` False (AUC NaN) without both classes
        among slides with a known site.
    """
    from scipy.stats import permutation_test

    site = np.asarray([str(s) for s in sites], dtype=object)
    y = np.asarray(tumour, dtype=np.float64)
    keep = np.isfinite(y) & (site != "")
    site, y = site[keep], y[keep].astype(np.int64)
    names, codes = np.unique(site.astype(str), return_inverse=True)
    names = names.tolist()
    per_site = np.bincount(codes, minlength=len(names))
    tumours = dict(zip(names, np.bincount(codes, y, len(names)).astype(int).tolist(), strict=True))
    normals = {s: int(n) - tumours[s] for s, n in zip(names, per_site, strict=True)}
    out: dict[str, Any] = {
        "available": False,
        "site_only_auc": math.nan,
        "p_value": math.nan,
        "chance_auc": math.nan,
        "confounded": False,
        "rule": f"site-only AUC >= {SITE_CONFOUNDED_AUC} and permutation p < {SITE_CONFOUNDED_P}",
        "slides": len(y),
        "sites": len(names),
        "normal_by_site": normals,
        "tumour_by_site": tumours,
        "tumour_only_sites": [s for s in names if tumours[s] and not normals[s]],
        "normal_only_sites": [s for s in names if normals[s] and not tumours[s]],
    }
    if not 0 < y.sum() < len(y):
        return out
    order = np.lexsort((y, codes))  # a canonical order: the seeded test sees the cohort, not
    # its row order, so the warning before training and metrics.json give the same p
    test = permutation_test(
        (y[order], codes[order]),
        _site_only_auc,
        permutation_type="pairings",
        vectorized=True,
        n_resamples=resamples,
        alternative="greater",
        batch=max(1, 4_000_000 // len(y)),
        rng=np.random.default_rng(0),
    )
    auc, p = float(test.statistic), float(test.pvalue)
    out.update(
        available=True,
        site_only_auc=auc,
        p_value=p,
        chance_auc=float(np.mean(test.null_distribution)),
        confounded=auc >= SITE_CONFOUNDED_AUC and p < SITE_CONFOUNDED_P,
    )
    return out


def site_confounding_warning(found: dict[str, Any], stain_norm: str | None = None) -> str | None:
    """The warning for a cohort whose tumour labels follow its sites, or None.

    Args:
        found: :func:`site_confounding`'s result.
        stain_norm: the tiles' stain normalisation (a feature store's ``stain_norm`` attr),
            None when unknown: the advice to normalise is left out when they already are.
    """
    if not found.get("confounded"):
        return None
    normals = sorted(
        ((s, n) for s, n in found["normal_by_site"].items() if n), key=lambda kv: -kv[1]
    )
    only = found["tumour_only_sites"]
    also = f"; {len(only)} site(s) have tumour slides only: {preview(only, 6)}" if only else ""
    advice = (
        f"the tiles are stain-normalised ({stain_norm}), which takes away most of a site's "
        "stain cast but not its scanner or tissue handling"
        if stain_norm not in (None, "none")
        else "normalise the stains at tiling (`histcode tile --stain_norm macenko`, or "
        "`histcode demo --stain_norm macenko`), which on synthetic cohorts with every normal "
        "from one site lifted the within-site AUC from 0.48 to 0.81 (benchmarks/RESULTS.md, "
        "'Site confounding')"
    )
    return (
        "tumour labels follow the tissue source site: the site alone tells tumour from "
        f"normal slides at AUC {found['site_only_auc']:.2f} (chance {found['chance_auc']:.2f}, "
        f"permutation p {found['p_value']:.2g}; normal slides by site: "
        f"{preview((f'{s} {n}' for s, n in normals), 6)}{also}). A model can score the "
        "site's stain or scanner instead of tumour, so the overall tumour AUC can look good "
        "while the tumour AUC within sites is at chance: read the within-site AUC "
        f"(metrics.json tumour.within_site_auc) before the overall one; {advice}."
    )


__all__ = [
    "SITE_CONFOUNDED_AUC",
    "SITE_CONFOUNDED_P",
    "site_confounding",
    "site_confounding_warning",
]
