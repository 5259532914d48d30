"""Augmentations: shapes, ranges, per-sample parameters, exactness against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histcode.pretrain.augment import (
    RGB_FROM_HED,
    AugmentConfig,
    RandomColorJitter,
    RandomFlipRotate,
    RandomHEDJitter,
    TileAugmentation,
    default_blur_kernel,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _tiles(b: int = 16, size: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


def _same_tile(b: int = 16, size: int = 48) -> torch.Tensor:
    """One tile repeated: any difference between outputs comes from per-sample parameters."""
    return _tiles(1, size).expand(b, -1, -1, -1).contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_views_have_the_right_shape_dtype_and_range(device: str) -> None:
    torch.manual_seed(0)
    aug = TileAugmentation(AugmentConfig(crop_size=32), MEAN, STD, crop_size=48).to(device)
    tiles = _tiles().to(device)
    v0, v1 = aug.two_views(tiles)
    for v in (v0, v1):
        assert v.shape == (16, 3, 32, 32) and v.dtype == torch.float32 and v.device == tiles.device
        assert torch.isfinite(v).all()
        lo = (0 - torch.tensor(MEAN, device=device)) / torch.tensor(STD, device=device)
        hi = (1 - torch.tensor(MEAN, device=device)) / torch.tensor(STD, device=device)
        per_channel = v.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= lo - 1e-5).all()
        assert (per_channel.max(1).values <= hi + 1e-5).all()
    assert not torch.allclose(v0, v1), "the two views of a tile must differ"
    assert (v0 - v1).flatten(1).abs().mean(1).min() > 0, "every tile's two views must differ"


def test_crop_size_defaults_to_the_tile_size_and_blur_to_a_tenth() -> None:
    aug = TileAugmentation(AugmentConfig(), MEAN, STD, crop_size=224)
    assert aug(_tiles(2, 224)).shape == (2, 3, 224, 224)
    assert aug.resolved() == {"crop_size": 224, "blur_kernel_size": 23}
    assert default_blur_kernel(64) == 7 and default_blur_kernel(20) == 3


def test_per_sample_parameters_differ_within_a_batch() -> None:
    torch.manual_seed(0)
    aug = TileAugmentation(AugmentConfig(), MEAN, STD, crop_size=48)
    out = aug(_same_tile(32))
    flat = out.flatten(1)
    distinct = torch.cdist(flat, flat) > 1e-3
    assert distinct.sum() >= 32 * 31 * 0.95, "identical tiles should give different views"
    # each random step draws its own parameters per sample
    crop = aug.crop._params["src"]  # (B, 4, 2) crop corners
    assert len(torch.unique(crop.reshape(32, -1), dim=0)) == 32
    assert len(torch.unique(aug.flip_rotate._params["k"])) > 1
    hed = aug.colour[0]._params
    assert len(torch.unique(hed["alpha"][:, 0])) > 16
    jitter = aug.colour[1]._params
    assert len(torch.unique(jitter["brightness"])) > 16
    assert jitter["gray"].any() and not jitter["gray"].all()
    blur = aug.colour[2]._params
    assert len(torch.unique(blur["sigma"])) > 16


def test_every_option_reaches_its_step() -> None:
    config = AugmentConfig(
        crop_size=40,
        crop_scale=(0.3, 0.9),
        crop_ratio=(0.8, 1.25),
        hflip_prob=0.1,
        vflip_prob=0.2,
        rot90_prob=0.3,
        hed_prob=0.4,
        hed_sigma=0.15,
        jitter_prob=0.6,
        brightness=0.1,
        contrast=0.2,
        saturation=0.3,
        hue=0.05,
        gray_prob=0.7,
        blur_prob=0.9,
        blur_sigma=(0.5, 1.5),
        blur_kernel_size=9,
    )
    aug = TileAugmentation(config, MEAN, STD, crop_size=64)
    assert aug.size == 40 and aug(_tiles(2, 64)).shape[-2:] == (40, 40)
    assert tuple(aug.crop._param_generator.scale) == (0.3, 0.9)
    assert tuple(aug.crop._param_generator.ratio) == (0.8, 1.25)
    fr = aug.flip_rotate
    assert (fr.hflip_p, fr.vflip_p, fr.rot90_p) == (0.1, 0.2, 0.3)
    hed, jitter, blur = aug.colour
    assert (hed.p, hed.sigma) == (0.4, 0.15)
    assert (jitter.p, jitter.brightness, jitter.contrast) == (0.6, 0.1, 0.2)
    assert (jitter.saturation, jitter.hue, jitter.gray_p) == (0.3, 0.05, 0.7)
    assert blur.p == 0.9 and tuple(blur.flags["kernel_size"]) == (9, 9)
    assert aug.resolved() == {"crop_size": 40, "blur_kernel_size": 9}
    assert config.to_dict()["crop_scale"] == [0.3, 0.9]


@pytest.mark.parametrize(
    "bad",
    [
        {"hflip_prob": 1.5},
        {"hue": 0.7},
        {"crop_scale": (0.5, 0.2)},
        {"blur_kernel_size": 4},
        {"hed_sigma": -0.1},
    ],
)
def test_impossible_options_are_refused_with_the_option_named(bad: dict) -> None:
    with pytest.raises(ValueError, match=f"augmentation.{next(iter(bad))}"):
        TileAugmentation(AugmentConfig(**bad), MEAN, STD, crop_size=32)


def test_input_must_be_uint8_rgb() -> None:
    aug = TileAugmentation(AugmentConfig(), MEAN, STD, crop_size=32)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(2, 3, 32, 32))


# -- the torch steps against references -----------------------------------------------------------


def test_flip_rotate_matches_flips_then_rot90_sample_by_sample() -> None:
    torch.manual_seed(0)
    x = _tiles(64, 8)
    step = RandomFlipRotate(0.5, 0.5, 0.75)
    out = step(x)
    p = step._params
    for i in range(64):
        ref = x[i]
        if p["hflip"][i]:
            ref = ref.flip(-1)
        if p["vflip"][i]:
            ref = ref.flip(-2)
        ref = torch.rot90(ref, int(p["k"][i]), dims=(-2, -1))
        assert torch.equal(out[i], ref), (
            f"sample {i}: {p['hflip'][i]}, {p['vflip'][i]}, {p['k'][i]}"
        )
    assert set(p["k"].tolist()) == {0, 1, 2, 3}


def _rgb2hed_reference(rgb: np.ndarray) -> np.ndarray:
    """scikit-image's rgb2hed, written out: (..., 3) in (0, 1] → (..., 3) HED."""
    hed_from_rgb = np.linalg.inv(np.array(RGB_FROM_HED))
    rgb = np.maximum(rgb, 1e-6)
    return (np.log(rgb) / np.log(1e-6)) @ hed_from_rgb


