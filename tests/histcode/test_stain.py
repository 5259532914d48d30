"""Macenko stain estimation per slide and normalisation (histcode.stain), on tiles rendered
from known stain vectors by Beer–Lambert, and on the real CMU-1 slide (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histcode import stain

REAL_SLIDE = Path(__file__).parents[2] / ".." / "shared" / "data" / "CMU-1-Small-Region.svs"

#: Stains of a "slide" (unit OD vectors, R G B): haematoxylin absorbs red most, eosin green.
H = np.array([0.62, 0.68, 0.39])
E = np.array([0.22, 0.84, 0.50])
#: The same stains from another site: a bluer haematoxylin, a redder eosin.
H_CAST = np.array([0.75, 0.60, 0.28])
E_CAST = np.array([0.12, 0.90, 0.42])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _concentrations(n: int = 24, size: int = 32, seed: int = 0) -> np.ndarray:
    """``(n, 2, size, size)`` H and E concentrations: nuclei (mostly H), stroma (mostly E),
    mixtures and glass, in patches."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=(n, size // 4, size // 4), p=[0.25, 0.35, 0.3, 0.1])
    kind = kind.repeat(4, axis=1).repeat(4, axis=2)
    h, e = np.zeros(kind.shape), np.zeros(kind.shape)  # kind 3: glass
    for k, (h_range, e_range) in enumerate(
        [((0.5, 1.6), (0, 0.05)), ((0, 0.05), (0.4, 1.2)), ((0.2, 0.8), (0.2, 0.8))]
    ):
        on = kind == k
        h[on], e[on] = rng.uniform(*h_range, on.sum()), rng.uniform(*e_range, on.sum())
    return np.stack([h, e], axis=1)


