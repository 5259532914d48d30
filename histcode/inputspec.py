"""What an encoder expects of its input tiles: resolution, size and normalisation.

:class:`InputSpec` is written into every encoder's card (``input_spec``) and checked against a
tile store before embedding; :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD` are the default
normalisation (torchvision's and timm's). This module imports only the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: ImageNet normalisation, the default of torchvision and timm backbones.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_triple(values: Any, what: str) -> tuple[float, float, float]:
    triple = tuple(float(v) for v in values)
    if len(triple) != 3:
        raise ValueError(f"{what} needs one value per RGB channel (3 values), got {values!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class InputSpec:
    """What an encoder expects of its input tiles (after timm's ``PretrainedCfg``).

    Tiles are read at ``mpp`` µm/px, ``tile_size`` × ``tile_size`` pixels, scaled to [0, 1]
    and normalised per channel as ``(x - mean) / std``.

    Attributes:
        mpp: physical resolution of the tiles in µm per pixel (0.5 ≈ 20x).
        tile_size: side of a square tile in pixels at ``mpp``.
        mean: per-channel RGB mean subtracted after scaling to [0, 1].
        std: per-channel RGB standard deviation divided by after subtracting ``mean``.
    """

    mpp: float = 0.5
    tile_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        mpp = float(self.mpp)
        if not math.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"mpp must be a positive number of µm/px (e.g. 0.5), got {self.mpp!r}")
        if isinstance(self.tile_size, bool) or int(self.tile_size) != self.tile_size:
            raise ValueError(f"tile_size must be a whole number of pixels, got {self.tile_size!r}")
        if self.tile_size <= 0:
            raise ValueError(f"tile_size must be positive (e.g. 224), got {self.tile_size!r}")
        std = _as_triple(self.std, "std")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {self.std!r}")
        object.__setattr__(self, "mpp", mpp)
        object.__setattr__(self, "tile_size", int(self.tile_size))
        object.__setattr__(self, "mean", _as_triple(self.mean, "mean"))
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return {
            "mpp": self.mpp,
            "tile_size": self.tile_size,
            "mean": [*self.mean],
            "std": [*self.std],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: data[k] for k in ("mpp", "tile_size", "mean", "std") if k in data})

    def differences(
        self, *, mpp: float | None = None, tile_size: int | None = None, mpp_rel_tol: float = 0.01
    ) -> list[str]:
        """What differs between this spec and tiles at ``mpp`` / ``tile_size``.

        Args:
            mpp: µm/px of the tiles (e.g. a tile store's ``mpp`` attribute); ``None`` skips it.
            tile_size: tile side in pixels; ``None`` skips it.
            mpp_rel_tol: relative tolerance of the mpp comparison.

        Returns:
            One readable line per difference; empty when compatible.
        """
        out = []
        if mpp is not None and not math.isclose(self.mpp, float(mpp), rel_tol=mpp_rel_tol):
            out.append(f"mpp: the encoder expects {self.mpp:g} µm/px, the tiles are {mpp:g} µm/px")
        if tile_size is not None and int(tile_size) != self.tile_size:
            out.append(
                f"tile_size: the encoder expects {self.tile_size} px, the tiles are {tile_size} px"
            )
        return out

    def check(
        self, *, mpp: float | None = None, tile_size: int | None = None, source: str = "tile store"
    ) -> None:
        """Raise a ``ValueError`` saying what differs when tiles do not fit this spec.

        Args:
            mpp: µm/px of the tiles.
            tile_size: tile side in pixels.
            source: what the tiles come from, for the message (e.g. ``"tiles.zarr"``).
        """
        diffs = self.differences(mpp=mpp, tile_size=tile_size)
        if diffs:
            raise ValueError(
                f"the encoder does not fit the {source}: {'; '.join(diffs)}. Re-tile at the "
                "encoder's mpp and tile size (histcode tile --mpp … --tile_size …), or use an "
                "encoder trained for these tiles."
            )


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "InputSpec"]
