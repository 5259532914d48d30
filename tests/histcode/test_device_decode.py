"""``histcode embed --decode``: the choice and its reasons, and the device path's plumbing.

No GPU here: nvImageCodec is replaced by a stand-in module whose ``Decoder`` decodes with
simplejpeg on the CPU, and the device check is told that the CPU will do, so that
everything around the decoder (stored tiles read by the workers, deduplicated per batch,
pinned, decoded in one batch, pasted into the batch and box-averaged) runs as it would on a
GPU. Its pixels against libjpeg-turbo's on a real GPU: ``test_tiffjpeg.py``'s ``gpu`` test.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from histcode import tiffjpeg
from histcode.cli import main as cli_main
from histcode.embedding import choose_decode, embed_store
from histcode.encoders import create_encoder
from histcode.featurestore import FeatureStore
from histcode.slide import open_slide
from histcode.tilereader import SlideGeometry, box_reduce, read_tile
from histcode.tilestore import TileStore

OK_SLIDES = ("TCGA-S1-0001-01A-01-TS1", "TCGA-S2-0002-11A-01-TS1", "TCGA-S3-0003-01A-01-TS1")


class _StandInDecoder:
    """nvImageCodec's ``Decoder`` as histcode calls it, decoding with simplejpeg."""

    batches: ClassVar[list[int]] = []
    fail: ClassVar[set[bytes]] = set()

    def __init__(self, device_id: int = 0) -> None:
        self.device_id = device_id

    def decode(self, streams: list, cuda_stream: int = 0) -> list:
        import simplejpeg

        type(self).batches.append(len(streams))
        out = []
        for s in streams:
            data = bytes(np.asarray(s, np.uint8))
            out.append(None if data in self.fail else simplejpeg.decode_jpeg(data, "RGB"))
        return out


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[_StandInDecoder]:
    module = types.ModuleType("nvidia.nvimgcodec")
    module.Decoder = _StandInDecoder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", module)
    monkeypatch.setattr(_StandInDecoder, "batches", [])
    monkeypatch.setattr(_StandInDecoder, "fail", set())
    # the CPU stands in for the CUDA device (the real check wants CUDA)
    monkeypatch.setattr(tiffjpeg, "device_decoder_available", lambda device=None: (True, ""))
    return _StandInDecoder


def _reference(tiles_path: Path, sid: str, scaled_decode: bool) -> np.ndarray:
    """The features of a direct forward pass over the tiles read on the CPU."""
    store = TileStore(tiles_path)
    t = store.read(sid)
    geometry = SlideGeometry.from_tiles(t)
    size = store.attrs["tile_size"]
    with open_slide(t.path) as reader:
        batch = np.stack([read_tile(reader, geometry, xy, size, scaled_decode) for xy in t.coords])
    torch.manual_seed(0)
    encoder = create_encoder("tiny", mpp=1.0, tile_size=64).eval()
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    spec = encoder.input_spec
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1) * 255) / (
        torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    )
    with torch.no_grad():
        return encoder(x).numpy()


@pytest.mark.parametrize("workers", [0, 1])
def test_device_path_gives_the_cpu_paths_features(
    small_cohort: dict, tmp_path: Path, stand_in: type[_StandInDecoder], workers: int
) -> None:
    tiles = small_cohort["tiles"]
    report = embed_store(
        tiles, tmp_path / "f.zarr", "tiny", batch_size=16, workers=workers, decode="device",
        progress=False,
    )  # fmt: skip
    assert report.decode == "device" and report.decode_reason == ""
    # every tile of these JPEG-tiled slides lies inside its level: all decoded "on the device"
    assert report.tiles_decoded_on_device == report.tiles_embedded > 0
    # stored tiles shared by a batch's tiles are decoded once per batch
    store = TileStore(tiles)
    assert len(stand_in.batches) == -(-report.tiles_embedded // 16)
    factors = set()
    features = FeatureStore(tmp_path / "f.zarr")
    for sid in OK_SLIDES:
        geometry = SlideGeometry.from_tiles(store.read(sid))
        factor = geometry.size_at_level // store.attrs["tile_size"]
        factors.add(factor)
        # decoded in full and box-averaged: the CPU path's pixels without scaled decoding
        np.testing.assert_allclose(
            features.read(sid).features, _reference(tiles, sid, False), rtol=1e-4, atol=1e-5
        )
    assert factors == {1, 2}, factors  # both the paste and the box average ran


def test_device_path_fails_a_slide_whose_stored_tile_cannot_be_decoded(
    small_cohort: dict, tmp_path: Path, stand_in: type[_StandInDecoder]
) -> None:
    sid = OK_SLIDES[0]
    t = TileStore(small_cohort["tiles"]).read(sid)
    with open_slide(t.path) as reader:
        geometry = SlideGeometry.from_tiles(t)
        x, y = (int(v) for v in t.coords[0])
        parts = reader.window_parts((x, y), geometry.level, (geometry.size_at_level,) * 2)
        assert parts
        stand_in.fail.add(reader.stored_stream(geometry.level, parts[0][0]))
    report = embed_store(
        small_cohort["tiles"], tmp_path / "f.zarr", "tiny", workers=0, decode="device",
        progress=False,
    )  # fmt: skip
    status = {s["slide_id"]: (s["status"], s["error"]) for s in report.slides}
    assert status[sid][0] == "failed" and "cannot be decoded on the device" in status[sid][1]
    assert all(status[other][0] == "ok" for other in OK_SLIDES[1:])


def test_box_reduce_equals_pil_reduce() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 16, 24, 3), np.uint8)
    for factor in (2, 4, 8):
        got = box_reduce(torch.from_numpy(pixels), factor).numpy()
        want = np.stack([np.asarray(Image.fromarray(p).reduce(factor)) for p in pixels])
        assert np.array_equal(got, want), factor


