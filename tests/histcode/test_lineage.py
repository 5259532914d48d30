"""Lineage in cards is structured (kind, ref, sha256); cards with the old strings still load."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from histcode.lineage import Parent, as_parents, parse_parent, tiles_parent
from histcode.registry import CARD_FILE, Card, Registry

SHA_A, SHA_B = "ab" * 32, "cd" * 32

#: every form of parent string that histcode wrote before lineage was structured
OLD_STRINGS = {
    f"tiles:sha256:{SHA_A}": Parent("tiles", "", SHA_A),
    f"simclr-r18@3#sha256={SHA_A}": Parent("encoder", "simclr-r18@3", SHA_A),
    f"registry:simclr-r18@3#sha256={SHA_A}": Parent("encoder", "registry:simclr-r18@3", SHA_A),
    f"zoo:resnet18#random-seed=0#sha256={SHA_B}": Parent(
        "encoder", "zoo:resnet18#random-seed=0", SHA_B
    ),
    f"file:/w/imagenet.pth#sha256={SHA_B}": Parent("file", "/w/imagenet.pth", SHA_B),
    f"features:/f.zarr#encoder_sha256={SHA_A}#tiles_fingerprint=tiles:sha256:{SHA_B}": Parent(
        "features",
        "/f.zarr",
        "",
        {"encoder_sha256": SHA_A, "tiles_fingerprint": f"tiles:sha256:{SHA_B}"},
    ),
    "unknown-encoder": Parent("unknown", "unknown-encoder"),
    "tiles.zarr#abc": Parent("unknown", "tiles.zarr#abc"),
}


@pytest.mark.parametrize("text", list(OLD_STRINGS))
def test_old_strings_parse_into_parents_and_back(text: str) -> None:
    parent = parse_parent(text)
    assert parent == OLD_STRINGS[text]
    assert parent.legacy() == str(parent) == text
    assert Parent.from_dict(json.loads(json.dumps(parent.to_dict()))) == parent


def test_cards_store_structured_lineage_and_the_strings(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    lineage = [
        tiles_parent("/data/tiles.zarr", f"tiles:sha256:{SHA_A}"),
        Parent("encoder", "base@1", SHA_B),
    ]
    ref = registry.save("m", torch.nn.Linear(2, 2), Card("mil", "linear", lineage=lineage))
    stored = json.loads((registry.resolve(ref).path / CARD_FILE).read_text())
    assert stored["lineage"] == [
        {"kind": "tiles", "ref": "/data/tiles.zarr", "sha256": SHA_A},
        {"kind": "encoder", "ref": "base@1", "sha256": SHA_B},
    ]
    assert stored["parents"] == [f"tiles:sha256:{SHA_A}", f"base@1#sha256={SHA_B}"]
    card = registry.card(ref)
    assert card.lineage == lineage
    assert [p.kind for p in card.lineage] == ["tiles", "encoder"]


def test_a_card_with_only_the_old_strings_still_loads(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    ref = registry.save("old", torch.nn.Linear(2, 2), Card("mil", "linear"))
    path = registry.resolve(ref).path / CARD_FILE
    data = json.loads(path.read_text())
    del data["lineage"]  # as histcode wrote cards before
    data["parents"] = list(OLD_STRINGS)
    path.write_text(json.dumps(data))
    card = registry.card(ref)
    assert card.lineage == list(OLD_STRINGS.values())
    assert card.parents == list(OLD_STRINGS)
    assert registry.verify(ref).ok  # the weights' checksum is untouched


def test_parents_given_as_strings_or_parents_fill_each_other() -> None:
    from_strings = Card("encoder", "x", parents=[f"base@1#sha256={SHA_A}"])
    assert from_strings.lineage == [Parent("encoder", "base@1", SHA_A)]
    from_parents = Card("encoder", "x", parents=[Parent("encoder", "base@1", SHA_A)])
    assert from_parents.parents == [f"base@1#sha256={SHA_A}"]
    assert from_parents.lineage == from_strings.lineage
    assert as_parents([{"kind": "file", "ref": "/w", "sha256": SHA_B}]) == [
        Parent("file", "/w", SHA_B)
    ]


def test_finetune_lineage_is_structured_and_heatmap_compares_fields(tmp_path: Path) -> None:
    from histcode.finetune.heatmap import check_lineage
    from histcode.finetune.pipeline import lineage

    attrs = {
        "encoder_ref": "registry:enc@2",
        "encoder_sha256": SHA_A,
        "tiles_fingerprint": f"tiles:sha256:{SHA_B}",
        "embed_dim": 8,
    }
    store = SimpleNamespace(attrs=attrs, path=tmp_path / "features.zarr")
    parents = lineage(store)  # type: ignore[arg-type]
    assert parents[0] == Parent("encoder", "registry:enc@2", SHA_A)
    assert parents[1].kind == "features" and parents[1].ref == str(store.path.resolve())
    assert parents[1].attrs == {
        "encoder_sha256": SHA_A,
        "tiles_fingerprint": f"tiles:sha256:{SHA_B}",
    }
    new = Card("mil", "abmil", {"in_dim": 8}, lineage=parents)
    old = Card("mil", "abmil", {"in_dim": 8}, parents=[str(p) for p in parents])  # string form
    for card in (new, old):
        check_lineage(card, attrs, "m@1", store.path)  # same encoder: fine
        other = {**attrs, "encoder_sha256": SHA_B}
        with pytest.raises(ValueError, match="another encoder"):
            check_lineage(card, other, "m@1", store.path)
    # a sha that only contains the model's as a substring is another encoder
    with pytest.raises(ValueError, match="another encoder"):
        check_lineage(new, {**attrs, "encoder_sha256": SHA_A[:10]}, "m@1", store.path)


def test_encoder_card_records_init_weights_as_a_file_parent(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from histcode.encoders import create_encoder, encoder_card

    path = tmp_path / "tiny.safetensors"
    save_file(create_encoder("tiny").state_dict(), str(path))
    encoder = create_encoder("tiny", weights=str(path))
    card = encoder_card(encoder, parents=[tiles_parent("/t.zarr", f"tiles:sha256:{SHA_A}")])
    assert [p.kind for p in card.lineage] == ["tiles", "file"]
    assert card.lineage[1].ref == str(encoder.init_weights["path"])
    assert card.lineage[1].sha256 == encoder.init_weights["sha256"]
