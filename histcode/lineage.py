"""Lineage of a checkpoint: what it was made from, one structured :class:`Parent` per source.

A registry card lists its parents in ``lineage`` (card.json: a list of objects)::

    {"kind": "tiles", "ref": "/data/tiles.zarr", "sha256": "<content hash of the store>"}
    {"kind": "encoder", "ref": "simclr-r50@3", "sha256": "<sha256 of its weights>"}
    {"kind": "features", "ref": "/data/features.zarr", "sha256": "",
     "attrs": {"encoder_sha256": "<…>", "tiles_fingerprint": "tiles:sha256:<…>"}}
    {"kind": "file", "ref": "/weights/imagenet.pth", "sha256": "<sha256 of the file>"}

Kinds: ``encoder`` and ``mil`` (a checkpoint: a registry ref, ``registry:name@3``, or an
encoder of the zoo, ``zoo:resnet18#random-seed=0``), ``tiles`` (a tile store, by content
hash), ``features`` (a feature store; ``attrs`` say which encoder and tiles made it),
``file`` (local weights a model was initialised from), ``unknown`` (an old string that says
no more). Readers compare fields (``parent.kind == "features" and
parent.attrs["encoder_sha256"] == …``), never substrings.

Cards written before lineage was structured have only ``parents``, a list of strings such as
``"simclr-r50@3#sha256=…"``, ``"tiles:sha256:…"``, ``"file:/w.pth#sha256=…"`` and
``"features:/f.zarr#encoder_sha256=…#tiles_fingerprint=…"``: :func:`parse_parent` reads those
(the only place that parses them), so existing registries still load. New cards keep writing
``parents`` too — each parent as that string (:meth:`Parent.legacy`) — for older histcode
versions and for people reading ``histcode registry show``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

_SHA = "#sha256="
_TILES = "tiles:sha256:"


@dataclass(frozen=True)
class Parent:
    """One source a checkpoint was made from.

    Attributes:
        kind: ``encoder`` | ``mil`` | ``tiles`` | ``features`` | ``file`` | ``unknown``.
        ref: a registry ref (``name@3``, or an embedding's ``registry:name@3`` /
            ``zoo:…``), a store or file path; for ``unknown``, the old string itself.
        sha256: hex sha256 of the parent's weights or file, or a tile store's content hash;
            ``""`` when it has none.
        attrs: further string facts (a feature store's ``encoder_sha256`` and
            ``tiles_fingerprint``).
    """

    kind: str
    ref: str
    sha256: str = ""
    attrs: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``attrs`` only when there are some)."""
        out: dict[str, Any] = {"kind": self.kind, "ref": self.ref, "sha256": self.sha256}
        if self.attrs:
            out["attrs"] = dict(self.attrs)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Parent:
        """Inverse of :meth:`to_dict`."""
        attrs = {str(k): str(v) for k, v in dict(data.get("attrs") or {}).items()}
        return cls(str(data["kind"]), str(data["ref"]), str(data.get("sha256") or ""), attrs)

    def legacy(self) -> str:
        """The parent as the string cards held before lineage was structured."""
        if self.kind == "tiles":
            return f"{_TILES}{self.sha256}"
        if self.kind == "features":
            return "#".join([f"features:{self.ref}", *(f"{k}={v}" for k, v in self.attrs.items())])
        if self.kind == "unknown":
            return self.ref
        ref = f"file:{self.ref}" if self.kind == "file" else self.ref
        return f"{ref}{_SHA}{self.sha256}" if self.sha256 else ref

    def __str__(self) -> str:
        return self.legacy()


def parse_parent(text: str) -> Parent:
    """Read one parent string of a card written before lineage was structured.

    Args:
        text: e.g. ``"simclr-r50@3#sha256=ab…"``, ``"tiles:sha256:cd…"``,
            ``"file:/w.pth#sha256=ef…"``, ``"features:/f.zarr#encoder_sha256=…#…"``.

    Returns:
        The parent; a string of no known form is ``Parent("unknown", text)``, and
        ``parse_parent(text).legacy() == text`` for every string these forms produce.
    """
    if text.startswith(_TILES):
        return Parent("tiles", "", text.removeprefix(_TILES))
    if text.startswith("features:"):
        path, *facts = text.removeprefix("features:").split("#")
        pairs = [f.split("=", 1) for f in facts]
        if all(len(p) == 2 for p in pairs):
            return Parent("features", path, "", {k: v for k, v in pairs})
        return Parent("unknown", text)
    ref, sep, sha = text.rpartition(_SHA)
    if not sep or not sha:
        return Parent("unknown", text)
    if ref.startswith("file:"):
        return Parent("file", ref.removeprefix("file:"), sha)
    return Parent("encoder", ref, sha)  # every "<ref>#sha256=" parent so far was an encoder


def tiles_parent(path: str, fingerprint: str) -> Parent:
    """A tile store as a parent: its path and content hash.

    Args:
        path: the store's path.
        fingerprint: :meth:`histcode.tilestore.TileStore.fingerprint`, ``tiles:sha256:<hex>``.
    """
    return Parent("tiles", path, fingerprint.removeprefix(_TILES))


def as_parents(values: Iterable[Parent | str | Mapping[str, Any]]) -> list[Parent]:
    """Parents from structured values, dicts (card.json) or old strings."""
    out = []
    for value in values:
        if isinstance(value, Parent):
            out.append(value)
        elif isinstance(value, Mapping):
            out.append(Parent.from_dict(value))
        else:
            out.append(parse_parent(str(value)))
    return out


__all__ = ["Parent", "as_parents", "parse_parent", "tiles_parent"]