def _render(conc: np.ndarray, h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """uint8 tiles ``(n, 3, s, s)`` of concentrations ``(n, 2, s, s)`` stained with ``h``, ``e``
    (Beer–Lambert in the module's OD convention: ``I = Io·exp(-OD) − 1``)."""
    matrix = np.stack([_unit(h), _unit(e)], axis=1)
    od = np.einsum("cs,nshw->nchw", matrix, conc)
    return np.clip(np.round(stain.IO * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def _mean_od(tiles: np.ndarray) -> np.ndarray:
    return stain.optical_density(tiles).mean(axis=1)


def test_the_estimate_recovers_known_stain_vectors_haematoxylin_first() -> None:
    conc = _concentrations()
    for h, e in ((H, E), (H_CAST, E_CAST)):
        params = stain.estimate_macenko(_render(conc, h, e))
        assert params.stain_matrix.shape == (3, 2)
        assert params.haematoxylin @ _unit(h) > 0.99, params.to_dict()
        assert params.eosin @ _unit(e) > 0.99, params.to_dict()
        assert params.haematoxylin @ _unit(e) < params.haematoxylin @ _unit(h)
        # the tissue pixels' 99th-percentile concentrations: about the largest rendered
        np.testing.assert_allclose(params.max_concentrations, [1.55, 1.15], rtol=0.15)
    # twice the stain: the same vectors, twice the concentrations
    dark = stain.estimate_macenko(_render(2 * conc, H, E))
    light = stain.estimate_macenko(_render(conc, H, E))
    assert dark.haematoxylin @ light.haematoxylin > 0.999
    np.testing.assert_allclose(dark.max_concentrations / light.max_concentrations, 2, rtol=0.1)


def test_normalising_a_colour_cast_slide_brings_it_to_the_reference_rendering() -> None:
    conc = _concentrations(seed=1)
    reference_tiles = _render(conc, H, E)
    target = stain.estimate_macenko(reference_tiles)
    cast_tiles = _render(1.4 * conc, H_CAST, E_CAST)  # other stains, stained longer
    source = stain.estimate_macenko(cast_tiles)
    normalised = stain.normalise(cast_tiles, source, target)
    assert isinstance(normalised, np.ndarray) and normalised.dtype == np.uint8
    assert normalised.shape == cast_tiles.shape
    before = np.abs(_mean_od(cast_tiles) - _mean_od(reference_tiles)).max()
    after = np.abs(_mean_od(normalised) - _mean_od(reference_tiles)).max()
    assert before > 0.15 and after < 0.03, (before, after)
    # pixel by pixel, too: the same tissue in the same colours, within a few grey levels
    diff = np.abs(normalised.astype(int) - reference_tiles.astype(int))
    assert np.median(diff) <= 1 and np.percentile(diff, 95) <= 3


def test_a_slide_normalised_to_its_own_stains_keeps_its_pixels() -> None:
    tiles = _render(_concentrations(n=8), H, E)
    params = stain.estimate_macenko(tiles)
    same = stain.normalise(tiles, params, params)
    assert np.abs(same.astype(int) - tiles.astype(int)).max() <= 1  # uint8 rounding


def test_normalise_works_on_torch_tensors_and_keeps_their_kind() -> None:
    tiles = _render(_concentrations(n=6), H_CAST, E_CAST)
    params = stain.estimate_macenko(torch.from_numpy(tiles))  # torch input to the estimate
    from_numpy = stain.normalise(tiles, params)
    from_torch = stain.normalise(torch.from_numpy(tiles), params, chunk=4)  # chunks too
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.uint8
    np.testing.assert_array_equal(from_torch.numpy(), from_numpy)
    one = stain.normalise(tiles[0], params)  # one (3, H, W) tile
    np.testing.assert_array_equal(one, from_numpy[0])
    # to the default reference (Macenko's): the stain vectors come out as the reference's
    back = stain.estimate_macenko(from_numpy)
    assert back.haematoxylin @ stain.REFERENCE.haematoxylin > 0.995
    assert back.eosin @ stain.REFERENCE.eosin > 0.995


@pytest.mark.gpu
def test_normalise_on_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tiles = _render(_concentrations(n=6), H_CAST, E_CAST)
    params = stain.estimate_macenko(tiles)
    on_gpu = stain.normalise(torch.from_numpy(tiles).cuda(), params)
    assert isinstance(on_gpu, torch.Tensor) and on_gpu.is_cuda
    cpu = stain.normalise(tiles, params)
    assert np.abs(on_gpu.cpu().numpy().astype(int) - cpu.astype(int)).max() <= 1


def test_too_little_tissue_or_one_stain_raises_with_what_to_do() -> None:
    glass = np.full((4, 3, 32, 32), 235, np.uint8)
    with pytest.raises(ValueError, match=r"only 0 of 4,096 pixels .* at least 1,000 tissue"):
        stain.estimate_macenko(glass)
    few = glass.copy()
    few[0, :, :10, :10] = _render(_concentrations(n=1), H, E)[0, :, :10, :10]
    with pytest.raises(ValueError, match="more tiles of the slide"):
        stain.estimate_macenko(few)
    stain.estimate_macenko(few, min_pixels=50)  # enough when asked for less
    conc = _concentrations()
    conc[:, 1] = 0  # haematoxylin only
    with pytest.raises(ValueError, match="one stain only"):
        stain.estimate_macenko(_render(conc, H, E))
    with pytest.raises(ValueError, match="uint8"):
        stain.estimate_macenko(glass.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        stain.normalise(glass[:, :2], stain.REFERENCE)


def test_stain_params_round_trip_through_json() -> None:
    params = stain.estimate_macenko(_render(_concentrations(n=8), H, E))
    back = stain.StainParams.from_dict(json.loads(json.dumps(params.to_dict())))
    np.testing.assert_allclose(back.stain_matrix, params.stain_matrix, atol=1e-6)
    np.testing.assert_allclose(back.max_concentrations, params.max_concentrations, atol=1e-6)
    assert back.pixels == params.pixels > 0
    with pytest.raises(ValueError, match="method"):
        stain.StainParams.from_dict({**params.to_dict(), "method": "reinhard"})
    with pytest.raises(ValueError, match="lack"):
        stain.StainParams.from_dict({"method": "macenko", "haematoxylin": [1, 0, 0]})
    with pytest.raises(ValueError, match="positive"):
        stain.StainParams(params.stain_matrix, np.array([1.0, 0.0]))


@pytest.mark.skipif(not REAL_SLIDE.is_file(), reason="shared/data/CMU-1-Small-Region.svs absent")
def test_real_he_slide_gives_a_blue_purple_haematoxylin_and_a_pink_eosin() -> None:
    import openslide

    with openslide.OpenSlide(str(REAL_SLIDE)) as slide:
        w, h = slide.dimensions
        tiles = np.stack(
            [
                np.asarray(slide.read_region((x, y), 0, (256, 256)).convert("RGB"))
                for y in range(0, h - 256, 512)
                for x in range(0, w - 256, 512)
            ]
        ).transpose(0, 3, 1, 2)
    params = stain.estimate_macenko(tiles)
    assert (params.stain_matrix > 0).all()
    # what one unit of each stain alone looks like on glass (Beer–Lambert)
    h_rgb = stain.IO * np.exp(-params.haematoxylin)
    e_rgb = stain.IO * np.exp(-params.eosin)
    assert h_rgb[2] > h_rgb[0], f"haematoxylin should look blue/purple, renders {h_rgb}"
    assert e_rgb[0] > e_rgb[1] and e_rgb[0] > e_rgb[2], f"eosin should look pink: {e_rgb}"
    assert params.haematoxylin @ stain.REFERENCE.haematoxylin > 0.9
    assert params.eosin @ stain.REFERENCE.eosin > 0.9
    assert params.max_concentrations[0] > 0.5 and params.max_concentrations[1] > 0.5
