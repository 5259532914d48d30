"""Macenko stain normalisation, with the stain matrix estimated once per slide from many tiles.

H&E tiles of one tissue look different from site to site (stain batches, staining times,
scanners). Macenko et al. (ISBI 2009) model a pixel in optical density (Beer–Lambert, natural
log: ``OD = -ln((I + 1) / Io)``, ``Io`` = 240 the light through bare glass) as a non-negative
mixture of two stain vectors: ``OD = S c`` with ``S`` the ``(3, 2)`` stain matrix (unit OD
vectors of haematoxylin and eosin, RGB) and ``c`` the two stains' concentrations. Normalising
a slide to a reference means unmixing its pixels with its own ``S`` and re-mixing them with
the reference's, its concentrations scaled so that their 99th percentiles match the
reference's.

Why not torchstain (or staintools): their Macenko normaliser estimates the source's stain
matrix from the one image it is given. A tile of 64–256 px holds a few thousand to 65,000
pixels, often mostly of one stain, so a per-tile estimate is noisy and neighbouring tiles of
the same slide come out in different colours — normalisation would add the tile-to-tile
variation it is meant to remove. Here the matrix is a property of the **slide**:

- :func:`estimate_macenko` pools the pixels of many tiles of one slide (e.g. a few hundred,
  drawn at random) into one estimate, a :class:`StainParams`;
- :meth:`StainParams.to_dict` / :meth:`StainParams.from_dict` keep it as JSON (e.g. in the
  slide's attrs in a tile store), so that every tile of the slide is normalised alike;
- :func:`normalise` applies it to batches of uint8 tiles in torch, on the tiles' device (CPU
  or CUDA): the whole map is one ``3 × 3`` matrix in OD space,
  ``S_target · diag(max_target / max_source) · pinv(S_source)`` (:func:`od_map`);
  :class:`TileNormaliser` applies a precomputed map to one channels-last tile in numpy (the
  tile reader's path: ``histcode tile --stain_norm macenko`` stores each slide's parameters,
  and every tile read for pretraining or embedding is normalised with them).

The estimate follows Macenko et al. and torchstain's implementation: pixels whose OD is above
``beta`` in every channel are tissue; the plane of their two largest principal directions holds
both stains; the stains are the directions at the ``alpha``-th and ``(100 − alpha)``-th
percentile of the pixels' angles in that plane, haematoxylin the one with the larger red OD
(it absorbs red; eosin absorbs green and passes red). One difference: the maximum
concentrations are the 99th percentiles over the *tissue* pixels, not over every pixel of the
image, so that they do not depend on how much background the tiles hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: tiling estimates stains without it
    import torch

#: Light through bare glass in the OD transform (Macenko et al., torchstain).
IO = 240.0
#: Tissue pixels: OD above this in every channel.
BETA = 0.15
#: Percentile of the pixels' angles taken as each stain's direction (robust extremes).
ALPHA = 1.0
#: Fewest tissue pixels :func:`estimate_macenko` accepts.
MIN_PIXELS = 1000
#: Percentile of the concentrations taken as a stain's maximum.
MAX_PERCENTILE = 99.0
#: Estimates whose two stain vectors are closer than this cosine hold one stain only.
MAX_STAIN_COSINE = 0.99
#: Values of ``histcode tile --stain_norm`` (a tile store's ``stain_norm`` attr).
STAIN_NORMS = ("none", "macenko")


@dataclass(frozen=True)
class StainParams:
    """The stains of one slide (or of the reference).

    Attributes:
        stain_matrix: ``(3, 2)`` float64, columns the unit OD vectors of haematoxylin (first)
            and eosin, rows R, G, B.
        max_concentrations: ``(2,)`` the 99th percentile of each stain's concentration over
            the tissue pixels (H, E).
        pixels: tissue pixels the estimate used (None for the reference or when not known).
    """

    stain_matrix: np.ndarray
    max_concentrations: np.ndarray
    pixels: int | None = None

    def __post_init__(self) -> None:
        matrix = np.asarray(self.stain_matrix, dtype=np.float64)
        maxc = np.asarray(self.max_concentrations, dtype=np.float64)
        if matrix.shape != (3, 2) or not np.isfinite(matrix).all():
            raise ValueError(
                f"stain_matrix must be a finite 3 × 2 matrix (rows R, G, B; columns H, E), got "
                f"shape {matrix.shape}"
            )
        if maxc.shape != (2,) or not np.isfinite(maxc).all() or (maxc <= 0).any():
            raise ValueError(
                f"max_concentrations must be two positive numbers (H, E), got {maxc.tolist()}"
            )
        object.__setattr__(self, "stain_matrix", matrix)
        object.__setattr__(self, "max_concentrations", maxc)

    @property
    def haematoxylin(self) -> np.ndarray:
        """``(3,)`` the haematoxylin OD vector (R, G, B)."""
        return self.stain_matrix[:, 0]

    @property
    def eosin(self) -> np.ndarray:
        """``(3,)`` the eosin OD vector (R, G, B)."""
        return self.stain_matrix[:, 1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (e.g. for a tile store's attrs); :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {
            "method": "macenko",
            "io": IO,
            "haematoxylin": [round(float(v), 6) for v in self.haematoxylin],
            "eosin": [round(float(v), 6) for v in self.eosin],
            "max_concentrations": [round(float(v), 6) for v in self.max_concentrations],
        }
        if self.pixels is not None:
            out["pixels"] = int(self.pixels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StainParams:
        """The parameters :meth:`to_dict` wrote.

        Raises:
            ValueError: not a Macenko record of this module (another method or ``Io``, a
                missing field).
        """
        if data.get("method") != "macenko":
            raise ValueError(f"not Macenko stain parameters: method {data.get('method')!r}")
        if float(data.get("io", IO)) != IO:
            raise ValueError(f"stain parameters for Io {data['io']}, this module uses Io {IO}")
        missing = [k for k in ("haematoxylin", "eosin", "max_concentrations") if k not in data]
        if missing:
            raise ValueError(f"stain parameters lack {missing}: {sorted(data)}")
        matrix = np.stack([data["haematoxylin"], data["eosin"]], axis=1)
        return cls(matrix, np.asarray(data["max_concentrations"]), data.get("pixels"))


#: The reference stains of Macenko's method as torchstain and staintools ship them.
REFERENCE = StainParams(
    np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
    np.array([1.9705, 1.0308]),
)


def _as_uint8_tiles(tiles: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    """``(N, 3, H, W)`` (or one ``(3, H, W)`` tile) uint8 as a torch tensor, checked."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a numpy array or torch tensor, got {type(tiles)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"{what}: expected uint8 RGB tiles, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected tiles of shape (N, 3, H, W), got {tuple(x.shape)}")
    return x


