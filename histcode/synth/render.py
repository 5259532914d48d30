"""H&E-like pixels of a synthetic slide, for any region of any pyramid level.

A pixel's colour comes from two stain concentrations, haematoxylin (nuclei, basophilic
cytoplasm) and eosin (stroma, cytoplasm), through the slide's :class:`~histcode.synth.stain.Stain`
lookup table (Beer–Lambert). The concentrations are composed from

- per-class backgrounds (stroma, tumour, lymphocyte-rich, necrosis), evaluated from the
  layout's distance fields on a control grid of about 1 µm (or per pixel, super-sampled, on
  coarse levels), with a soft, ragged tissue edge;
- a periodic fibrous eosin texture defined in µm (precomputed once, box-averaged per level);
- glands (lumen and epithelium) and nuclei stamped from prototype rasters at the level's
  µm/px.

Everything is defined in µm and rasterised at the level's resolution, so any strip of any
level can be rendered alone, in any order, with the same result, and a 20x scan looks like a
40x scan averaged 2 × 2. Memory is a few float32 planes of the strip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from histcode.synth.cells import (
    Cells,
    Morphology,
    gland_shapes,
    gland_sprites,
    nucleus_extent,
    nucleus_sprites,
)
from histcode.synth.stain import E_MAX, H_MAX, Stain
from histcode.synth.tissue import FIELDS, TissueLayout

#: µm/px and period (µm) of the precomputed fibre texture.
TEXTURE_MPP, TEXTURE_PERIOD = 0.25, 512.0
#: side (px) of the periodic glass-noise tile.
NOISE_TILE = 256
#: Extra margin (µm) around tissue rendered in full (nuclei reach past the tissue edge).
MARGIN_UM = 12.0

_F_TISSUE, _F_TUMOUR, _F_LYMPH, _F_NECROSIS = (
    FIELDS.index(n) for n in ("tissue", "tumour", "lymphocyte", "necrosis")
)
_F_EOSIN = FIELDS.index("eosin")


@dataclass(frozen=True)
class Dust:
    """A speck of dust on the glass (neutral grey absorption).

    Attributes:
        x: centre x, µm.
        y: centre y, µm.
        radius: radius, µm.
        density: optical density at the centre.
        phase: shape parameter (irregularity phase), radians.
    """

    x: float
    y: float
    radius: float
    density: float
    phase: float


def random_dust(
    rng: np.random.Generator, width_um: float, height_um: float, count: int
) -> tuple[Dust, ...]:
    """``count`` random specks over the slide."""
    return tuple(
        Dust(
            float(rng.uniform(0, width_um)),
            float(rng.uniform(0, height_um)),
            float(rng.uniform(2.0, 12.0)),
            float(rng.uniform(0.15, 0.6)),
            float(rng.uniform(0, 2 * math.pi)),
        )
        for _ in range(count)
    )


# -- textures (process-wide caches) ---------------------------------------------------------


@lru_cache(maxsize=1)
def _fibre_texture_base() -> np.ndarray:
    """Wavy collagen bundles with thin clefts, periodic, mean 1, at TEXTURE_MPP, (N, N) float32.

    Streaks are white noise band-passed along a few orientations (coherent over ~60 µm along,
    ~9 µm apart across), blended with a smoothly varying weight per orientation, then
    domain-warped so that they wave; clefts are where the streak field is low. Built at twice
    TEXTURE_MPP and upsampled, plus a fine grain at TEXTURE_MPP.
    """
    coarse = 2 * TEXTURE_MPP
    n = round(TEXTURE_PERIOD / coarse)
    rng = np.random.default_rng(0xF1B5E5)
    fy = np.fft.fftfreq(n, coarse)[:, None]
    fx = np.fft.rfftfreq(n, coarse)[None, :]
    noise = np.fft.rfft2(rng.standard_normal((n, n)))
    orientations = 4
    # smooth (~60 µm) random weight of each orientation
    lowpass = np.exp(-(fx**2 + fy**2) / (2 * 0.004**2))
    weights = np.stack(
        [
            np.fft.irfft2(np.fft.rfft2(rng.standard_normal((n, n))) * lowpass, s=(n, n))
            for _ in range(orientations)
        ]
    )
    weights = np.exp(5.0 * weights / weights.std())
    weights /= weights.sum(0, keepdims=True)
    fib = np.zeros((n, n))
    for k in range(orientations):
        t = math.pi * k / orientations
        along = fx * math.cos(t) + fy * math.sin(t)
        across = -fx * math.sin(t) + fy * math.cos(t)
        band = np.exp(-((along / 0.015) ** 2) - ((np.abs(across) - 0.11) / 0.14) ** 2)
        c = np.fft.irfft2(noise * band, s=(n, n))
        fib += weights[k] * c / c.std()
    lowpass = np.exp(-(fx**2 + fy**2) / (2 * 0.008**2))
    warp = np.stack(
        [
            np.fft.irfft2(np.fft.rfft2(rng.standard_normal((n, n))) * lowpass, s=(n, n))
            for _ in range(2)
        ]
    )
    warp *= 10.0 / warp.std()
    yy, xx = np.mgrid[0:n, 0:n]
    fib = ndimage.map_coordinates(
        fib, [(yy + warp[0]) % n, (xx + warp[1]) % n], order=1, mode="grid-wrap"
    )
    fib = ndimage.zoom(fib / fib.std(), 2, order=1, mode="grid-wrap")
    grain = ndimage.gaussian_filter(rng.standard_normal(fib.shape, np.float32), 1.2, mode="wrap")
    tex = (1.0 + 0.25 * fib + 0.08 * grain / grain.std()) / (1.0 + np.exp(-(fib + 1.25) / 0.12))
    tex = np.clip(tex, 0.0, None)
    return (tex / tex.mean()).astype(np.float32)


def _resample_periodic(tex: np.ndarray, size: int) -> np.ndarray:
    """Resample a periodic texture to ``size`` × ``size`` px by area averaging."""
    n = tex.shape[0]
    if size == n:
        return tex
    if n % size == 0:
        f = n // size
        return tex.reshape(size, f, size, f).mean(axis=(1, 3))
    img = Image.fromarray(tex.astype(np.float32), mode="F")
    method = Image.Resampling.BOX if size < n else Image.Resampling.BILINEAR
    return np.asarray(img.resize((size, size), method), np.float32)


@lru_cache(maxsize=16)
def fibre_texture(m: float) -> np.ndarray:
    """The fibre texture minus 1 at ``m`` µm/px, (P, P) float32 with P = period / m."""
    base = _fibre_texture_base()
    size = max(1, round(TEXTURE_PERIOD / m))
    return _resample_periodic(base, size) - 1.0


@lru_cache(maxsize=1)
def _edge_noise() -> np.ndarray:
    """Ragged-edge noise: periodic 256 µm at 1 µm/px, unit sd, (256, 256) float32."""
    rng = np.random.default_rng(0xED6E)
    t = ndimage.gaussian_filter(rng.standard_normal((256, 256)), 2.0, mode="wrap")
    t2 = ndimage.gaussian_filter(rng.standard_normal((256, 256)), 8.0, mode="wrap")
    t = t / t.std() + 1.5 * t2 / t2.std()
    return (t / t.std()).astype(np.float32)


# -- rendering -----------------------------------------------------------------------------


def _sample_rows_cols(
    fields: np.ndarray, grid_um: float, ys: np.ndarray, xs: np.ndarray
) -> np.ndarray:
    """Bilinear values of grid fields at the outer product of ``ys`` and ``xs`` (µm).

    Args:
        fields: (F, H, W) values at cell centres.
        grid_um: µm per cell.
        ys: (n,) µm.
        xs: (m,) µm.

    Returns:
        (F, n, m) float32.
    """

    def weights(pos: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = np.clip(pos / grid_um - 0.5, 0, size - 1)
        i0 = np.minimum(g.astype(np.intp), size - 1)
        i1 = np.minimum(i0 + 1, size - 1)
        return i0, i1, (g - i0).astype(np.float32)

    _, h, w = fields.shape
    y0, y1, wy = weights(ys, h)
    rows = fields[:, y0] * (1 - wy)[None, :, None] + fields[:, y1] * wy[None, :, None]
    x0, x1, wx = weights(xs, w)
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def _stamp_add(
    plane: np.ndarray, sprites: np.ndarray, proto: np.ndarray, cx: np.ndarray, cy: np.ndarray
) -> None:
    """Add sprites centred at integer pixels (cx, cy) into ``plane`` (clipped at its edges).

    Args:
        plane: (h, w) float32, modified in place.
        sprites: (K, S, S) with S odd.
        proto: (N,) sprite index per stamp.
        cx: (N,) column of each stamp's centre pixel.
        cy: (N,) row of each stamp's centre pixel.
    """
    if len(proto) == 0:
        return
    h, w = plane.shape
    s = sprites.shape[1]
    r = s // 2
    if s <= 5:  # tiny sprites: one vectorised scatter-add
        d = np.arange(-r, r + 1)
        ys = cy[:, None, None] + d[None, :, None]
        xs = cx[:, None, None] + d[None, None, :]
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        flat = (ys * w + xs)[ok]
        vals = sprites[proto][ok]
        plane += np.bincount(flat, vals, minlength=h * w).reshape(h, w).astype(np.float32)
        return
    y0, x0 = cy - r, cx - r
    ya, xa = np.maximum(y0, 0), np.maximum(x0, 0)
    yb, xb = np.minimum(y0 + s, h), np.minimum(x0 + s, w)
    ok = (ya < yb) & (xa < xb)
    for p, a0, a1, b0, b1, oy, ox in zip(
        proto[ok].tolist(),
        ya[ok].tolist(),
        yb[ok].tolist(),
        xa[ok].tolist(),
        xb[ok].tolist(),
        y0[ok].tolist(),
        x0[ok].tolist(),
        strict=True,
    ):
        plane[a0:a1, b0:b1] += sprites[p, a0 - oy : a1 - oy, b0 - ox : b1 - ox]


def _upsample(a: np.ndarray, c: int, y_off: int, x_off: int, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour upsampling by ``c`` of a control array, cropped to (h, w)."""
    if c == 1:
        return a[y_off : y_off + h, x_off : x_off + w]
    ny, nx = a.shape
    out = np.empty((ny, c, nx, c), np.float32)
    out[...] = a[:, None, :, None]
    return out.reshape(ny * c, nx * c)[y_off : y_off + h, x_off : x_off + w]


