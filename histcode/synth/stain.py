"""Stain model: Beer–Lambert absorption of haematoxylin and eosin (the inverse of HED
colour deconvolution), with a colour cast per tissue source site.

A pixel with haematoxylin concentration ``h`` and eosin concentration ``e`` transmits
``background · exp(-(h·s_h·H + e·s_e·E))`` where ``H`` and ``E`` are the stains' optical-density
(OD) vectors and ``s_h``, ``s_e`` their strengths. Staining differences between laboratories
are differences of these vectors (hue) and strengths (intensity) — the variation that stain
normalisation methods (Ruifrok & Johnston 2001; Macenko et al. 2009) model — so a site's
colour cast is drawn by rotating the vectors in OD space and scaling the strengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

#: Macenko et al.'s reference H&E OD vectors (unit length, RGB order).
HAEMATOXYLIN = (0.5626, 0.7201, 0.4062)
EOSIN = (0.2159, 0.8012, 0.5581)

#: Concentration range mapped onto the 8-bit lookup table index of each stain.
H_MAX, E_MAX = 3.5, 2.0


def _unit(v: np.ndarray) -> tuple[float, float, float]:
    v = np.clip(v, 0.02, None)
    v = v / np.linalg.norm(v)
    return (float(v[0]), float(v[1]), float(v[2]))


@dataclass(frozen=True)
class Stain:
    """A staining protocol: OD vectors and strengths of haematoxylin and eosin.

    Attributes:
        haematoxylin: unit OD vector of haematoxylin (RGB).
        eosin: unit OD vector of eosin (RGB).
        h_scale: strength of haematoxylin (1 = reference).
        e_scale: strength of eosin.
    """

    haematoxylin: tuple[float, float, float] = HAEMATOXYLIN
    eosin: tuple[float, float, float] = EOSIN
    h_scale: float = 1.0
    e_scale: float = 1.0

    def lookup_table(self, background: tuple[int, int, int], strength: float = 1.0) -> np.ndarray:
        """RGB of every quantised (haematoxylin, eosin) pair.

        Args:
            background: RGB of the light through bare glass.
            strength: overall factor on both stains (< 1 for faint, pale slides).

        Returns:
            (65536, 3) uint8; row ``hq · 256 + eq`` is the colour of concentrations
            ``hq/255·H_MAX`` and ``eq/255·E_MAX``.
        """
        q = np.arange(256, dtype=np.float64) / 255.0
        h = (q * H_MAX * self.h_scale * strength)[:, None, None] * np.asarray(self.haematoxylin)
        e = (q * E_MAX * self.e_scale * strength)[None, :, None] * np.asarray(self.eosin)
        rgb = np.asarray(background, np.float64) * np.exp(-(h + e))
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8).reshape(65536, 3)

    def jittered(self, rng: np.random.Generator, amount: float) -> Stain:
        """A slightly different batch of the same protocol (slide-to-slide variation)."""
        if amount <= 0:
            return self
        return replace(
            self,
            haematoxylin=_unit(np.asarray(self.haematoxylin) + rng.normal(0, amount / 3, 3)),
            eosin=_unit(np.asarray(self.eosin) + rng.normal(0, amount / 3, 3)),
            h_scale=self.h_scale * math.exp(rng.normal(0, amount)),
            e_scale=self.e_scale * math.exp(rng.normal(0, amount)),
        )


#: Plausible stain OD vectors seen across laboratories: Ruifrok & Johnston's (blue
#: haematoxylin, bright pink eosin), Macenko et al.'s reference (purple, mauve), and a brownish
#: haematoxylin / orange-red eosin and a navy haematoxylin / purplish eosin.
H_VARIANTS = ((0.650, 0.704, 0.286), HAEMATOXYLIN, (0.48, 0.76, 0.44), (0.72, 0.65, 0.24))
E_VARIANTS = ((0.072, 0.990, 0.105), EOSIN, (0.05, 0.83, 0.56), (0.33, 0.80, 0.50))


def site_stain(site: int, sites: int, seed: int, strength: float) -> Stain:
    """The stain of one tissue source site: the reference pulled towards other protocols.

    Each site leans towards one of :data:`H_VARIANTS` and one of :data:`E_VARIANTS` (sites
    take different ones in turn) and gets its own stain strengths, so any two sites differ
    visibly when ``strength`` is large — the colour casts stain normalisation has to undo.

    Args:
        site: index of the site, 0-based.
        sites: number of sites.
        seed: random seed of the cohort.
        strength: 0 = every site has the reference stain; ~0.2 mild; 1 strong casts.

    Returns:
        The site's stain.
    """
    rng = np.random.default_rng([seed, site, 0x57A1])
    n = len(H_VARIANTS)

    def mix(
        variants: tuple[tuple[float, float, float], ...],
        favourite: int,
        reference: tuple[float, float, float],
    ) -> tuple[float, float, float]:
        w = 0.7 * np.eye(n)[favourite % n] + 0.3 * rng.dirichlet(np.ones(n))
        lab = w @ np.asarray(variants)
        return _unit((1 - strength) * np.asarray(reference) + strength * lab)

    # sites take the variants in turn (rotated by the seed) and strengths spread on a circle
    turn = site + int(np.random.default_rng([seed, 0x57A2]).integers(0, n))
    phase = 2 * math.pi * site / max(sites, 1) + float(
        np.random.default_rng([seed, 0x57A3]).uniform(0, 2 * math.pi)
    )
    return Stain(
        haematoxylin=mix(H_VARIANTS, turn, HAEMATOXYLIN),
        eosin=mix(E_VARIANTS, turn + 2, EOSIN),
        h_scale=math.exp(0.35 * strength * math.cos(phase)),
        e_scale=math.exp(0.4 * strength * math.sin(phase)),
    )
