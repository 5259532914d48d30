"""The checkpoint registry shared by both stages: weights in safetensors, a JSON card beside them.

Layout (a plain directory; local by default, any shared filesystem on a cluster)::

    <root>/<name>/<version>/weights.safetensors   tensors only (safetensors, never a pickle)
    <root>/<name>/<version>/card.json             a :class:`Card`: what the weights are

Versions are the integers 1, 2, 3, … A reference ("ref") is ``name`` or ``name@latest`` (the
highest complete version) or ``name@3``.

Default root: the environment variable ``HISTCODE_REGISTRY`` if set, else ``./registry`` in
the working directory (see :func:`default_root`).

**Atomic versions.** :meth:`Registry.save` writes the weights and the card into a private
staging folder ``<root>/<name>/.staging-<uuid>`` (fsynced), then claims a version by renaming
that folder to ``<root>/<name>/<v>``. ``rename`` of a directory is atomic on POSIX filesystems
and on NFS (it is one server-side operation), and it fails when ``<v>`` already exists as a
non-empty directory; the loser of a race re-reads the highest version and tries the next one.
So many processes saving under one name at once get distinct versions, none is overwritten,
and a half-written checkpoint only ever exists under a staging name, which nothing lists or
loads. A crashed save can leave a ``.staging-*`` folder behind; it is invisible and safe to
delete.

**Integrity.** The card records the sha256 of ``weights.safetensors``; every load hashes the
file and refuses a mismatch (:class:`ChecksumError`, naming the file). Weights are read with
``safetensors`` and cards with ``json``: nothing is ever unpickled from the registry.

**Rebuilding a module.** The card names a builder (``architecture``) and its JSON keyword
``arguments``; :meth:`Registry.load` calls that builder from the
:class:`~histcode.builders.Builders` the caller passes and loads the weights with
``strict=True``. The registry imports no zoo and no stage: a caller that passes none gets the
builders that the package declares for the card's kind in the ``histcode.builders``
entry-point group (``pyproject.toml``: ``encoder`` → the encoder zoo,
:data:`histcode.encoders.encoders`); other kinds need theirs passed (the finetune stage's
``slide_model_builders()`` for ``mil``).

This module imports neither torch nor safetensors at import time, so ``histcode registry list``
starts fast; they are imported when weights are saved or loaded.

Example:
    >>> from histcode.encoders import create_encoder, encoder_card
    >>> registry = Registry("registry")
    >>> encoder = create_encoder("resnet50_trunc")
    >>> ref = registry.save("simclr-r50", encoder, encoder_card(encoder))  # 'simclr-r50@1'
    >>> encoder, card = registry.load("simclr-r50@latest")
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histcode import __version__
from histcode.builders import UnknownNameError
from histcode.inputspec import InputSpec
from histcode.lineage import Parent, as_parents

if TYPE_CHECKING:
    import torch
    from torch import nn

    from histcode.builders import Builders

log = logging.getLogger(__name__)

#: Environment variable naming the default registry root.
REGISTRY_ENV = "HISTCODE_REGISTRY"
#: File names inside a version folder.
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
#: Kinds of checkpoints the registry holds.
KINDS = ("encoder", "mil")
#: Entry-point group: card kind → the builders that rebuild it when ``Registry.load`` gets none.
BUILDERS_ENTRY_POINT_GROUP = "histcode.builders"
_STAGING_PREFIX = ".staging-"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION_RE = re.compile(r"[1-9][0-9]*")
_MAX_CLAIM_ATTEMPTS = 10_000


class UnknownRefError(UnknownNameError):
    """A ref names no checkpoint; the message lists what exists and the closest matches."""


class CorruptCheckpointError(ValueError):
    """A checkpoint's files are missing or unreadable; the message names the file."""


class ChecksumError(CorruptCheckpointError):
    """The weights file's sha256 differs from the one recorded in its card."""


def declared_builders(kind: str) -> Builders[Any] | None:
    """The builders the installed package declares for cards of ``kind``, if any.

    Read from the ``histcode.builders`` entry points (``pyproject.toml``), so that the
    registry names no module: ``encoder`` → :data:`histcode.encoders.encoders`.
    """
    for entry in entry_points(group=BUILDERS_ENTRY_POINT_GROUP, name=kind):
        return entry.load()
    return None


