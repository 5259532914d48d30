"""``histcode embed --decode``: the choice and its reasons, and the device path's plumbing.

No GPU here: nvImageCodec is replaced by a stand-in module whose ``Decoder`` decodes with
simplejpeg on the CPU, and the device check is told that the CPU will do, so that
everything around the decoder (stored tiles read by the workers, deduplicated per batch,
pinned, decoded in one batch, pasted into the batch and box-averaged) runs as it would on a
GPU. Its pixels against libjpeg-turbo's on a real GPU: ``test_tiffjpeg.py``'s ``gpu`` test.
The run-time self-check (a few stored tiles of each slide decoded on both sides and
compared) is tested with a stand-in that changes the pixels of one slide's stored tiles.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from histcode import tiffjpeg
from histcode.cli import main as cli_main
from histcode.embedding import (
    DECODE_CHECK_TILES,
    DecodeMismatchError,
    _embed_outcome,
    choose_decode,
    embed_store,
)
from histcode.encoders import create_encoder
from histcode.featurestore import FeatureStore
from histcode.slide import open_slide
from histcode.tilereader import SlideGeometry, box_reduce, read_tile, sample_stored_tiles
from histcode.tilestore import TileStore

OK_SLIDES = ("TCGA-S1-0001-01A-01-TS1", "TCGA-S2-0002-11A-01-TS1", "TCGA-S3-0003-01A-01-TS1")


class _StandInDecoder:
    """nvImageCodec's ``Decoder`` as histcode calls it, decoding with simplejpeg; streams in
    ``fail`` cannot be decoded, and those in ``perturbed`` come out changed by ``perturb``
    (a decoder that gets them wrong)."""

    batches: ClassVar[list[int]] = []
    options: ClassVar[list[str]] = []
    fail: ClassVar[set[bytes]] = set()
    perturbed: ClassVar[set[bytes]] = set()
    perturb: ClassVar[Callable[[np.ndarray], np.ndarray] | None] = None

    def __init__(self, device_id: int = 0, options: str = "") -> None:
        self.device_id = device_id
        type(self).options.append(options)

    def decode(self, streams: list, cuda_stream: int = 0) -> list:
        import simplejpeg

        type(self).batches.append(len(streams))
        out = []
        for s in streams:
            data = bytes(np.asarray(s, np.uint8))
            image = None if data in self.fail else simplejpeg.decode_jpeg(data, "RGB")
            if image is not None and data in self.perturbed and self.perturb is not None:
                image = np.ascontiguousarray(type(self).perturb(image))
            out.append(image)
        return out


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[_StandInDecoder]:
    module = types.ModuleType("nvidia.nvimgcodec")
    module.Decoder = _StandInDecoder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", module)
    monkeypatch.setattr(_StandInDecoder, "batches", [])
    monkeypatch.setattr(_StandInDecoder, "options", [])
    monkeypatch.setattr(_StandInDecoder, "fail", set())
    monkeypatch.setattr(_StandInDecoder, "perturbed", set())
    monkeypatch.setattr(_StandInDecoder, "perturb", None)
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
    # the self-check first: a few stored tiles of each slide, one call a slide; all passed
    checks = len(OK_SLIDES)
    assert stand_in.batches[:checks] == [DECODE_CHECK_TILES] * checks
    assert report.decode_fallbacks == [] and report.warnings == []
    assert stand_in.options == [":fancy_upsampling=1"]
    # then stored tiles shared by a batch's tiles are decoded once per batch
    store = TileStore(tiles)
    assert len(stand_in.batches) == checks + -(-report.tiles_embedded // 16)
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
    store = TileStore(small_cohort["tiles"])
    t = store.read(sid)
    with open_slide(t.path) as reader:
        geometry = SlideGeometry.from_tiles(t)
        # a stored tile the self-check does not sample: the device fails on it mid-run
        sampled = set(sample_stored_tiles(reader, geometry, t.coords, store.attrs["tile_size"]))
        for x, y in t.coords:
            parts = reader.window_parts(
                (int(x), int(y)), geometry.level, (geometry.size_at_level,) * 2
            )
            unsampled = [p[0] for p in parts or () if p[0] not in sampled]
            if unsampled:
                break
        stand_in.fail.add(reader.stored_stream(geometry.level, unsampled[0]))
    report = embed_store(
        small_cohort["tiles"], tmp_path / "f.zarr", "tiny", workers=0, decode="device",
        progress=False,
    )  # fmt: skip
    status = {s["slide_id"]: (s["status"], s["error"]) for s in report.slides}
    assert status[sid][0] == "failed" and "cannot be decoded on the device" in status[sid][1]
    assert all(status[other][0] == "ok" for other in OK_SLIDES[1:])


def _stored_streams(t: object) -> set[bytes]:
    """Every stored tile's stream of the level a slide's tiles are read from."""
    geometry = SlideGeometry.from_tiles(t)  # type: ignore[arg-type]
    with open_slide(t.path) as reader:  # type: ignore[attr-defined]
        assert isinstance(reader, tiffjpeg.TiffJpegReader)
        lv = reader._levels[geometry.level]
        assert lv is not None
        return {
            reader.stored_stream(geometry.level, k)
            for k in range(len(lv.offsets))
            if lv.bytecounts[k]
        }


#: Decoders that get the pixels wrong: every value 20 too high; red and blue swapped.
PERTURBATIONS = {
    "plus20": lambda a: np.minimum(a.astype(np.int16) + 20, 255).astype(np.uint8),
    "swap_channels": lambda a: a[..., ::-1],
}


@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
def test_a_slide_the_device_decodes_wrongly_falls_back_to_the_cpu(
    small_cohort: dict,
    tmp_path: Path,
    stand_in: type[_StandInDecoder],
    caplog: pytest.LogCaptureFixture,
    perturbation: str,
) -> None:
    """The self-check catches a decoder that changes one slide's pixels: that slide is
    decoded on the CPU (its features are the CPU path's), the others stay on the device,
    and the fallback is logged and reported with the measured difference."""
    tiles = small_cohort["tiles"]
    store = TileStore(tiles)
    bad = OK_SLIDES[1]  # the 40x slide: read at factor 2, scaled-decoded on the CPU path
    stand_in.perturbed = _stored_streams(store.read(bad))
    stand_in.perturb = PERTURBATIONS[perturbation]
    with caplog.at_level(logging.WARNING, logger="histcode.embedding"):
        report = embed_store(
            tiles, tmp_path / "f.zarr", "tiny", batch_size=16, workers=0, progress=False
        )
    assert report.decode == "device"
    assert [f["slide_id"] for f in report.decode_fallbacks] == [bad]
    fallback = report.decode_fallbacks[0]
    assert (
        fallback["mean_abs"] > tiffjpeg.DEVICE_MEAN_TOLERANCE
        or fallback["max_abs"] > tiffjpeg.DEVICE_MAX_TOLERANCE
    ), fallback
    said = [r.getMessage() for r in caplog.records if "decoded on the CPU" in r.getMessage()]
    assert any(bad in m and "mean |Δ|" in m for m in said), said
    assert any(bad in w and "1 slide(s)" in w for w in report.warnings), report.warnings
    # the result line counts it, summary.json lists it
    outcome = _embed_outcome(report, "0/1")
    assert outcome.result["decode_fallbacks"] == 1
    assert outcome.details["decode_fallbacks"][0]["slide_id"] == bad
    # only the other slides' tiles were decoded on the device
    n_bad = len(store.read(bad).coords)
    assert report.tiles_decoded_on_device == report.tiles_embedded - n_bad > 0
    # the bad slide's features are those of the CPU path (scaled decoding and all); the
    # perturbed pixels never reached the encoder
    cpu = embed_store(
        tiles, tmp_path / "c.zarr", "tiny", batch_size=16, workers=0, decode="cpu",
        progress=False,
    )  # fmt: skip
    assert cpu.decode == "cpu"
    got, want = FeatureStore(tmp_path / "f.zarr"), FeatureStore(tmp_path / "c.zarr")
    np.testing.assert_allclose(
        got.read(bad).features, want.read(bad).features, rtol=1e-5, atol=1e-6
    )
    for sid in OK_SLIDES:
        if sid != bad:  # decoded on the device, faithfully: full decode and box average
            np.testing.assert_allclose(
                got.read(sid).features, _reference(tiles, sid, False), rtol=1e-4, atol=1e-5
            )


def test_decode_device_stops_before_embedding_a_slide_the_device_decodes_wrongly(
    small_cohort: dict, tmp_path: Path, stand_in: type[_StandInDecoder], capsys
) -> None:
    tiles = small_cohort["tiles"]
    bad = OK_SLIDES[2]
    stand_in.perturbed = _stored_streams(TileStore(tiles).read(bad))
    stand_in.perturb = PERTURBATIONS["plus20"]
    with pytest.raises(DecodeMismatchError, match=rf"{bad}.*mean \|Δ\|.*--decode cpu"):
        embed_store(tiles, tmp_path / "f.zarr", "tiny", workers=0, decode="device", progress=False)
    # nothing embedded
    store = FeatureStore(tmp_path / "f.zarr")
    assert all(store.status(sid) is None for sid in OK_SLIDES)
    # the command: exit 2 with the message
    argv = ["embed", "--tiles", str(tiles), "--encoder", "tiny", "--workers", "0"]
    code = cli_main([*argv, "--out", str(tmp_path / "g.zarr"), "--decode", "device"])
    err = capsys.readouterr().err
    assert code == 2 and bad in err and "--decode cpu" in err, err


def test_a_sampled_stored_tile_the_device_cannot_decode_sends_its_slide_to_the_cpu(
    small_cohort: dict, tmp_path: Path, stand_in: type[_StandInDecoder]
) -> None:
    tiles = small_cohort["tiles"]
    store = TileStore(tiles)
    sid = OK_SLIDES[0]
    t = store.read(sid)
    with open_slide(t.path) as reader:
        geometry = SlideGeometry.from_tiles(t)
        sampled = sample_stored_tiles(reader, geometry, t.coords, store.attrs["tile_size"])
        stand_in.fail.add(reader.stored_stream(geometry.level, sampled[-1]))
    report = embed_store(tiles, tmp_path / "f.zarr", "tiny", workers=0, progress=False)
    assert all(s["status"] == "ok" for s in report.slides if s["slide_id"] in OK_SLIDES)
    assert [f["slide_id"] for f in report.decode_fallbacks] == [sid]
    assert "cannot decode" in report.decode_fallbacks[0]["reason"]


def test_check_device_decode_measures_and_bounds_the_difference(small_cohort: dict) -> None:
    class Shifted:
        def __init__(self, by: int, shape: tuple | None = None, none: bool = False) -> None:
            self.by, self.shape, self.none = by, shape, none

        def decode(self, streams: list) -> list:
            import simplejpeg

            out = []
            for s in streams:
                a = simplejpeg.decode_jpeg(bytes(s), "RGB").astype(np.int16)
                a[:8, :8] += self.by  # one 8 × 8 block off by `by`
                a = np.clip(a, 0, 255).astype(np.uint8)
                out.append(None if self.none else a[: self.shape[0]] if self.shape else a)
            return out

    t = TileStore(small_cohort["tiles"]).read(OK_SLIDES[0])
    geometry = SlideGeometry.from_tiles(t)
    with open_slide(t.path) as reader:
        picked = sample_stored_tiles(reader, geometry, t.coords, 64)
        assert 1 <= len(picked) <= DECODE_CHECK_TILES and len(set(picked)) == len(picked)
        streams = [reader.stored_stream(geometry.level, k) for k in picked]
        reference = [reader.decode_stored(geometry.level, k) for k in picked]
    check = tiffjpeg.check_device_decode(Shifted(0), streams, reference)  # type: ignore[arg-type]
    assert check.ok and check.mean_abs == 0 and check.max_abs == 0
    assert check.tiles == len(picked)
    # a small local difference (decoder rounding at an edge) passes; a wrong block does not
    assert tiffjpeg.check_device_decode(Shifted(-30), streams, reference).ok  # type: ignore[arg-type]
    check = tiffjpeg.check_device_decode(Shifted(-120), streams, reference)  # type: ignore[arg-type]
    assert not check.ok and check.max_abs > tiffjpeg.DEVICE_MAX_TOLERANCE
    assert "max |Δ|" in check.describe() and "allowed" in check.describe()
    check = tiffjpeg.check_device_decode(Shifted(0, shape=(10,)), streams, reference)  # type: ignore[arg-type]
    assert not check.ok and "shape" in check.describe()
    check = tiffjpeg.check_device_decode(Shifted(0, none=True), streams, reference)  # type: ignore[arg-type]
    assert not check.ok and "cannot decode" in check.describe()
    # `histcode embed --help` quotes the bounds
    doc = " ".join((embed_store.__doc__ or "").split())
    assert f"mean |Δ| > {tiffjpeg.DEVICE_MEAN_TOLERANCE:g}" in doc
    assert f"max |Δ| > {tiffjpeg.DEVICE_MAX_TOLERANCE}" in doc


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
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # whatever this torch is built for
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
    assert not on and "nvidia-nvimgcodec-cu13" in why and "histcode[gpu]" in why
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a torch built for CUDA 12
    on, why = choose_decode("auto", torch.device("cuda"))
    assert not on and "nvidia-nvimgcodec-cu12" in why and "histcode[gpu-cu12]" in why
    with pytest.raises(ValueError) as refused:  # the hint once, not twice
        choose_decode("device", torch.device("cuda"))
    assert str(refused.value).count("gpu-cu12") == 1
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build: no extra would help yet
    assert "needs a torch built for CUDA 12 or 13" in choose_decode("auto", torch.device("cuda"))[1]
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