def test_hed_jitter_scales_and_shifts_each_stain_as_tellez() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8) * 0.4 + 0.4
    step = RandomHEDJitter(sigma=0.05, p=1.0)
    out = step(x)
    alpha, beta = step._params["alpha"].numpy(), step._params["beta"].numpy()
    hed_in = _rgb2hed_reference(x.permute(0, 2, 3, 1).double().numpy())
    hed_out = _rgb2hed_reference(out.permute(0, 2, 3, 1).double().numpy())
    expected = hed_in * alpha[:, None, None, :] + beta[:, None, None, :]
    inside = ((out > 1e-5) & (out < 1 - 1e-5)).all(1).numpy()  # pixels not clipped
    assert inside.mean() > 0.5
    np.testing.assert_allclose(hed_out[inside], expected[inside], atol=2e-4)
    assert ((alpha >= 0.95) & (alpha <= 1.05)).all() and (np.abs(beta) <= 0.05).all()


def test_hed_jitter_with_sigma_0_is_the_identity() -> None:
    x = torch.rand(8, 3, 16, 16)
    np.testing.assert_allclose(RandomHEDJitter(sigma=0.0, p=1.0)(x), x, atol=1e-5)


def test_hed_jitter_probability_leaves_others_untouched() -> None:
    torch.manual_seed(1)
    x = torch.rand(64, 3, 4, 4) * 0.8 + 0.1
    step = RandomHEDJitter(sigma=0.2, p=0.5)
    out = step(x)
    changed = (out - x).flatten(1).abs().amax(1) > 1e-4
    untouched = (step._params["alpha"] == 1).all(1) & (step._params["beta"] == 0).all(1)
    assert torch.equal(changed, ~untouched) and 10 < int(untouched.sum()) < 54


