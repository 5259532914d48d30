"""The feature store (``features.zarr``): tile embeddings per slide.

The on-disk contract, which ``histcode finetune`` and ``histcode heatmap`` rely on
(``ARCHITECTURE.md``): a zarr v3 group whose root attrs hold the encoder ref and its
sha256, ``embed_dim``, the tile store it came from (path and fingerprint), ``mpp`` and
``tile_size``; one group per slide with ``features`` (N, D) float16 or float32 and ``coords``
int64 (N, 2) (level-0 top-left corners, as in the tile store), and attrs ``status``
(``ok`` | ``empty`` | ``failed``), ``error``, ``path``, ``n_tiles``.

Features are streamed to zarr a chunk of rows at a time, so memory stays flat whatever the
slide size. Slides are written atomically (:mod:`histcode.zarrstore`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from histcode import __version__
from histcode.zarrstore import SlideStore, write_coords

#: root attrs that an existing store must share with a run that adds slides to it
IDENTITY_KEYS = ("encoder_sha256", "tiles_fingerprint", "dtype", "embed_dim")


@dataclass
class SlideFeatures:
    """One slide's embeddings.

    Attributes:
        slide_id: the slide's id.
        attrs: group attributes (status, error, path, n_tiles).
        features: (N, D) float16 or float32.
        coords: (N, 2) int64 level-0 top-left corners.
    """

    slide_id: str
    attrs: dict[str, Any]
    features: np.ndarray
    coords: np.ndarray

    @property
    def status(self) -> str:
        return self.attrs["status"]

    def __len__(self) -> int:
        return len(self.coords)


class FeatureWriter:
    """Streams one slide's features into a staging group, a chunk of rows at a time.

    Args:
        group: the staging group (from :meth:`FeatureStore.staging`).
        n: number of tiles (rows).
        dim: embedding size ``D``.
        dtype: ``float16`` or ``float32``.
        chunk_rows: rows per zarr chunk (and per write).
    """

    def __init__(self, group: zarr.Group, n: int, dim: int, dtype: str, chunk_rows: int) -> None:
        self.group = group
        self.chunk_rows = max(1, min(chunk_rows, max(n, 1)))
        self.array = group.create_array(
            "features", shape=(n, dim), dtype=dtype, chunks=(self.chunk_rows, dim), fill_value=0
        )
        self.n = n
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.written = 0

    def append(self, rows: np.ndarray) -> None:
        """Add the next rows, (k, D); written whenever a whole chunk is buffered."""
        self._buffer.append(rows)
        self._buffered += len(rows)
        while self._buffered >= self.chunk_rows:
            self._flush(self.chunk_rows)

    def _flush(self, count: int) -> None:
        block = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        head, rest = block[:count], block[count:]
        self.array[self.written : self.written + count] = head
        self.written += count
        self._buffer = [rest] if len(rest) else []
        self._buffered = len(rest)

    def close(self) -> None:
        """Write what is left; checks that every row was written."""
        if self._buffered:
            self._flush(self._buffered)
        if self.written != self.n:
            raise RuntimeError(f"wrote {self.written} feature rows for {self.n} tiles")


class FeatureStore(SlideStore):
    """Read and write a feature store.

    Args:
        path: the ``features.zarr`` folder.
    """

    kind = "histcode.features"
    made_by = "histcode embed --encoder REF --tiles tiles.zarr --out features.zarr"

    def initialise(self, attrs: dict[str, Any], overwrite: bool = False) -> None:
        """Create the store, or check that an existing one holds the same kind of features.

        Raises:
            ValueError: the store was made by another encoder, from other tiles, or with
                another dtype; says which and how to fix.
        """
        if self.exists() and not overwrite:
            old = self.attrs
            diff = [k for k in IDENTITY_KEYS if old.get(k) != attrs.get(k)]
            if diff:
                said = "; ".join(
                    f"{k}: {old.get(k)!r} in the store, {attrs.get(k)!r} now" for k in diff
                )
                raise ValueError(
                    f"{self.path} holds other features ({said}; its encoder is "
                    f"{old.get('encoder_ref')!r}). Use another --out, or --overwrite to "
                    "replace them."
                )
            return
        self.create({"format_version": 1, "histcode_version": __version__, **attrs})

    def read(self, slide_id: str) -> SlideFeatures:
        """One slide's features (loaded into memory)."""
        group = self.group(slide_id)
        return SlideFeatures(
            slide_id,
            dict(group.attrs),
            np.asarray(group["features"][:]),
            np.asarray(group["coords"][:]),
        )

    def writer(
        self, slide_id: str, coords: np.ndarray, dim: int, dtype: str, chunk_rows: int = 4096
    ) -> FeatureWriter:
        """Start writing a slide: a staging group with its coords and an empty features array."""
        group = self.staging(slide_id)
        coords = write_coords(group, coords)
        return FeatureWriter(group, len(coords), dim, dtype, chunk_rows)

    def write_empty(self, slide_id: str, dim: int, dtype: str, attrs: dict[str, Any]) -> None:
        """Record a slide without tiles (``empty``) or that could not be embedded (``failed``)."""
        w = self.writer(slide_id, np.zeros((0, 2), np.int64), dim, dtype)
        w.close()
        self.commit(w.group, slide_id, {**attrs, "n_tiles": 0})
