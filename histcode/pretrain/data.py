"""Unlabeled tiles for pretraining, streamed from the slides through a tile store.

:class:`TileDataModule` serves uint8 tile batches ``(batch_size, 3, tile_size, tile_size)``
read straight from the slide files (``histcode.tilereader``): no tile image is ever written
to disk. The training loader shuffles over the tiles of all slides at once (a
``RandomSampler``, which Lightning replaces by a ``DistributedSampler`` under DDP, each
process then reading its own shard), and each worker keeps an LRU cache of open slide
handles. Augmentation happens later, batched on the accelerator
(:mod:`histcode.pretrain.augment`).
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from histcode.tilereader import TileDataset, TileIndex, collate_tiles
from histcode.tilestore import TileStore

log = logging.getLogger(__name__)


class TileDataModule(pl.LightningDataModule):
    """Tiles of a tile store as shuffled uint8 batches for self-supervised pretraining.

    Nothing is read in the constructor; the store's attributes are read on first use
    (:attr:`mpp`, :attr:`tile_size`) and the tile index in :meth:`setup`.

    Args:
        tiles: the tile store (``tiles.zarr``) made by ``histcode tile``.
        batch_size: tiles per batch and per process (each tile gives two views).
        num_workers: loader processes decoding tiles; 0 reads in the main process.
        slide_ids: train on these slides only (default: every ``ok`` slide of the store).
        val_fraction: fraction of the slides held out (whole slides) for a validation loss;
            0 disables validation.
        split_seed: seed of the slide-level train/validation split.
        cache_size: open slide handles kept per worker (LRU).
        pin_memory: pin batches in page-locked memory; default: when training on CUDA.
        prefetch_factor: batches loaded in advance per worker.

    Example:
        >>> data = TileDataModule("tiles.zarr", batch_size=256, num_workers=8)  # doctest: +SKIP
        >>> data.setup("fit")  # doctest: +SKIP
        >>> next(iter(data.train_dataloader())).shape  # doctest: +SKIP
        torch.Size([256, 3, 224, 224])
    """

    def __init__(
        self,
        tiles: str,
        batch_size: int = 256,
        num_workers: int = 8,
        slide_ids: list[str] | None = None,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        cache_size: int = 32,
        pin_memory: bool | None = None,
        prefetch_factor: int = 4,
    ) -> None:
        super().__init__()
        if batch_size < 2:
            raise ValueError(f"data.batch_size={batch_size}: SimCLR needs at least 2 tiles a batch")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers}: expected 0 or more")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction}: expected 0 ≤ value < 1")
        self.tiles = str(tiles)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.slide_ids = list(slide_ids) if slide_ids is not None else None
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.cache_size = cache_size
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self._attrs: dict | None = None
        self._fingerprint: str | None = None
        self.train_set: TileDataset | None = None
        self.val_set: TileDataset | None = None

    # -- what the store holds (read lazily) ------------------------------------------------
    @property
    def store(self) -> TileStore:
        return TileStore(self.tiles)

    def _store_attrs(self) -> dict:
        if self._attrs is None:
            self._attrs = self.store.attrs  # FileNotFoundError says how to make one
        return self._attrs

    @property
    def mpp(self) -> float:
        """µm/px of the tiles (the store's ``mpp``)."""
        return float(self._store_attrs()["mpp"])

    @property
    def tile_size(self) -> int:
        """Tile side in pixels (the store's ``tile_size``)."""
        return int(self._store_attrs()["tile_size"])

    @property
    def stain_norm(self) -> str:
        """The store's stain normalisation (``none`` | ``macenko``): the tiles come out of the
        reader normalised when it is not ``none``; the card records it (``extra.stain_norm``)."""
        return str(self._store_attrs().get("stain_norm") or "none")

    @property
    def fingerprint(self) -> str:
        """The store's content hash, ``tiles:sha256:<hex>`` (lineage for registry cards)."""
        if self._fingerprint is None:
            self._fingerprint = self.store.fingerprint()
        return self._fingerprint

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Index the tiles and split the slides into training and validation."""
        if self.train_set is not None:
            return
        index = TileIndex(self.tiles, self.slide_ids)
        if len(index) == 0:
            raise ValueError(
                f"{self.tiles} holds no tiles of 'ok' slides (see its summary.json); tile some "
                "slides with `histcode tile`, or check --data.slide_ids"
            )
        slide_ids = [g.slide_id for g in index.slides]
        val_ids: list[str] = []
        if self.val_fraction > 0:
            n_val = round(self.val_fraction * len(slide_ids))
            if n_val == 0 or n_val == len(slide_ids):
                raise ValueError(
                    f"data.val_fraction={self.val_fraction} of {len(slide_ids)} slides leaves "
                    "no slide for training or for validation; use more slides or set it to 0"
                )
            order = np.random.default_rng(self.split_seed).permutation(len(slide_ids))
            val_ids = sorted(slide_ids[i] for i in order[:n_val])
        train_ids = [s for s in slide_ids if s not in set(val_ids)]
        train_index = index if not val_ids else TileIndex(self.tiles, train_ids)
        self.train_set = TileDataset(train_index, cache_size=self.cache_size)
        if val_ids:
            self.val_set = TileDataset(TileIndex(self.tiles, val_ids), cache_size=self.cache_size)
        per_step = self.batch_size * self._world_size()
        if len(self.train_set) < per_step:
            raise ValueError(
                f"{self.tiles} has {len(self.train_set)} training tiles, fewer than one step "
                f"({self.batch_size} tiles × {self._world_size()} processes); lower "
                "--data.batch_size or tile more slides"
            )
        log.info(
            "pretraining on %d tiles of %d slides (%d validation tiles of %d slides) from %s",
            len(self.train_set),
            len(train_ids),
            len(self.val_set) if self.val_set is not None else 0,
            len(val_ids),
            self.tiles,
        )

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def _pin(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _loader(self, dataset: TileDataset, shuffle: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            # full batches (when there are enough tiles): NT-Xent and BatchNorm depend on the
            # batch size, and equal batches keep validation losses comparable
            drop_last=len(dataset) >= self.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._pin(),
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            # stack the (H, W, 3) pixels as they are: a channels-last batch, no CPU transpose
            collate_fn=collate_tiles,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled over all slides; Lightning swaps in a ``DistributedSampler`` under DDP.

        Yields:
            uint8 tiles, ``(batch_size, 3, tile_size, tile_size)``.
        """
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out slides in order (empty when ``val_fraction`` is 0)."""
        if self.train_set is None:
            self.setup("fit")
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False)

    def state_dict(self) -> dict[str, str]:
        """Saved in Lightning checkpoints: which tiles the run trained on."""
        return {"tiles": self.tiles, "fingerprint": self.fingerprint}

    def load_state_dict(self, state_dict: dict[str, str]) -> None:
        """On resume, refuse to continue on different tiles than the checkpoint's."""
        before = state_dict.get("fingerprint")
        if before and before != self.fingerprint:
            raise ValueError(
                f"the checkpoint was trained on tiles {before} ({state_dict.get('tiles')}), but "
                f"{self.tiles} is now {self.fingerprint}: resuming would mix two datasets. Use "
                "another --out to start a new run on these tiles (or --resume false to restart "
                "this one from scratch)."
            )