def optical_density(tiles: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(3, N·H·W)`` float64 OD of uint8 tiles ``(N, 3, H, W)``: ``-ln((I + 1) / Io)``.

    Numpy tiles are converted without importing torch (``histcode tile --stain_norm``)."""
    if isinstance(tiles, np.ndarray):
        x = tiles[None] if tiles.ndim == 3 else tiles
        if x.dtype != np.uint8:
            raise ValueError(f"optical_density: expected uint8 RGB tiles, got {x.dtype}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"optical_density: expected tiles of shape (N, 3, H, W), got {tiles.shape}"
            )
    else:
        x = _as_uint8_tiles(tiles, "optical_density").cpu().numpy()
    pixels = x.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    return -np.log((pixels + 1.0) / IO)


def estimate_macenko(
    tiles: np.ndarray | torch.Tensor,
    beta: float = BETA,
    alpha: float = ALPHA,
    max_pixels: int = 1_000_000,
    min_pixels: int = MIN_PIXELS,
    seed: int = 0,
) -> StainParams:
    """One slide's stain matrix and maximum concentrations from the pooled pixels of its tiles.

    Args:
        tiles: uint8 ``(N, 3, H, W)`` RGB tiles of **one** slide (numpy or torch, any device),
            e.g. a few hundred drawn at random from its tissue tiles.
        beta: tissue pixels have OD above this in every channel.
        alpha: the stains are the directions at the ``alpha``-th and ``(100 − alpha)``-th
            percentile of the tissue pixels' angles.
        max_pixels: at most this many tissue pixels (drawn at random) enter the estimate.
        min_pixels: fewest tissue pixels accepted.
        seed: seed of that draw.

    Returns:
        The slide's :class:`StainParams` (haematoxylin first).

    Raises:
        ValueError: fewer than ``min_pixels`` tissue pixels (background tiles, or too few
            tiles), or tissue that shows one stain only (the two directions coincide).
    """
    od = optical_density(tiles)
    tissue = (od > beta).all(axis=0)
    n = int(tissue.sum())
    if n < min_pixels:
        raise ValueError(
            f"only {n:,} of {od.shape[1]:,} pixels have optical density above beta={beta} in "
            f"every channel; a stain estimate needs at least {min_pixels:,} tissue pixels. "
            "Give it more tiles of the slide (tissue tiles, not background), or lower beta "
            "for a pale stain"
        )
    od = od[:, tissue]
    if n > max_pixels:
        od = od[:, np.random.default_rng(seed).choice(n, max_pixels, replace=False)]
    _, vectors = np.linalg.eigh(np.cov(od))  # eigenvalues ascending
    plane = vectors[:, [2, 1]]  # the two largest principal directions
    if plane[:, 0].sum() < 0:  # the first points into positive OD, where the pixels are
        plane[:, 0] = -plane[:, 0]
    projected = plane.T @ od
    angle = np.arctan2(projected[1], projected[0])
    lo, hi = np.percentile(angle, [alpha, 100 - alpha])
    a = plane @ np.array([np.cos(lo), np.sin(lo)])
    b = plane @ np.array([np.cos(hi), np.sin(hi)])
    a, b = (a if a.sum() >= 0 else -a), (b if b.sum() >= 0 else -b)
    h, e = (a, b) if a[0] > b[0] else (b, a)  # haematoxylin absorbs red more than eosin
    matrix = np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e)], axis=1)
    cosine = float(matrix[:, 0] @ matrix[:, 1])
    if cosine > MAX_STAIN_COSINE:
        raise ValueError(
            f"the tissue pixels show one stain only (the two estimated stain vectors have "
            f"cosine {cosine:.4f}): give it tiles that hold both nuclei and stroma"
        )
    concentrations = np.linalg.lstsq(matrix, od, rcond=None)[0]
    maxc = np.percentile(concentrations, MAX_PERCENTILE, axis=1)
    if (maxc <= 0).any():
        raise ValueError(
            f"a stain's 99th-percentile concentration is not positive ({maxc.tolist()}): the "
            "tiles do not look like H&E"
        )
    return StainParams(matrix, maxc, pixels=min(n, max_pixels))


def od_map(source: StainParams, target: StainParams = REFERENCE) -> np.ndarray:
    """``(3, 3)`` the linear map in OD space that :func:`normalise` applies:
    ``S_target · diag(max_target / max_source) · pinv(S_source)``."""
    scale = np.diag(target.max_concentrations / source.max_concentrations)
    return target.stain_matrix @ scale @ np.linalg.pinv(source.stain_matrix)


#: Optical density of each uint8 value, ``-ln((I + 1) / Io)``.
_OD_TABLE = -np.log((np.arange(256, dtype=np.float64) + 1.0) / IO)


class TileNormaliser:
    """One slide's normalisation, precomputed, applied to one channels-last tile at a time.

    The tile reader's per-tile path (:class:`histcode.tilereader.TileDataset`); made once per
    slide from its OD map (:func:`od_map`). Since ``I_out = Io·exp(-M · OD(I)) − 1`` and each
    ``OD`` depends on one channel's uint8 value, ``exp(-M·OD)`` is a product of three factors
    each looked up in a 256-entry table: a tile costs 9 table look-ups and 6 multiplications
    per pixel in float32, no ``log`` nor ``exp`` (measured: 1.5–2.5 ms a 256 × 256 px tile on a
    busy 2-core CPU, against 8 ms for the direct ``exp``). Same result as
    :func:`normalise` within 1 grey level (float32 rounding). A map so extreme that a product
    could leave float32's range falls back to the direct ``exp`` (slower, same result).

    The tables (9 KB) are built on first use in each process and not pickled, so that a tile
    index of many slides travels to loader workers as one ``3 × 3`` matrix a slide.

    Args:
        od_matrix: ``(3, 3)`` the slide's map, ``od_map(source, target)``.
        use_tables: False: always the direct ``exp``.
    """

    def __init__(self, od_matrix: np.ndarray, use_tables: bool = True) -> None:
        m = np.asarray(od_matrix, dtype=np.float64)
        if m.shape != (3, 3) or not np.isfinite(m).all():
            raise ValueError(f"od_matrix must be a finite 3 × 3 matrix, got {m.shape}")
        self.od_matrix = m
        self.use_tables = use_tables
        self._tables: np.ndarray | None = None

    @property
    def tables(self) -> np.ndarray | None:
        """``(3, 3, 256)`` float32 factors ``Io^[k=0]·exp(-M[c, k]·OD[v])``, or None where the
        direct ``exp`` is used (``use_tables`` false, or a map that could leave float32)."""
        if self._tables is None and self.use_tables:
            logs = -self.od_matrix[:, :, None] * _OD_TABLE[None, None, :]
            logs[:, 0] += np.log(IO)
            high = logs.max(axis=2).sum(axis=1).max()
            low = logs.min(axis=2).sum(axis=1).min()
            if high < 80 and low > -80:  # every product within float32 (e^±88)
                self._tables = np.exp(logs).astype(np.float32)
            else:
                self.use_tables = False
        return self._tables

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tables": None}

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB → the normalised tile, a new ``(H, W, 3)`` uint8 array."""
        if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 tile, got {tile.dtype} {tile.shape}")
        out = np.empty(tile.shape, np.uint8)
        t = self.tables
        if t is None:
            od = _OD_TABLE.astype(np.float32)[tile].reshape(-1, 3)
            mapped = od @ self.od_matrix.T.astype(np.float32)
            channels = np.exp(-mapped).T.reshape(3, *tile.shape[:2]) * IO
        else:
            rgb = [tile[..., k] for k in range(3)]
            channels = []
            for c in range(3):
                x = np.take(t[c, 0], rgb[0])
                x *= np.take(t[c, 1], rgb[1])
                x *= np.take(t[c, 2], rgb[2])
                channels.append(x)
        for c in range(3):
            x = channels[c] - 1.0
            np.clip(x, 0.0, 255.0, out=x)
            np.rint(x, out=x)
            out[..., c] = x
        return out


def normalise(
    tiles: np.ndarray | torch.Tensor,
    source: StainParams,
    target: StainParams = REFERENCE,
    chunk: int = 512,
) -> np.ndarray | torch.Tensor:
    """Tiles of a slide with stains ``source`` re-stained as ``target`` (Macenko).

    Each pixel is unmixed into H and E concentrations with the slide's stain matrix, each
    concentration scaled by ``target``'s over ``source``'s maximum, and re-mixed with
    ``target``'s stain matrix, in float32 torch on the tiles' device; back to RGB by the
    inverse of :func:`optical_density` (``I = Io·exp(-OD) − 1``, so that a slide normalised to
    its own stains keeps its pixels).

    Args:
        tiles: uint8 ``(N, 3, H, W)`` (or one ``(3, H, W)``) RGB tiles, numpy or torch.
        source: the slide's stains (:func:`estimate_macenko`).
        target: the stains to map to (default: Macenko's reference).
        chunk: tiles converted to float at a time (bounds the memory).

    Returns:
        uint8 tiles of the same shape and kind (a numpy array for a numpy input; a tensor on
        the input's device for a tensor).
    """
    import torch

    x = _as_uint8_tiles(tiles, "normalise")
    m = torch.as_tensor(od_map(source, target), dtype=torch.float32, device=x.device)
    out = torch.empty_like(x)
    for start in range(0, len(x), chunk):
        batch = x[start : start + chunk].float()
        od = -torch.log((batch + 1.0) / IO)
        mapped = torch.einsum("ij,njhw->nihw", m, od)
        out[start : start + chunk] = (IO * torch.exp(-mapped) - 1).clamp_(0, 255).round_().byte()
    if isinstance(tiles, np.ndarray):
        return out.reshape(tiles.shape).numpy()
    return out.reshape(tiles.shape)
