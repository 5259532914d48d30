"""Bags of tile features from a feature store, batched with padding and masks.

(Named ``bags`` rather than ``data`` because ``finetune/data/`` holds the package data.)

A bag is one slide's (N, D) features. :func:`collate_bags` pads the bags of a batch to the
longest one and returns a (B, N) mask, True on real tiles. During training a huge bag can be
cut to a random subset of ``max_tiles`` tiles (new each epoch); evaluation always sees every
tile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from histcode.featurestore import FeatureStore
from histcode.finetune.context import context_features
from histcode.finetune.labels import Labels

log = logging.getLogger(__name__)

#: Class index used where a gene has no target (``ignore_index`` of the cross-entropy).
IGNORE_CLASS = -100


class FeatureBags:
    """Reads slides' features from a feature store, keeping them in memory once read.

    Args:
        store: the feature store or its path.
        cache: keep each bag in memory after its first read (in the stored dtype).
        context: give each slide's context features instead
            (:func:`histcode.finetune.context.context_features` of the whole slide, from its
            tile corners: ``(N, 4D)`` float32), for a model with ``tumour_context``.
    """

    def __init__(
        self, store: FeatureStore | Path | str, cache: bool = True, context: bool = False
    ) -> None:
        self.store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        self.cache = cache
        self.context = context
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, slide_id: str) -> np.ndarray:
        """(N, D) features of ``slide_id`` (float16 or float32 as stored; ``(N, 4D)``
        float32 with ``context``)."""
        if slide_id in self._cache:
            return self._cache[slide_id]
        read = self.store.read(slide_id)
        features = context_features(read.features, read.coords) if self.context else read.features
        if self.cache:
            self._cache[slide_id] = features
        return features

    def preload(self, slide_ids: Sequence[str]) -> None:
        """Read ``slide_ids`` into the cache now (no-op without cache)."""
        if self.cache:
            for sid in slide_ids:
                self[sid]


@dataclass
class Bag:
    """One slide and its targets.

    Attributes:
        slide_id: the slide.
        features: (N, D) float32.
        tumour: () float, 1 / 0, NaN unknown.
        log2fc: (G,) float, NaN where no target.
        classes: (G,) int64 class index 0 down / 1 unchanged / 2 up, ``IGNORE_CLASS`` if none.
        categories: (K,) int64 class index of each categorical task, ``IGNORE_CLASS`` if none.
    """

    slide_id: str
    features: Tensor
    tumour: Tensor
    log2fc: Tensor
    classes: Tensor
    categories: Tensor | None = None


@dataclass
class BagBatch:
    """Bags padded to a common length.

    Attributes:
        features: (B, N, D) float32, zero on padding.
        mask: (B, N) bool, True on real tiles.
        tumour: (B,) float, NaN where unknown.
        log2fc: (B, G) float, NaN where no target.
        classes: (B, G) int64, ``IGNORE_CLASS`` where no target.
        slide_ids: the B slide ids.
        categories: (B, K) int64 class of each categorical task, ``IGNORE_CLASS`` where none.
    """

    features: Tensor
    mask: Tensor
    tumour: Tensor
    log2fc: Tensor
    classes: Tensor
    slide_ids: list[str]
    categories: Tensor | None = None

    def __len__(self) -> int:
        return len(self.slide_ids)

    def to(self, device: torch.device | str) -> BagBatch:
        """The batch with its tensors on ``device``."""
        return BagBatch(
            features=self.features.to(device, non_blocking=True),
            mask=self.mask.to(device, non_blocking=True),
            tumour=self.tumour.to(device),
            log2fc=self.log2fc.to(device),
            classes=self.classes.to(device),
            slide_ids=list(self.slide_ids),
            categories=None if self.categories is None else self.categories.to(device),
        )


class BagDataset(Dataset[Bag]):
    """Slides of ``labels`` as bags.

    Args:
        bags: where the features come from.
        labels: the slides and their targets.
        max_tiles: at most this many tiles per bag, a random subset drawn at each access
            (``None``: every tile). Use for training only.
    """

    def __init__(self, bags: FeatureBags, labels: Labels, max_tiles: int | None = None) -> None:
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be ≥ 1 or None (all tiles), got {max_tiles}")
        self.bags, self.labels, self.max_tiles = bags, labels, max_tiles
        self._classes = np.where(labels.gene_mask, labels.classes + 1, IGNORE_CLASS)
        codes = labels.category_codes
        self._categories = np.where(labels.category_mask, codes, IGNORE_CLASS).astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Bag:
        sid = self.labels.slide_ids[i]
        features = torch.from_numpy(np.asarray(self.bags[sid], dtype=np.float32))
        if len(features) == 0:
            raise ValueError(f"slide {sid} has no tiles; it cannot be a bag (drop it)")
        if self.max_tiles is not None and len(features) > self.max_tiles:
            keep = torch.randperm(len(features))[: self.max_tiles].sort().values
            features = features[keep]
        return Bag(
            slide_id=sid,
            features=features,
            tumour=torch.tensor(self.labels.tumour[i], dtype=torch.float32),
            log2fc=torch.from_numpy(self.labels.log2fc[i].astype(np.float32)),
            classes=torch.from_numpy(self._classes[i].astype(np.int64)),
            categories=torch.from_numpy(self._categories[i]),
        )


def collate_bags(bags: Sequence[Bag]) -> BagBatch:
    """Pad bags to the longest and stack them (a ``DataLoader`` ``collate_fn``).

    Args:
        bags: B bags with (N_b, D) features.

    Returns:
        A :class:`BagBatch` with features (B, max N_b, D) and mask (B, max N_b).
    """
    n = max(len(b.features) for b in bags)
    dim = bags[0].features.shape[1]
    features = torch.zeros(len(bags), n, dim, dtype=torch.float32)
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for i, b in enumerate(bags):
        features[i, : len(b.features)] = b.features
        mask[i, : len(b.features)] = True
    return BagBatch(
        features=features,
        mask=mask,
        tumour=torch.stack([b.tumour for b in bags]),
        log2fc=torch.stack([b.log2fc for b in bags]),
        classes=torch.stack([b.classes for b in bags]),
        slide_ids=[b.slide_id for b in bags],
        categories=(
            None if bags[0].categories is None else torch.stack([b.categories for b in bags])
        ),
    )


def bag_loader(
    dataset: BagDataset,
    batch_size: int = 4,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
) -> DataLoader[Bag]:
    """A ``DataLoader`` of padded batches (:func:`collate_bags`).

    Args:
        dataset: the bags.
        batch_size: bags per batch.
        shuffle: shuffle every epoch (training).
        num_workers: loader worker processes (0: the main process; bags are cached there).
        seed: seed of the shuffling.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_bags,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


__all__ = [
    "IGNORE_CLASS",
    "Bag",
    "BagBatch",
    "BagDataset",
    "FeatureBags",
    "bag_loader",
    "collate_bags",
]