def _periodic(tile: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Block ``[y, y+h) × [x, x+w)`` of the infinite periodic repetition of ``tile``.

    Args:
        tile: (P, Q, ...) one period.

    Returns:
        (h, w, ...) array (a fresh one, writable).
    """
    p, q = tile.shape[:2]
    rows = tile[(y + np.arange(h)) % p]
    x0 = x % q
    reps = -(-(x0 + w) // q)
    if reps > 1:
        rows = np.concatenate([rows] * reps, axis=1)
    return rows[:, x0 : x0 + w]


class _Level:
    """Per-resolution precomputed material: textures, sprites, glass noise."""

    def __init__(self, renderer: SlideRenderer, m: float) -> None:
        self.m = m
        if m < 1.0:
            self.c, self.ss = max(1, round(1.0 / m)), 1
        else:
            self.c, self.ss = 1, int(min(4, max(1, round(m / 2))))
        self.texture = fibre_texture(m)
        morph = renderer.morphology
        self.nuclei = [nucleus_sprites(k, m) for k in morph.nuclei]
        self.glands = [gland_sprites(k, m) for k in morph.glands]
        rng = np.random.default_rng([renderer.seed, round(m * 1e6), 0x6A55])
        self.noise = np.clip(rng.normal(0.004, 0.004, (NOISE_TILE, NOISE_TILE)), 0.0, None).astype(
            np.float32
        )
        q = np.clip(self.noise * (255 / E_MAX) + 0.5, 0, 255).astype(np.uint16)
        qh = np.clip(self.noise * (255 / H_MAX) + 0.5, 0, 255).astype(np.uint16)
        self.glass = renderer.lut[(qh << 8) | q]


class SlideRenderer:
    """The pixel source of a synthetic slide (a ``RenderFn`` for :func:`write_pyramid`).

    Args:
        layout: where tissue and its classes lie.
        cells: nuclei and glands.
        morphology: how the classes look.
        stain: the slide's stain (site cast included).
        mpp: level-0 µm/px.
        background: RGB of the glass.
        strength: overall stain strength (< 1 for a pale slide).
        seed: seed of the glass noise.
        dust: specks of dust on the glass.
    """

    def __init__(
        self,
        layout: TissueLayout,
        cells: Cells,
        morphology: Morphology,
        stain: Stain,
        *,
        mpp: float,
        background: tuple[int, int, int] = (246, 245, 247),
        strength: float = 1.0,
        seed: int = 0,
        dust: tuple[Dust, ...] = (),
    ) -> None:
        self.layout = layout
        self.cells = cells
        self.morphology = morphology
        self.stain = stain
        self.mpp = mpp
        self.background = background
        self.strength = strength
        self.seed = seed
        self.dust = dust
        self._lut: np.ndarray | None = None
        self._fields = np.ascontiguousarray(
            layout.fields[[_F_TISSUE, _F_TUMOUR, _F_LYMPH, _F_NECROSIS, _F_EOSIN]]
        )
        self._levels: dict[float, _Level] = {}
        self._gland_radius = max(s.radius for k in morphology.glands for s in gland_shapes(k)) + 1.0
        self._nucleus_radius = max(nucleus_extent(k) for k in morphology.nuclei) + 1.0

    @property
    def lut(self) -> np.ndarray:
        """(65536, 3) uint8 colour of each quantised (haematoxylin, eosin) pair."""
        if self._lut is None:
            self._lut = self.stain.lookup_table(self.background, self.strength)
        return self._lut

    def _level(self, m: float) -> _Level:
        key = round(m, 9)
        if key not in self._levels:
            self._levels[key] = _Level(self, m)
        return self._levels[key]

    def __call__(self, level: int, downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels of a region of a pyramid level (the writer's ``RenderFn``)."""
        return self.region(self.mpp * downsample, x, y, w, h)

    def region(self, m: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels of a region at ``m`` µm/px.

        Args:
            m: µm per pixel of the level.
            x: left column, in that level's pixels.
            y: top row.
            w: width in pixels.
            h: height in pixels.

        Returns:
            (h, w, 3) uint8.
        """
        lv = self._level(m)
        out = _periodic(lv.glass, y, x, h, w)
        self._tissue(lv, x, y, w, h, out)
        self._dust(out, m, x, y)
        return out

    # -- tissue ----------------------------------------------------------------------------
    def _tissue(self, lv: _Level, x: int, y: int, w: int, h: int, out: np.ndarray) -> None:
        """Render the tissue of a region into ``out`` (which holds the glass)."""
        m, c, ss = lv.m, lv.c, lv.ss
        lay = self.layout
        g = lay.grid_um
        # quick reject: no tissue in the grid rows and columns around the region
        r0, r1 = max(0, int(y * m / g) - 2), int((y + h) * m / g) + 3
        c0, c1 = max(0, int(x * m / g) - 2), int((x + w) * m / g) + 3
        near = (lay.fields[_F_TISSUE, r0:r1, c0:c1] > -2 * g).any(axis=0)
        if not near.any():
            return
        # narrow the region to the columns with tissue nearby
        on = np.flatnonzero(near)
        x_lo = max(x, int((c0 + on[0] - 1) * g / m))
        x_hi = min(x + w, math.ceil((c0 + on[-1] + 2) * g / m))
        out = out[:, x_lo - x : x_hi - x]
        x, w = x_lo, x_hi - x_lo
        cx0, cy0 = x // c, y // c
        nx, ny = -(-(x + w) // c) - cx0, -(-(y + h) // c) - cy0
        sub = (np.arange(ss) + 0.5) * c / ss
        xs = (((cx0 + np.arange(nx))[:, None] * c + sub[None, :]) * m).ravel()
        ys = (((cy0 + np.arange(ny))[:, None] * c + sub[None, :]) * m).ravel()
        # classes absent around the region are skipped (weight 0)
        window = self._fields[:, r0:r1, c0:c1]
        present = [i for i in (1, 2, 3) if window[i].max() > -4.0]
        f = _sample_rows_cols(self._fields[[0, *present, 4]], g, ys, xs)
        en = _edge_noise()[(ys.astype(np.intp) % 256)[:, None], (xs.astype(np.intp) % 256)]
        alpha = np.clip(0.5 + (f[0] + 2.5 * en) / 1.5, 0.0, 1.0)
        alpha_px = alpha.reshape(ny, ss, nx, ss).mean(axis=(1, 3)) if ss > 1 else alpha
        cols = np.flatnonzero(alpha_px.max(axis=0) > 0)
        if len(cols) == 0:
            return
        weight = {i: np.clip(0.5 + f[1 + k] / 3.0, 0.0, 1.0) for k, i in enumerate(present)}
        if 3 in weight and 1 in weight:
            weight[3] = weight[3] * weight[1]  # necrosis lies inside tumour
        mo = self.morphology
        classes = {1: mo.tumour, 2: mo.lymphocyte, 3: mo.necrosis}

        def blend(attr: str) -> np.ndarray:
            base = getattr(mo.stroma, attr)
            value = np.full(alpha.shape, base, np.float32)
            for i, wi in weight.items():
                # necrosis replaces tumour, the others replace stroma
                ref = getattr(mo.tumour, attr) if i == 3 else base
                delta = getattr(classes[i], attr) - ref
                if delta:
                    value += wi * delta
            return value

        e_c = blend("eosin") * f[-1] * alpha
        ea_c = e_c * blend("fibres")
        h_c = blend("haematoxylin") * alpha
        if ss > 1:
            e_c, ea_c, h_c = (a.reshape(ny, ss, nx, ss).mean(axis=(1, 3)) for a in (e_c, ea_c, h_c))
        margin = math.ceil(MARGIN_UM / m)
        px0 = max(x, (cx0 + int(cols[0])) * c - margin)
        px1 = min(x + w, (cx0 + int(cols[-1]) + 1) * c + margin)
        wr = px1 - px0
        ccol0 = px0 // c - cx0
        ccol1 = -(-px1 // c) - cx0
        oy, ox = y - cy0 * c, px0 - (cx0 + ccol0) * c

        def up(a: np.ndarray) -> np.ndarray:
            return _upsample(a[:, ccol0:ccol1].astype(np.float32, copy=False), c, oy, ox, h, wr)

        e = up(ea_c)
        e *= _periodic(lv.texture, y, px0, h, wr)
        e += up(e_c)
        hh = up(h_c)
        if c == 1:
            hh = hh.copy()
        self._glands(lv, px0, y, wr, h, e, hh)
        self._nuclei(lv, px0, y, wr, h, hh)
        noise = _periodic(lv.noise, y, px0, h, wr)
        hh += noise
        e += noise
        # both planes are ≥ 0 by construction: only the top needs clipping
        hh *= 255 / H_MAX
        hh += 0.5
        np.minimum(hh, 255, out=hh)
        e *= 255 / E_MAX
        e += 0.5
        np.minimum(e, 255, out=e)
        idx = hh.astype(np.uint16)
        idx <<= 8
        idx |= e.astype(np.uint16)
        out[:, px0 - x : px1 - x] = self.lut.take(idx, axis=0)

    def _glands(
        self, lv: _Level, x: int, y: int, w: int, h: int, e: np.ndarray, hh: np.ndarray
    ) -> None:
        """Paint glands (lumen, cytoplasm) into the eosin and haematoxylin planes.

        Glands never overlap (see ``place_cells``), so they are painted one after another.
        """
        cells, m = self.cells, lv.m
        if len(cells.gland_xy) == 0:
            return
        r = self._gland_radius
        gy = cells.gland_xy[:, 1]
        i0, i1 = np.searchsorted(gy, [y * m - r, (y + h) * m + r])
        if i0 >= i1:
            return
        gx = cells.gland_xy[i0:i1, 0]
        sel = np.flatnonzero((gx > x * m - r) & (gx < (x + w) * m + r)) + i0
        cyto = self.morphology.cytoplasm
        for i in sel.tolist():
            k = int(cells.gland_kind[i])
            sprite = lv.glands[k][int(cells.gland_proto[i])]
            s = sprite.shape[-1]
            y0 = math.floor(cells.gland_xy[i, 1] / m) - y - s // 2
            x0 = math.floor(cells.gland_xy[i, 0] / m) - x - s // 2
            ya, xa, yb, xb = max(y0, 0), max(x0, 0), min(y0 + s, h), min(x0 + s, w)
            if ya >= yb or xa >= xb:
                continue
            lumen = sprite[0, ya - y0 : yb - y0, xa - x0 : xb - x0]
            cover = sprite[1, ya - y0 : yb - y0, xa - x0 : xb - x0]
            keep = 1.0 - 0.9 * lumen
            es, hs = e[ya:yb, xa:xb], hh[ya:yb, xa:xb]
            es += cover * (cyto[k][0] - es)
            es *= keep
            es += 0.06 * lumen
            hs += cyto[k][1] * cover
            hs *= keep

    def _nuclei(self, lv: _Level, x: int, y: int, w: int, h: int, hh: np.ndarray) -> None:
        cells, m = self.cells, lv.m
        if len(cells.nucleus_xy) == 0:
            return
        r = self._nucleus_radius
        i0, i1 = np.searchsorted(cells.nucleus_xy[:, 1], [y * m - r, (y + h) * m + r])
        if i0 >= i1:
            return
        xy = cells.nucleus_xy[i0:i1]
        sel = (xy[:, 0] > x * m - r) & (xy[:, 0] < (x + w) * m + r)
        xy = xy[sel]
        kinds = cells.nucleus_kind[i0:i1][sel]
        protos = cells.nucleus_proto[i0:i1][sel]
        cx = np.floor(xy[:, 0] / m).astype(np.intp) - x
        cy = np.floor(xy[:, 1] / m).astype(np.intp) - y
        for k in np.unique(kinds).tolist():
            on = kinds == k
            _stamp_add(hh, lv.nuclei[k], protos[on].astype(np.intp), cx[on], cy[on])

    def _dust(self, out: np.ndarray, m: float, x: int, y: int) -> None:
        h, w = out.shape[:2]
        for d in self.dust:
            r_px = (d.radius * 1.4) / m + 1
            cx, cy = d.x / m - x, d.y / m - y
            x0, x1 = max(0, int(cx - r_px)), min(w, int(cx + r_px) + 1)
            y0, y1 = max(0, int(cy - r_px)), min(h, int(cy + r_px) + 1)
            if x0 >= x1 or y0 >= y1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            dx, dy = (xx + 0.5 - cx) * m, (yy + 0.5 - cy) * m
            phi = np.arctan2(dy, dx)
            rr = np.hypot(dx, dy) / (d.radius * (1 + 0.3 * np.cos(3 * phi + d.phase)))
            cover = np.clip((1.0 - rr) * d.radius / max(m, 0.5), 0.0, 1.0)
            factor = np.exp(-d.density * cover)[..., None]
            out[y0:y1, x0:x1] = (out[y0:y1, x0:x1] * factor + 0.5).astype(np.uint8)
