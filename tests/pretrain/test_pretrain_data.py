"""TileDataModule: uint8 batches from the slides, shuffled across slides, ready for DDP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from histcode.pretrain.data import TileDataModule
from histcode.tilereader import TileIndex


def test_nothing_is_read_in_the_constructor(tmp_path: Path) -> None:
    data = TileDataModule(str(tmp_path / "missing.zarr"))  # no error yet
    with pytest.raises(FileNotFoundError, match="histcode tile"):
        data.setup("fit")


def test_store_geometry_and_fingerprint(pretrain_tiles: Path) -> None:
    data = TileDataModule(str(pretrain_tiles), batch_size=8, num_workers=0)
    assert (data.mpp, data.tile_size) == (2.0, 64)
    assert data.fingerprint.startswith("tiles:sha256:")


def test_batches_are_uint8_tiles_shuffled_across_slides(pretrain_tiles: Path) -> None:
    torch.manual_seed(0)
    data = TileDataModule(str(pretrain_tiles), batch_size=32, num_workers=0)
    data.setup("fit")
    loader = data.train_dataloader()
    batch = next(iter(loader))
    assert batch.dtype == torch.uint8 and batch.shape == (32, 3, 64, 64)
    assert len(loader) == len(data.train_set) // 32  # full batches only
    # the sampler draws from every slide at once, not one slide after another
    index = data.train_set.index
    order = list(iter(loader.sampler))[:32]
    assert len(set(index.slide_of[order].tolist())) == 3


def test_workers_read_the_same_tiles(pretrain_tiles: Path) -> None:
    data = TileDataModule(str(pretrain_tiles), batch_size=16, num_workers=2)
    data.setup("fit")
    loader = data.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    ds = data.train_set
    sequential = torch.stack([ds[i] for i in range(16)])
    plain = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    assert torch.equal(next(iter(plain)), sequential)


def test_distributed_shards_are_disjoint_and_cover_the_tiles(pretrain_tiles: Path) -> None:
    data = TileDataModule(str(pretrain_tiles), batch_size=8, num_workers=0)
    data.setup("fit")
    shards = [
        list(DistributedSampler(data.train_set, num_replicas=2, rank=r, shuffle=True, seed=0))
        for r in range(2)
    ]
    n = len(data.train_set)
    assert len(set(shards[0]) & set(shards[1])) <= 1  # DistributedSampler pads odd sizes
    assert set(shards[0]) | set(shards[1]) == set(range(n))


def test_validation_holds_out_whole_slides(pretrain_tiles: Path) -> None:
    data = TileDataModule(str(pretrain_tiles), batch_size=8, num_workers=0, val_fraction=0.34)
    data.setup("fit")
    train = {g.slide_id for g in data.train_set.index.slides}
    val = {g.slide_id for g in data.val_set.index.slides}
    assert len(val) == 1 and len(train) == 2 and not train & val
    batch = next(iter(data.val_dataloader()))
    assert batch.dtype == torch.uint8


def test_too_few_tiles_for_a_batch_is_a_clear_error(pretrain_tiles: Path) -> None:
    data = TileDataModule(str(pretrain_tiles), batch_size=100_000, num_workers=0)
    with pytest.raises(ValueError, match=r"lower --data\.batch_size"):
        data.setup("fit")


def test_resuming_on_other_tiles_is_refused(pretrain_tiles: Path) -> None:
    data = TileDataModule(str(pretrain_tiles), batch_size=8, num_workers=0)
    state = data.state_dict()
    data.load_state_dict(state)  # same tiles: fine
    with pytest.raises(ValueError, match="another --out"):
        data.load_state_dict({**state, "fingerprint": "tiles:sha256:0"})


def test_index_is_flat_over_slides(pretrain_tiles: Path) -> None:
    index = TileIndex(pretrain_tiles)
    assert len(index) == int(np.diff(index.offsets).sum()) and len(index.slides) == 3