def test_window_parts_rebuild_read_region(small_cohort: dict) -> None:
    """The parts the workers send, pasted from full decodes, give read_region's pixels."""
    path = small_cohort["slides"] / f"{OK_SLIDES[1]}.svs"
    with open_slide(path) as reader:
        assert isinstance(reader, tiffjpeg.TiffJpegReader)
        w = reader.level_dimensions[0][0]
        for (x, y), size in [((0, 0), (256, 256)), ((200, 130), (300, 260)), ((17, 5), (9, 7))]:
            parts = reader.window_parts((x, y), 0, size)
            assert parts is not None
            out = np.zeros((size[1], size[0], 3), np.uint8)
            for index, dy, dx, sy, sx, ph, pw in parts:
                lv = reader._levels[0]
                full = reader._decode_stream(reader.stored_stream(0, index), lv, 1, 0, index)
                out[dy : dy + ph, dx : dx + pw] = full[sy : sy + ph, sx : sx + pw]
            assert np.array_equal(out, reader.read_region((x, y), 0, size))
        # over the level's edge: no parts (the CPU path paints the glass)
        assert reader.window_parts((w - 10, 0), 0, (64, 64)) is None


def test_choose_decode_says_why_and_refuses_device_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    assert choose_decode("cpu", cpu) == (False, "--decode cpu")
    on, why = choose_decode("auto", cpu)
    assert not on and "runs on cpu" in why
    with pytest.raises(ValueError, match=r"--decode device: .*pip install 'histcode\[gpu\]'"):
        choose_decode("device", cpu)
    with pytest.raises(ValueError, match="expected auto, cpu or device"):
        choose_decode("gpu", cpu)
    # CUDA present but nvImageCodec missing: the reason names the package
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)
    on, why = choose_decode("auto", torch.device("cuda"))
    assert not on and "nvidia-nvimgcodec-cu12" in why and "histcode[gpu]" in why
    # a stain-normalised store is decoded where its normaliser runs
    on, why = choose_decode("auto", torch.device("cuda"), "macenko")
    assert not on and "stain-normalised" in why


def test_embed_logs_and_reports_where_it_decodes(
    small_cohort: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    with caplog.at_level(logging.INFO, logger="histcode.embedding"):
        report = embed_store(
            small_cohort["tiles"], tmp_path / "f.zarr", "tiny", workers=0, progress=False
        )
    said = [r for r in caplog.records if "decoded on the CPU" in r.getMessage()]
    assert len(said) == 1 and "runs on cpu" in said[0].getMessage()
    assert report.decode == "cpu" and report.tiles_decoded_on_device == 0
    argv = ["embed", "--tiles", str(small_cohort["tiles"]), "--encoder", "tiny"]
    code = cli_main([*argv, "--out", str(tmp_path / "g.zarr"), "--decode", "device"])
    assert code == 2
    assert "histcode[gpu]" in capsys.readouterr().err


@pytest.mark.gpu
def test_device_path_on_a_gpu_matches_the_cpu_path(small_cohort: dict, tmp_path: Path) -> None:
    """On real hardware: nvImageCodec's tiles give the CPU path's features within the two
    decoders' rounding (and, on 40x slides, scaled decoding against the box average)."""
    from histcode.tiffjpeg import device_decoder_available

    ok, why = device_decoder_available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    common = {"encoder": "tiny", "device": "cuda", "precision": "32", "progress": False}
    gpu = embed_store(small_cohort["tiles"], tmp_path / "g.zarr", decode="device", **common)
    cpu = embed_store(small_cohort["tiles"], tmp_path / "c.zarr", decode="cpu", **common)
    assert gpu.tiles_decoded_on_device == gpu.tiles_embedded > 0
    assert cpu.tiles_decoded_on_device == 0
    a, b = FeatureStore(tmp_path / "g.zarr"), FeatureStore(tmp_path / "c.zarr")
    for sid in OK_SLIDES:
        fa, fb = a.read(sid).features, b.read(sid).features
        assert np.abs(fa - fb).mean() <= 0.02 * np.abs(fb).mean(), sid
