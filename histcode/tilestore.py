"""The tile store (``tiles.zarr``): tile coordinates per slide, never pixel copies.

The on-disk contract, which every reader of a tile store relies on (``ARCHITECTURE.md``): a
zarr v3 group whose root attrs hold the target ``mpp``, ``tile_size``, the parameters used
and the histcode version; one group per slide id with attrs ``path``, ``status`` (``ok`` |
``empty`` | ``failed``), ``error``, ``mpp_level0``, ``tile_size_level0``, ``level``,
``fingerprint``; arrays ``coords`` int64 (N, 2) (level-0 x, y of each tile's top-left
corner) and ``tissue`` float32 (N,).

Stain normalisation (``histcode tile --stain_norm macenko``): root attrs ``stain_norm``
(``none`` | ``macenko``; a store without it is ``none``) and ``stain_target`` (the reference
stains tiles are mapped to, :meth:`histcode.stain.StainParams.to_dict`, or null); per slide
``stain_norm`` and ``stain`` (that slide's estimated stains, null unless ``ok`` and
normalised). The tile reader (:mod:`histcode.tilereader`) applies them to every tile.

Slides are written atomically and a lock keeps two runs apart (:mod:`histcode.zarrstore`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histcode import __version__
from histcode.zarrstore import FINAL_STATUSES, SlideStore, StoreLockedError, write_coords

__all__ = ["FINAL_STATUSES", "SlideTiles", "StoreLockedError", "TileStore"]

#: root attrs that every tile store has at top level (the contract)
GEOMETRY_KEYS = ("mpp", "tile_size")


@dataclass
class SlideTiles:
    """One slide's entry in a tile store.

    Attributes:
        slide_id: the group name (file stem of the slide).
        attrs: the group's attributes (path, status, error, mpp_level0, …).
        coords: (N, 2) int64 level-0 x, y of each tile's top-left corner.
        tissue: (N,) float32 tissue fraction of each tile.
    """

    slide_id: str
    attrs: dict[str, Any]
    coords: np.ndarray
    tissue: np.ndarray

    @property
    def status(self) -> str:
        return self.attrs["status"]

    @property
    def path(self) -> Path:
        return Path(self.attrs["path"])

    def __len__(self) -> int:
        return len(self.coords)


class TileStore(SlideStore):
    """Read and write a tile store.

    Args:
        path: the ``tiles.zarr`` folder.

    Example:
        >>> store = TileStore("tiles.zarr")  # doctest: +SKIP
        >>> for tiles in store.iter_slides(status="ok"):  # doctest: +SKIP
        ...     print(tiles.slide_id, len(tiles))
    """

    kind = "histcode.tiles"
    made_by = "histcode tile --slides … --out tiles.zarr"

    def initialise(
        self,
        params: dict[str, Any],
        must_match: Sequence[str] = GEOMETRY_KEYS,
        overwrite_params: bool = False,
        *,
        defaults: dict[str, Any] | None = None,
        root: dict[str, Any] | None = None,
    ) -> None:
        """Create the store, or check that an existing one was made with the same settings.

        Args:
            params: parameters of this run; must include ``mpp`` and ``tile_size``.
            must_match: keys that decide the tiles; an existing store must agree on them.
            overwrite_params: replace the stored parameters (with ``--overwrite``).
            defaults: the value of a ``must_match`` key in a store made before the key
                existed (e.g. ``{"stain_norm": "none"}``).
            root: further root attrs, written when the store is created or its parameters
                replaced (e.g. ``stain_norm``).

        Raises:
            ValueError: the existing store was made with other settings; says which.
        """
        if self.exists() and not overwrite_params:
            old = {**(defaults or {}), **self.attrs.get("params", {})}
            diff = {
                k: (old.get(k), params.get(k)) for k in must_match if old.get(k) != params.get(k)
            }
            if diff:
                said = ", ".join(
                    f"{k}={a} in the store but {b} asked" for k, (a, b) in diff.items()
                )
                raise ValueError(
                    f"{self.path} was made with other settings ({said}). Use another --out, "
                    "or --overwrite to redo every slide with the new settings."
                )
            return
        self.create(
            {
                "format_version": 1,
                "histcode_version": __version__,
                **{k: params[k] for k in GEOMETRY_KEYS},
                "params": params,
                **(root or {}),
            }
        )

    def fingerprint(self) -> str:
        """A content hash of the store: geometry plus every slide's id, status and coords.

        Two stores with the same tiles have the same fingerprint wherever they live; it goes
        into registry cards and feature stores as lineage (``tiles:sha256:<hex>``). A
        stain-normalised store also hashes its ``stain_norm``, ``stain_target`` and each
        slide's ``stain`` (its tiles' pixels depend on them); a store without normalisation
        hashes as it did before the option existed.
        """
        digest = hashlib.sha256()
        attrs = self.attrs
        digest.update(json.dumps({k: attrs[k] for k in GEOMETRY_KEYS}, sort_keys=True).encode())
        stain_norm = attrs.get("stain_norm") or "none"
        stained = stain_norm != "none"
        if stained:
            record = {"stain_norm": stain_norm, "stain_target": attrs.get("stain_target")}
            digest.update(json.dumps(record, sort_keys=True).encode())
        for tiles in self.iter_slides():
            digest.update(f"{tiles.slide_id}\0{tiles.status}\0".encode())
            digest.update(np.ascontiguousarray(tiles.coords, dtype="<i8").tobytes())
            if stained:
                digest.update(json.dumps(tiles.attrs.get("stain"), sort_keys=True).encode())
        return "tiles:sha256:" + digest.hexdigest()

    @property
    def stain_norm(self) -> str:
        """The store's stain normalisation, ``none`` or ``macenko`` (``none`` for a store made
        before the option existed)."""
        return str(self.attrs.get("stain_norm") or "none")

    def read(self, slide_id: str) -> SlideTiles:
        """One slide's tiles.

        Raises:
            NotFoundError: (a ``KeyError``) no such slide; the message lists what the store
                holds.
        """
        group = self.group(slide_id)
        return SlideTiles(
            slide_id,
            dict(group.attrs),
            np.asarray(group["coords"][:]),
            np.asarray(group["tissue"][:]),
        )

    def write(
        self, slide_id: str, attrs: dict[str, Any], coords: np.ndarray, tissue: np.ndarray
    ) -> None:
        """Write (or replace) one slide's group atomically.

        Args:
            slide_id: group name.
            attrs: group attributes; must include ``status``.
            coords: (N, 2) int64 level-0 top-left corners.
            tissue: (N,) float32 tissue fractions.
        """
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        tissue = np.asarray(tissue, dtype=np.float32).reshape(-1)
        if len(coords) != len(tissue):
            raise ValueError(f"{len(coords)} coords but {len(tissue)} tissue fractions")
        group = self.staging(slide_id)
        write_coords(group, coords)
        group.create_array("tissue", data=tissue, chunks=(max(1, min(len(tissue), 65536)),))
        self.commit(group, slide_id, attrs)
