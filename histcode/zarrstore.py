"""What the tile and feature stores share: a zarr v3 group with one group per slide.

Each slide's group is written under a hidden staging name inside the store and renamed into
place when complete, so a partial write never looks finished: a reader sees the whole slide
or nothing. A writing run holds a lock file so that two runs cannot write one store (or one
shard of it) at once: the second is refused with a message (exit status 2). Staging folders
left by an interrupted (even ``kill -9``-ed) run are removed by the next whole-store run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from histcode.errors import NotFoundError, OutputBusyError
from histcode.slide import check_slide_id

FINAL_STATUSES = ("ok", "empty", "failed")
STAGING_PREFIX = ".partial-"


def write_coords(group: zarr.Group, coords: np.ndarray) -> np.ndarray:
    """Write a slide's ``coords`` (N, 2) int64 level-0 corners, the array both stores share.

    Returns:
        The coordinates as written.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    group.create_array("coords", data=coords, chunks=(max(1, min(len(coords), 65536)), 2))
    return coords


class StoreLockedError(OutputBusyError):
    """Another process is writing this store (the CLI exits 2 with the message)."""


class SlideStore:
    """A zarr v3 folder holding one group per slide, each with a final ``status`` attribute.

    Args:
        path: the store folder.
    """

    #: value of the root attribute ``kind``; a subclass names its kind of store
    kind = "histcode.store"
    #: what makes this kind of store, for error messages
    made_by = "histcode"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes."""
        if not self.exists():
            raise FileNotFoundError(
                f"{self.path}: not a {self.kind} store (no zarr.json). Make one with "
                f"`{self.made_by}`."
            )
        attrs = dict(zarr.open_group(self.path, mode="r").attrs)
        if attrs.get("kind") != self.kind:
            raise ValueError(
                f"{self.path} is a {attrs.get('kind', 'foreign zarr')!r} store, not a "
                f"{self.kind!r} store (made by `{self.made_by}`)"
            )
        return attrs

    def create(self, attrs: dict[str, Any]) -> None:
        """Create the root group with ``attrs`` (plus ``kind``), replacing its attributes."""
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(
                f"{self.path} exists and is not a folder; choose another --out"
            )
        group = zarr.open_group(self.path, mode="a")
        group.attrs.update({"kind": self.kind, **attrs})

    @contextlib.contextmanager
    def lock(self, part: str = "") -> Iterator[None]:
        """Hold the lock of a writing run: the whole store, or one ``part`` of it (a shard).

        A whole-store run (``part`` empty) holds the store's lock exclusively and removes the
        staging folders that interrupted runs left. A part run (``--shard i/n``) holds the
        store's lock shared, so that several parts write at once, and its own part's lock
        exclusively; it leaves staging folders alone (another part may be writing them).
        So two whole-store runs, two runs of one part, or a whole-store run and a part run
        never write one store at once: the second is refused.

        Raises:
            StoreLockedError: another run holds a conflicting lock; says how to proceed.
        """
        self._make_folder()
        with contextlib.ExitStack() as stack:
            store_fd = stack.enter_context(self._flock(".lock", exclusive=not part))
            if part:
                stack.enter_context(self._flock(f".lock-{part}", exclusive=True))
            else:
                for entry in self.path.glob(f"{STAGING_PREFIX}*"):
                    shutil.rmtree(entry, ignore_errors=True)
            try:
                yield
            finally:
                if not part:  # a stale pid would name the wrong run in a later refusal
                    os.ftruncate(store_fd, 0)

    @contextlib.contextmanager
    def setup_lock(self) -> Iterator[None]:
        """Wait for, then hold, the lock that serialises creating or checking the root attrs.

        Held only for a moment, so runs starting together (shards on several hosts) take turns
        instead of refusing each other.
        """
        self._make_folder()
        with self._flock(".lock-setup", exclusive=True, wait=True):
            yield

    def _make_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(
                f"{self.path} exists and is not a folder; choose another --out"
            )
        self.path.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _flock(self, name: str, *, exclusive: bool, wait: bool = False) -> Iterator[int]:
        """Hold ``flock`` on the file ``name`` in the store; an exclusive holder writes its pid.

        Raises:
            StoreLockedError: ``wait`` is false and another process holds a conflicting lock.
        """
        fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                who = f"pid {holder}" if holder else "--shard runs"
                raise StoreLockedError(
                    f"{self.path} is being written by another run ({who}). Wait for it to "
                    "finish, or write to another --out."
                ) from None
            if exclusive:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield fd
        finally:
            os.close(fd)  # closing releases the flock

    def slide_ids(self) -> list[str]:
        """Ids of all complete slide groups (any status), sorted.

        Unfinished (staging) and damaged groups are not listed; a rerun redoes them.
        """
        if not self.exists():
            return []
        return sorted(
            p.name
            for p in self.path.iterdir()
            if p.is_dir() and not p.name.startswith(".") and self.status(p.name) is not None
        )

    def read(self, slide_id: str) -> Any:
        """One complete slide's entry; each kind of store defines what it holds."""
        raise NotImplementedError

    def iter_slides(self, status: str | None = None) -> Iterator[Any]:
        """Every complete slide's entry (:meth:`read`), optionally only those with ``status``."""
        for sid in self.slide_ids():
            entry = self.read(sid)
            if status is None or entry.status == status:
                yield entry

    def status(self, slide_id: str) -> str | None:
        """Final status of a slide, or None if it is absent, unfinished or unreadable.

        Raises:
            ValueError: ``slide_id`` could name a path outside the store (``../x``).
        """
        check_slide_id(slide_id, self.path)
        if not (self.path / slide_id / "zarr.json").is_file():
            return None
        try:
            status = zarr.open_group(self.path / slide_id, mode="r").attrs.get("status")
        except Exception:  # a damaged group is treated as absent and redone
            return None
        return status if status in FINAL_STATUSES else None

    def group(self, slide_id: str) -> zarr.Group:
        """A complete slide's group (read only).

        Raises:
            NotFoundError: (a ``KeyError``) no such complete slide; the message lists what the
                store holds.
        """
        check_slide_id(slide_id, self.path)
        if self.status(slide_id) is None:
            known = self.slide_ids()
            shown = ", ".join(known[:10]) + (" …" if len(known) > 10 else "")
            raise NotFoundError(
                f"{self.path} has no slide {slide_id!r} (it holds: {shown or 'none'})"
            )
        return zarr.open_group(self.path / slide_id, mode="r")

    def staging(self, slide_id: str) -> zarr.Group:
        """A new hidden group to write a slide into; :meth:`commit` puts it in place."""
        check_slide_id(slide_id, self.path)
        return zarr.open_group(
            self.path / f"{STAGING_PREFIX}{slide_id}-{uuid.uuid4().hex[:8]}", mode="w"
        )

    def commit(self, staged: zarr.Group, slide_id: str, attrs: dict[str, Any]) -> None:
        """Set the slide's final attributes and rename its staging group into place."""
        if attrs.get("status") not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {FINAL_STATUSES}, got {attrs.get('status')!r}")
        check_slide_id(slide_id, self.path)
        staged.attrs.update(attrs)
        source = Path(str(staged.store.root)) / staged.path
        final = self.path / slide_id
        if final.exists():  # replace: move the old one aside first, then swap in
            trash = self.path / f"{STAGING_PREFIX}old-{slide_id}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(source, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(source, final)