def default_root() -> Path:
    """The default registry root: ``$HISTCODE_REGISTRY`` if set, else ``./registry``."""
    env = os.environ.get(REGISTRY_ENV, "").strip()
    return Path(env).expanduser() if env else Path.cwd() / "registry"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid checkpoint name, else raise a ``ValueError``.

    A name is 1–128 characters: letters, digits, ``-``, ``_`` and ``.``, starting with a
    letter or digit, without ``..``.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit, with no '/', '@' or '..' "
            "(e.g. 'simclr-resnet50' or 'tumour_abmil.v2')"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split a ref into ``(name, version)``; version ``None`` means the latest.

    Accepts ``name``, ``name@latest`` and ``name@3``.

    Raises:
        ValueError: the ref is malformed; the message says the accepted forms.
    """
    if not isinstance(ref, str):
        raise ValueError(f"a checkpoint ref must be a string like 'name@3', got {ref!r}")
    name, sep, tag = ref.strip().partition("@")
    check_name(name)
    if not sep or tag == "latest":
        return name, None
    if _VERSION_RE.fullmatch(tag):
        return name, int(tag)
    raise ValueError(
        f"invalid checkpoint ref {ref!r}: the part after '@' must be 'latest' or a version "
        f"number 1, 2, 3, … (e.g. '{name}@latest' or '{name}@1')"
    )


@dataclass
class Card:
    """What a checkpoint is: stored as ``card.json`` next to its weights.

    The caller fills ``kind`` … ``extra``; :meth:`Registry.save` fills ``name``, ``version``,
    ``sha256``, ``created`` and ``histcode_version``.

    Attributes:
        kind: ``"encoder"`` or ``"mil"``.
        architecture: name of the builder that makes the module (e.g. ``"resnet50_trunc"``).
        arguments: JSON-able keyword arguments of that builder.
        input_spec: what the model expects of its input tiles (encoders); ``None`` otherwise.
        metrics: final metrics of the run that made it (JSON-able).
        parents: the lineage as strings (``"name@3#sha256=…"``, ``"tiles:sha256:…"``), the
            form cards had before ``lineage``; filled from ``lineage`` when not given. Given
            alone (strings or :class:`~histcode.lineage.Parent`), it fills ``lineage``.
        extra: anything else (JSON-able).
        name: checkpoint name.
        version: version number (1, 2, 3, …).
        sha256: hex sha256 of the bytes of ``weights.safetensors``.
        created: ISO-8601 UTC time of saving.
        histcode_version: version of histcode that saved it.
        lineage: what the model was made from, structured (:class:`~histcode.lineage.Parent`:
            kind, ref, sha256, attrs); read from ``parents`` for cards written before it.
    """

    kind: str
    architecture: str
    arguments: dict[str, Any] = field(default_factory=dict)
    input_spec: InputSpec | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    parents: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    version: int = 0
    sha256: str = ""
    created: str = ""
    histcode_version: str = ""
    lineage: list[Parent] = field(default_factory=list)

    def __post_init__(self) -> None:
        lineage = as_parents(self.lineage or self.parents)
        if self.parents:
            self.parents = [str(p) for p in self.parents]
        else:
            self.parents = [p.legacy() for p in lineage]
        self.lineage = lineage

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict, identity fields first."""
        data = asdict(self)
        data["input_spec"] = None if self.input_spec is None else self.input_spec.to_dict()
        data["lineage"] = [p.to_dict() for p in self.lineage]
        order = ("name", "version", "kind", "architecture", "arguments", "input_spec")
        first = {k: data.pop(k) for k in order}
        rest = {k: v for k, v in data.items() if k != "lineage"}
        at = list(rest).index("parents") + 1
        items = list(rest.items())
        return {**first, **dict(items[:at]), "lineage": data["lineage"], **dict(items[at:])}

    def to_json(self) -> str:
        """The card as indented JSON text.

        Raises:
            ValueError: a field holds something JSON cannot represent.
        """
        try:
            return json.dumps(self.to_dict(), indent=2) + "\n"
        except TypeError as err:
            raise ValueError(
                f"the card of {self.name or 'a checkpoint'} is not JSON-able ({err}); "
                "arguments, metrics, parents and extra may hold only str, int, float, bool, "
                "None, lists and dicts (convert tensors with .item() or .tolist())"
            ) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Card:
        """Inverse of :meth:`to_dict`; unknown keys (from newer versions) are ignored."""
        missing = [k for k in ("kind", "architecture") if k not in data]
        if missing:
            raise ValueError(f"a card needs {', '.join(missing)}; got keys {sorted(data)}")
        known = {f for f in cls.__dataclass_fields__ if f in data}
        values = {k: data[k] for k in known}
        spec = values.get("input_spec")
        values["input_spec"] = None if spec is None else InputSpec.from_dict(spec)
        return cls(**values)


