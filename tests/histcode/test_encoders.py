"""Tests of the encoder zoo: every encoder runs forward/backward; local weights load."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from histcode.builders import UnknownNameError
from histcode.encoders import (
    Encoder,
    InputSpec,
    create_encoder,
    encoder_card,
    encoders,
    read_weights_file,
)
from histcode.registry import Card

HAS_TIMM = importlib.util.find_spec("timm") is not None

#: Small settings per encoder name; anything registered but missing here uses no arguments.
TINY_KWARGS: dict[str, dict[str, Any]] = {"timm": {"model_name": "resnet18"}}
EMBED_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet50_trunc": 1024}


@pytest.mark.parametrize("name", encoders.names())
def test_forward_backward(name: str) -> None:
    if name == "timm" and not HAS_TIMM:
        pytest.skip("timm is not installed (optional extra: pip install 'histcode[timm]')")
    torch.manual_seed(0)
    encoder = encoders.create(name, **TINY_KWARGS.get(name, {}))
    assert isinstance(encoder, Encoder)
    assert isinstance(encoder.input_spec, InputSpec)
    if name in EMBED_DIMS:
        assert encoder.embed_dim == EMBED_DIMS[name]
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = encoder(x)
    assert out.shape == (2, encoder.embed_dim)
    assert torch.isfinite(out).all()
    out.pow(2).mean().backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_every_encoder_is_rebuilt_from_its_card() -> None:
    for name in encoders.names():
        if name == "timm" and not HAS_TIMM:
            continue
        encoder = encoders.create(name, **TINY_KWARGS.get(name, {}))
        card = Card.from_dict(encoder_card(encoder).to_dict())
        rebuilt = encoders.create(card.architecture, **card.arguments)
        assert rebuilt.input_spec == encoder.input_spec == card.input_spec
        assert rebuilt.state_dict().keys() == encoder.state_dict().keys()


def test_input_spec_defaults_and_overrides() -> None:
    encoder = create_encoder("resnet18")
    assert encoder.input_spec == InputSpec(
        mpp=0.5, tile_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    custom = create_encoder("tiny", mpp=0.25, tile_size=256, mean=[0.5] * 3, std=[0.25] * 3)
    assert custom.input_spec == InputSpec(0.25, 256, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert custom.arguments["tile_size"] == 256 and "weights" not in custom.arguments


def test_input_spec_check_names_what_differs() -> None:
    spec = InputSpec(mpp=0.5, tile_size=224)
    spec.check(mpp=0.5, tile_size=224)
    assert spec.differences(mpp=0.502) == []  # within tolerance
    with pytest.raises(ValueError, match=r"mpp: the encoder expects 0.5 µm/px, the tiles are 1"):
        spec.check(mpp=1.0, tile_size=224, source="tiles.zarr")
    assert len(spec.differences(mpp=0.25, tile_size=256)) == 2
    for bad in [{"mpp": 0}, {"tile_size": 0}, {"tile_size": 2.5}, {"std": (1, 0, 1)}]:
        with pytest.raises(ValueError):
            InputSpec(**bad)
    with pytest.raises(ValueError, match="3 values"):
        InputSpec(mean=(0.5, 0.5))


def test_unknown_encoder_and_argument() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet50'"):
        create_encoder("resnet05")
    with pytest.raises(ValueError, match="it takes weights, embed_dim"):
        create_encoder("tiny", layers=3)


def test_tiny_depth_and_final_relu() -> None:
    """The default tiny CNN is the three-layer one old weights were saved from; ``final_relu``
    adds no parameter (old weights load) but makes the pooled features non-negative counts,
    and ``depth`` adds convolutions."""
    torch.manual_seed(0)
    plain = create_encoder("tiny", embed_dim=8, width=4, mpp=1.0, tile_size=64)
    rectified = create_encoder("tiny", embed_dim=8, width=4, final_relu=True, mpp=1.0, tile_size=64)
    assert list(plain.state_dict()) == list(rectified.state_dict())
    rectified.load_state_dict(plain.state_dict())
    x = torch.randn(5, 3, 64, 64)
    a, b = plain(x), rectified(x)
    assert a.shape == b.shape == (5, 8)
    assert (a < 0).any() and (b >= 0).all()  # the pool of a rectified map is never negative
    assert not torch.allclose(a, b)
    deep = create_encoder("tiny", embed_dim=8, width=4, depth=4, mpp=1.0, tile_size=64)
    convs = [m for m in deep.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 8] and deep(x).shape == (5, 8)
    with pytest.raises(ValueError, match="depth must be at least 2"):
        create_encoder("tiny", depth=1)


def test_timm_missing_says_how_to_install() -> None:
    if HAS_TIMM:
        pytest.skip("timm is installed")
    with pytest.raises(ImportError, match=r"histcode\[timm\]"):
        create_encoder("timm:vit_small_patch16_224")


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (optional extra 'timm')")
def test_timm_prefix_and_spec() -> None:
    encoder = create_encoder("timm:resnet18", mpp=0.25)
    assert encoder.architecture == "timm"
    assert encoder.arguments["model_name"] == "resnet18"
    assert encoder.embed_dim == 512 and encoder.input_spec.mpp == 0.25


# -- local weight files ------------------------------------------------------------------------


def outputs(encoder: Encoder, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return encoder.eval()(x)


def test_local_safetensors_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_encoder("tiny")
    path = tmp_path / "tiny.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = create_encoder("tiny", weights=str(path))
    assert torch.equal(outputs(source), outputs(loaded))
    assert loaded.init_weights is not None and loaded.init_weights["path"] == str(path)
    assert "weights" not in loaded.arguments  # the card rebuilds without the file
    card = encoder_card(loaded)
    assert card.parents == [f"file:{path}#sha256={loaded.init_weights['sha256']}"]


def test_torchvision_checkpoint_with_wrapper_prefix(tmp_path: Path) -> None:
    """A torchvision ResNet-50 state dict (fc head, DDP ``module.`` prefix, nested) loads into
    both ``resnet50`` and the truncated ``resnet50_trunc`` (layer4 dropped)."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    net = resnet50(weights=None).eval()
    checkpoint = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    path = tmp_path / "r50.pth"
    torch.save(checkpoint, path)

    full = create_encoder("resnet50", weights=str(path))
    trunk = torch.nn.Sequential(*list(net.children())[:-1], torch.nn.Flatten())
    assert torch.allclose(outputs(full), outputs(trunk), atol=1e-6)

    trunc = create_encoder("resnet50_trunc", weights=str(path))
    layers = list(net.children())[:-3]  # up to layer3
    reference = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    assert torch.allclose(outputs(trunc), outputs(reference), atol=1e-6)


