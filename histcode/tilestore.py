"""The tile store (``tiles.zarr``): tile coordinates per slide, never pixel copies.

Contract (``DESIGN.md``): a zarr v3 group whose root attrs hold the target ``mpp``,
``tile_size``, the parameters used and the histcode version; one group per slide id with
attrs ``path``, ``status`` (``ok`` | ``empty`` | ``failed``), ``error``, ``mpp_level0``,
``tile_size_level0``, ``level``, ``fingerprint``; arrays ``coords`` int64 (N, 2) (level-0
x, y of each tile's top-left corner) and ``tissue`` float32 (N,).

A slide's group is written under a hidden staging name inside the store and renamed into
place when complete, so a partial write never looks finished: a reader sees either the whole
slide or nothing. A lock file keeps two runs from writing one store at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from histcode import __version__
from histcode.slide import check_slide_id

FINAL_STATUSES = ("ok", "empty", "failed")
STAGING_PREFIX = ".partial-"
#: root attrs that must match for a run to add slides to an existing store
GEOMETRY_KEYS = ("mpp", "tile_size")


class StoreLockedError(RuntimeError):
    """Another process is writing this store."""


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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """zarr warns about non-zarr entries (our summary.json, staging dirs); they are ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component.*")
        yield


class TileStore:
    """Read and write a tile store.

    Args:
        path: the ``tiles.zarr`` folder.

    Example:
        >>> store = TileStore("tiles.zarr")  # doctest: +SKIP
        >>> for tiles in store.iter_slides(status="ok"):  # doctest: +SKIP
        ...     print(tiles.slide_id, len(tiles))
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    # -- root -----------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (mpp, tile_size, parameters, histcode version)."""
        if not self.exists():
            raise FileNotFoundError(
                f"{self.path}: not a tile store (no zarr.json). Make one with `histcode tile "
                f"--slides … --out {self.path}`."
            )
        return dict(zarr.open_group(self.path, mode="r").attrs)

    def initialise(
        self,
        params: dict[str, Any],
        must_match: Sequence[str] = GEOMETRY_KEYS,
        overwrite_params: bool = False,
    ) -> None:
        """Create the store, or check that an existing one was made with the same settings.

        Args:
            params: parameters of this run; must include ``mpp`` and ``tile_size``.
            must_match: keys that decide the tiles; an existing store must agree on them.
            overwrite_params: replace the stored parameters (with ``--overwrite``).

        Raises:
            ValueError: the existing store was made with other settings; says which.
        """
        if self.exists() and not overwrite_params:
            old = self.attrs.get("params", {})
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
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(
                f"{self.path} exists and is not a folder; choose another --out"
            )
        group = zarr.open_group(self.path, mode="a")
        group.attrs.update(
            {
                "kind": "histcode.tiles",
                "format_version": 1,
                "histcode_version": __version__,
                **{k: params[k] for k in GEOMETRY_KEYS},
                "params": params,
            }
        )

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the store for a writing run.

        Raises:
            StoreLockedError: another process holds it.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise StoreLockedError(
                    f"{self.path} is being written by another run (pid {holder}). Wait for it "
                    "to finish, or write to another --out."
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._clean_staging()
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _clean_staging(self) -> None:
        """Remove staging folders left by an interrupted run (we hold the lock)."""
        for entry in self.path.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(entry, ignore_errors=True)

    def fingerprint(self) -> str:
        """A content hash of the store: geometry plus every slide's id, status and coords.

        Two stores with the same tiles have the same fingerprint wherever they live; it goes
        into registry cards and feature stores as lineage (``tiles:sha256:<hex>``).
        """
        digest = hashlib.sha256()
        attrs = self.attrs
        digest.update(json.dumps({k: attrs[k] for k in GEOMETRY_KEYS}, sort_keys=True).encode())
        for tiles in self.iter_slides():
            digest.update(f"{tiles.slide_id}\0{tiles.status}\0".encode())
            digest.update(np.ascontiguousarray(tiles.coords, dtype="<i8").tobytes())
        return "tiles:sha256:" + digest.hexdigest()

    # -- slides ---------------------------------------------------------------------------
    def slide_ids(self) -> list[str]:
        """Ids of all complete slide groups (any status), sorted."""
        if not self.exists():
            return []
        with _quiet():
            keys = zarr.open_group(self.path, mode="r").group_keys()
            return sorted(k for k in keys if not k.startswith("."))

    def status(self, slide_id: str) -> str | None:
        """Final status of a slide, or None if it is absent (or unreadable)."""
        group_json = self.path / slide_id / "zarr.json"
        if not group_json.is_file():
            return None
        try:
            status = zarr.open_group(self.path / slide_id, mode="r").attrs.get("status")
        except Exception:  # a damaged group is treated as absent and redone
            return None
        return status if status in FINAL_STATUSES else None

    def read(self, slide_id: str) -> SlideTiles:
        """One slide's tiles.

        Raises:
            KeyError: no such slide; the message lists what the store holds.
        """
        check_slide_id(slide_id, self.path)
        if self.status(slide_id) is None:
            known = self.slide_ids()
            shown = ", ".join(known[:10]) + (" …" if len(known) > 10 else "")
            raise KeyError(f"{self.path} has no slide {slide_id!r} (it holds: {shown or 'none'})")
        group = zarr.open_group(self.path / slide_id, mode="r")
        return SlideTiles(
            slide_id,
            dict(group.attrs),
            np.asarray(group["coords"][:]),
            np.asarray(group["tissue"][:]),
        )

    def iter_slides(self, status: str | None = None) -> Iterator[SlideTiles]:
        """All complete slides, optionally only those with ``status``."""
        for sid in self.slide_ids():
            tiles = self.read(sid)
            if status is None or tiles.status == status:
                yield tiles

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
        check_slide_id(slide_id, self.path)
        if attrs.get("status") not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {FINAL_STATUSES}, got {attrs.get('status')!r}")
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        tissue = np.asarray(tissue, dtype=np.float32).reshape(-1)
        if len(coords) != len(tissue):
            raise ValueError(f"{len(coords)} coords but {len(tissue)} tissue fractions")
        staging = self.path / f"{STAGING_PREFIX}{slide_id}-{uuid.uuid4().hex[:8]}"
        group = zarr.open_group(staging, mode="w")
        group.attrs.update(attrs)
        chunk = max(1, min(len(coords), 65536))
        group.create_array("coords", data=coords, chunks=(chunk, 2))
        group.create_array("tissue", data=tissue, chunks=(chunk,))
        final = self.path / slide_id
        if final.exists():  # replace: move the old one aside first, then swap in
            trash = self.path / f"{STAGING_PREFIX}old-{slide_id}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, final)