@dataclass(frozen=True)
class ResolvedRef:
    """A ref resolved to one existing checkpoint.

    Attributes:
        name: checkpoint name.
        version: version number.
        path: the version folder holding ``weights.safetensors`` and ``card.json``.
    """

    name: str
    version: int
    path: Path

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def weights_path(self) -> Path:
        """Path of ``weights.safetensors``."""
        return self.path / WEIGHTS_FILE

    @property
    def card_path(self) -> Path:
        """Path of ``card.json``."""
        return self.path / CARD_FILE


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :meth:`Registry.verify`.

    Attributes:
        ref: the checkpoint, ``name@version``.
        ok: whether the card reads and the weights match the recorded sha256.
        reason: why it failed (empty when ok).
        path: the version folder.
        expected_sha256: sha256 recorded in the card (empty if the card is unreadable).
        actual_sha256: sha256 of the weights file (empty if it is missing).
    """

    ref: str
    ok: bool
    reason: str
    path: str
    expected_sha256: str = ""
    actual_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensors_for_saving(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage are cloned (safetensors)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(ptr)
        out[key] = tensor
    return out


class Registry:
    """A directory of versioned checkpoints (see the module docstring for layout and safety).

    Args:
        root: registry folder; default ``$HISTCODE_REGISTRY``, else ``./registry``. Nothing is
            created until the first :meth:`save`.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    def check_root(self) -> None:
        """Refuse a root that cannot hold checkpoints; call it before a long run that saves.

        Raises:
            NotADirectoryError: the root, or a folder on its path, is a file.
        """
        for folder in (self.root, *self.root.parents):
            if folder.exists():
                if not folder.is_dir():
                    raise NotADirectoryError(
                        f"registry root {self.root}: {folder} is a file, not a folder; pass "
                        f"another registry folder (--registry or ${REGISTRY_ENV})"
                    )
                return

    # -- reading -------------------------------------------------------------------------------

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending (empty if there are none)."""
        folder = self.root / check_name(name)
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(e.name) for e in entries if _VERSION_RE.fullmatch(e.name) and e.is_dir())

    def names(self) -> list[str]:
        """Names with at least one complete version, sorted."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise NotADirectoryError(
                f"registry root {self.root} is a file; pass a folder (--root or ${REGISTRY_ENV})"
            ) from None
        names = (e.name for e in entries if e.is_dir() and _NAME_RE.fullmatch(e.name))
        return sorted(n for n in names if ".." not in n and self.versions(n))

    def resolve(self, ref: str) -> ResolvedRef:
        """Resolve ``name``, ``name@latest`` or ``name@N`` to one existing checkpoint.

        Raises:
            ValueError: the ref is malformed.
            UnknownRefError: no such name or version; the message lists what exists.
        """
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            names = self.names()
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            known = ", ".join(names) if names else "none (the registry is empty)"
            raise UnknownRefError(
                f"no checkpoint named {name!r} in registry {self.root}.{hint} Known: {known}. "
                f"Check the name, or the registry root (--root or ${REGISTRY_ENV})."
            )
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise UnknownRefError(
                f"{name!r} has no version {version} in registry {self.root}; it has versions "
                f"{', '.join(map(str, versions))} (use '{name}@latest' for {versions[-1]})."
            )
        return ResolvedRef(name, version, self.root / name / str(version))

    def card(self, ref: str) -> Card:
        """The card of ``ref`` (reads ``card.json`` only, no weights).

        Raises:
            UnknownRefError: no such checkpoint.
            CorruptCheckpointError: ``card.json`` is missing or unreadable.
        """
        return self._read_card(self.resolve(ref))

    def _read_card(self, resolved: ResolvedRef) -> Card:
        path = resolved.card_path
        try:
            card = Card.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{resolved}: {path} is missing; restore it from a backup or delete the folder "
                f"{resolved.path}"
            ) from None
        except (ValueError, TypeError) as err:
            raise CorruptCheckpointError(
                f"{resolved}: {path} is not a valid card ({err}); restore it from a backup or "
                f"delete the folder {resolved.path}"
            ) from None
        if (card.name, card.version) != (resolved.name, resolved.version):
            raise CorruptCheckpointError(
                f"{resolved}: {path} describes {card.name}@{card.version}, not {resolved}; the "
                "folder was moved or copied by hand. Put it back, or save the model again."
            )
        return card

    def list(self, name: str | None = None) -> list[Card]:
        """Cards of every complete checkpoint (of ``name`` only, if given), by name and version.

        Checkpoints whose card is unreadable are skipped with a warning (see :meth:`verify`).
        """
        cards = []
        for n in [check_name(name)] if name is not None else self.names():
            for v in self.versions(n):
                try:
                    cards.append(self._read_card(ResolvedRef(n, v, self.root / n / str(v))))
                except CorruptCheckpointError as err:
                    log.warning("skipping %s@%d: %s", n, v, err)
        return cards

    def verify(self, ref: str) -> VerifyReport:
        """Check that ``ref``'s card reads and its weights match the recorded sha256.

        Integrity problems are reported, not raised.

        Raises:
            ValueError: the ref is malformed.
            UnknownRefError: no such checkpoint.
        """
        resolved = self.resolve(ref)
        report = {"ref": str(resolved), "path": str(resolved.path)}
        try:
            card = self._read_card(resolved)
        except CorruptCheckpointError as err:
            return VerifyReport(ok=False, reason=str(err), **report)
        weights = resolved.weights_path
        try:
            actual = _sha256_file(weights)
        except OSError as err:
            reason = f"cannot read {weights} ({err.strerror or err}); restore it from a backup"
            return VerifyReport(ok=False, reason=reason, expected_sha256=card.sha256, **report)
        hashes = {"expected_sha256": card.sha256, "actual_sha256": actual}
        if actual != card.sha256:
            reason = _checksum_message(weights, card.sha256, actual)
            return VerifyReport(ok=False, reason=reason, **hashes, **report)
        return VerifyReport(ok=True, reason="", **hashes, **report)

    def load_state(self, ref: str) -> tuple[dict[str, torch.Tensor], Card]:
        """Read the weights of ``ref`` (sha256 checked) for callers that build the module.

        Returns:
            ``(state_dict, card)``: CPU tensors by parameter name, and the card.

        Raises:
            UnknownRefError: no such checkpoint.
            ChecksumError: the weights do not match the card's sha256 (nothing is loaded).
            CorruptCheckpointError: a file is missing or unreadable.
        """
        from safetensors.torch import load as load_safetensors

        resolved = self.resolve(ref)
        card = self._read_card(resolved)
        weights = resolved.weights_path
        try:
            data = weights.read_bytes()
        except OSError as err:
            raise CorruptCheckpointError(
                f"{resolved}: cannot read {weights} ({err.strerror or err}); restore it from a "
                "backup or save the model again"
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != card.sha256:
            message = _checksum_message(weights, card.sha256, actual)
            raise ChecksumError(f"refusing to load {resolved}: {message}")
        try:
            state = load_safetensors(data)
        except Exception as err:  # safetensors raises its own error types
            raise CorruptCheckpointError(
                f"{resolved}: {weights} is not a valid safetensors file ({err}); restore it "
                "from a backup or save the model again"
            ) from None
        return state, card

    def load(self, ref: str, builders: Builders[Any] | None = None) -> tuple[nn.Module, Card]:
        """Rebuild the module of ``ref`` from its card and load its weights (sha256 checked).

        The card's ``architecture`` and ``arguments`` name a builder in ``builders``; its state
        dict is loaded with ``strict=True``. The module is returned on the CPU in eval mode.

        Args:
            ref: ``name``, ``name@latest`` or ``name@N``.
            builders: where the card's ``architecture`` is registered; default: the builders
                declared for the card's kind (:func:`declared_builders`: the encoder zoo for
                ``encoder``). Other kinds need the builders that made them (e.g. the finetune
                stage's ``slide_model_builders()``).

        Returns:
            ``(module, card)``. An encoder gets the card's ``input_spec``.

        Raises:
            UnknownRefError: no such checkpoint.
            ChecksumError: the weights do not match the card's sha256.
            ValueError: no builders for this kind, or the weights do not fit the architecture.
        """
        state, card = self.load_state(ref)
        if builders is None:
            builders = declared_builders(card.kind)
            if builders is None:
                raise ValueError(
                    f"{card.ref} is a {card.kind!r} checkpoint (architecture "
                    f"{card.architecture!r}); pass builders= the Builders that made it, or "
                    "use Registry.load_state(ref) and build the module yourself"
                )
        module = builders.create(card.architecture, **card.arguments)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"the weights of {card.ref} do not fit {builders.kind} {card.architecture!r} "
                f"built with {card.arguments}: {err}"
            ) from None
        if card.input_spec is not None and hasattr(module, "input_spec"):
            module.input_spec = card.input_spec
        return module.eval(), card

    # -- writing -------------------------------------------------------------------------------

    def save(self, name: str, module: nn.Module | Mapping[str, torch.Tensor], card: Card) -> str:
        """Save ``module``'s weights and ``card`` as the next version of ``name``, atomically.

        Safe with many concurrent processes on one shared filesystem (see the module
        docstring). The given card is not modified; the stored one gets ``name``, ``version``,
        ``sha256``, ``created`` and ``histcode_version``.

        Args:
            name: checkpoint name (letters, digits, ``-_.``).
            module: the module, or its state dict.
            card: what it is; ``kind`` and ``architecture`` are required.

        Returns:
            The new ref, ``name@version``.

        Raises:
            ValueError: invalid name, kind or architecture, or a card that is not JSON-able.
        """
        from safetensors.torch import save_file

        check_name(name)
        if card.kind not in KINDS:
            raise ValueError(f"card.kind must be one of {', '.join(KINDS)}, got {card.kind!r}")
        if not card.architecture:
            raise ValueError(
                "card.architecture is empty: name the builder that rebuilds the module (e.g. "
                "'resnet50_trunc'), or make the card with histcode.encoders.encoder_card(encoder)"
            )
        replace(card, name=name, version=1).to_json()  # fail before writing anything
        state = module.state_dict() if hasattr(module, "state_dict") else module
        tensors = _tensors_for_saving(state)

        self.check_root()
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            weights = staging / WEIGHTS_FILE
            save_file(tensors, str(weights), metadata={"format": "pt"})
            _fsync_file(weights)
            sha256 = _sha256_file(weights)
            created = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            version = self._next_version(name)
            for _ in range(_MAX_CLAIM_ATTEMPTS):
                stored = replace(
                    card,
                    name=name,
                    version=version,
                    sha256=sha256,
                    created=created,
                    histcode_version=__version__,
                )
                (staging / CARD_FILE).write_text(stored.to_json(), encoding="utf-8")
                _fsync_file(staging / CARD_FILE)
                _fsync_dir(staging)
                try:
                    os.rename(staging, folder / str(version))
                except OSError as err:
                    if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    version = max(version + 1, self._next_version(name))
                    continue
                _fsync_dir(folder)
                return f"{name}@{version}"
            raise RuntimeError(
                f"could not claim a version of {name!r} after {_MAX_CLAIM_ATTEMPTS} attempts"
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _next_version(self, name: str) -> int:
        versions = self.versions(name)
        return versions[-1] + 1 if versions else 1


def _checksum_message(weights: Path, expected: str, actual: str) -> str:
    return (
        f"checksum mismatch for {weights}: card.json records sha256 {expected}, the file has "
        f"{actual}. The weights were modified or corrupted after saving; restore the file from "
        "a backup, or save the model again as a new version."
    )


__all__ = [
    "BUILDERS_ENTRY_POINT_GROUP",
    "CARD_FILE",
    "KINDS",
    "REGISTRY_ENV",
    "WEIGHTS_FILE",
    "Card",
    "ChecksumError",
    "CorruptCheckpointError",
    "InputSpec",
    "Registry",
    "ResolvedRef",
    "UnknownRefError",
    "VerifyReport",
    "check_name",
    "declared_builders",
    "default_root",
    "parse_ref",
]