def test_colour_jitter_matches_its_definition() -> None:
    x = torch.rand(6, 3, 8, 8)
    luma = torch.tensor([0.299, 0.587, 0.114])
    # brightness only
    step = RandomColorJitter(brightness=0.5, contrast=0, saturation=0, hue=0, p=1, gray_p=0)
    out = step(x)
    b = step._params["brightness"].view(-1, 1, 1, 1)
    torch.testing.assert_close(out, (x * b).clamp(0, 1))
    # contrast only: blend with the mean gray level
    step = RandomColorJitter(brightness=0, contrast=0.5, saturation=0, hue=0, p=1, gray_p=0)
    out = step(x)
    c = step._params["contrast"].view(-1, 1, 1, 1)
    mean = torch.einsum("bchw,c->b", x, luma).view(-1, 1, 1, 1) / 64
    torch.testing.assert_close(out, (c * x + (1 - c) * mean).clamp(0, 1))
    # grayscale: every channel the luma
    out = RandomColorJitter(p=0, gray_p=1)(x)
    gray = torch.einsum("bchw,c->bhw", x, luma)
    for ch in range(3):
        torch.testing.assert_close(out[:, ch], gray)


def test_hue_rotation_keeps_luma_and_hue_0_is_the_identity() -> None:
    x = torch.rand(4, 3, 8, 8) * 0.5 + 0.25
    luma = torch.tensor([0.299, 0.587, 0.114])
    step = RandomColorJitter(brightness=0, contrast=0, saturation=0, hue=0.5, p=1, gray_p=0)
    out = step(x)
    inside = ((out > 0) & (out < 1)).all(1)  # pixels the final clamp did not touch
    assert inside.float().mean() > 0.9
    out_luma = torch.einsum("bchw,c->bhw", out, luma)
    in_luma = torch.einsum("bchw,c->bhw", x, luma)
    torch.testing.assert_close(out_luma[inside], in_luma[inside], atol=1e-5, rtol=0)
    assert (step._params["hue"].abs() > 0).all() and not torch.allclose(out, x)
    step.hue = 0.0
    torch.testing.assert_close(step(x), x)


def test_saturation_0_gives_gray_and_jitter_probability_is_per_sample() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 3, 4, 4)
    step = RandomColorJitter(brightness=0, contrast=0, saturation=0.999, hue=0, p=0.5, gray_p=0)
    out = step(x)
    jittered = step._params["saturation"] != 1
    assert 10 < int(jittered.sum()) < 54
    torch.testing.assert_close(out[~jittered], x[~jittered])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_match_the_cpu_pipeline_statistics() -> None:
    aug = TileAugmentation(AugmentConfig(), MEAN, STD, crop_size=64)
    tiles = _tiles(256, 64)
    cpu = aug(tiles)
    gpu = aug.cuda()(tiles.cuda()).cpu()
    assert gpu.shape == cpu.shape
    assert abs(float(gpu.mean() - cpu.mean())) < 0.1 and abs(float(gpu.std() - cpu.std())) < 0.1