def test_bad_weight_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        create_encoder("tiny", weights=str(tmp_path / "absent.safetensors"))

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"garbage\.safetensors cannot be read"):
        create_encoder("tiny", weights=str(garbage))

    with pytest.raises(ValueError, match="unknown suffix"):
        create_encoder("tiny", weights=str(tmp_path / "weights.h5"))

    other = tmp_path / "resnet18.safetensors"
    save_file(create_encoder("resnet18").state_dict(), str(other))
    with pytest.raises(ValueError, match=r"does not fit encoder 'tiny'.*missing keys: 6") as err:
        create_encoder("tiny", weights=str(other))
    assert "resnet18.safetensors" in str(err.value) and "unexpected keys" in str(err.value)

    wider = tmp_path / "wide.safetensors"
    save_file(create_encoder("tiny", embed_dim=64).state_dict(), str(wider))
    with pytest.raises(ValueError, match="wrong shapes"):
        create_encoder("tiny", weights=str(wider))

    pickled = tmp_path / "pickled.pth"
    torch.save({"model": Path("x")}, pickled)  # a non-tensor object: refused by weights_only
    with pytest.raises(ValueError, match="pickled Python objects"):
        read_weights_file(pickled)

    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(ValueError, match="holds no tensors"):
        read_weights_file(empty)


def test_encoder_card_needs_a_zoo_encoder() -> None:
    stray = Encoder(8, InputSpec())
    with pytest.raises(ValueError, match="not built by the encoder zoo"):
        encoder_card(stray)
