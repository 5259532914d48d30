"""The direct JPEG-tiled TIFF reader against OpenSlide, scaled decoding, tile reuse, prefetch,
loader defaults and the start-up imports of ``histcode tile``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histcode.slide import SlideReader, open_slide
from histcode.tiffjpeg import TiffJpegReader

#: Max |Δ| (0–255) allowed between the direct reader and OpenSlide at full scale: both decode
#: with libjpeg-turbo (islow IDCT, fancy upsampling), so the pixels are equal (measured 0 on
#: every file below); 2 leaves room for a different libjpeg-turbo build's rounding.
FULL_TOLERANCE = 2
#: Scaled decoding (1/2 in the DCT domain) against OpenSlide's full-scale pixels averaged over
#: 2 × 2 blocks: the scaled IDCT is not a box filter, so edges differ by more than rounding
#: (measured on 40 windows of 448 px each: mean |Δ| 0.12–0.20, 99.9th percentile 5–9, max
#: 12–19 on the synthetic 40x SVS, generic TIFF and CMU-1).
SCALED_MEAN_TOLERANCE = 0.5
SCALED_P999_TOLERANCE = 12
SCALED_MAX_TOLERANCE = 32

CMU1 = Path(os.environ.get("HISTCODE_CMU1", "/work/shared/data/CMU-1-Small-Region.svs"))


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from histcode.synth import write_test_slide

    root = tmp_path_factory.mktemp("tiffjpeg")
    out = {
        "svs40": root / "s40.svs",
        "svs20": root / "s20.svs",
        "tiff": root / "g.tiff",
    }
    write_test_slide(out["svs40"], width_um=900, height_um=700, mpp=0.25, seed=1)
    write_test_slide(out["svs20"], width_um=1800, height_um=1400, mpp=0.5, seed=2)
    write_test_slide(out["tiff"], width_um=900, height_um=700, mpp=0.25, fmt="tiff", seed=3)
    return out


def _slide(slides: dict[str, Path], name: str) -> Path:
    if name == "cmu1":
        if not CMU1.is_file():
            pytest.skip(
                f"{CMU1} is absent (the real CMU-1-Small-Region.svs, CC0; set HISTCODE_CMU1)"
            )
        return CMU1
    return slides[name]


def _windows(reader: SlideReader, level: int, n: int, seed: int) -> list[tuple]:
    """Random windows of a level, some hanging over its edges, corners on its pixels."""
    rng = np.random.default_rng(seed)
    w, h = reader.level_dimensions[level]
    ds = reader.level_downsamples[level]
    out = []
    for _ in range(n):
        size = (int(rng.integers(1, 520)), int(rng.integers(1, 520)))
        x, y = int(rng.integers(-64, w)), int(rng.integers(-64, h))
        out.append(((round(x * ds), round(y * ds)), size))
    return out


@pytest.mark.parametrize("name", ["svs40", "svs20", "tiff", "cmu1"])
def test_same_pixels_as_openslide(slides: dict[str, Path], name: str) -> None:
    path = _slide(slides, name)
    with SlideReader(path) as ref, open_slide(path) as fast:
        assert isinstance(fast, TiffJpegReader), getattr(fast, "fallback_reason", "")
        worst = 0
        for level in range(ref.level_count):
            if not fast.is_fast(level):
                continue
            for loc, size in _windows(ref, level, 25, seed=level):
                a = ref.read_region(loc, level, size).astype(np.int16)
                b = fast.read_region(loc, level, size).astype(np.int16)
                assert a.shape == b.shape
                worst = max(worst, int(np.abs(a - b).max()))
        assert fast.is_fast(0)
        assert worst <= FULL_TOLERANCE, f"{name}: max |Δ| {worst}"


@pytest.mark.parametrize("name", ["svs40", "tiff", "cmu1"])
def test_scaled_decode_within_tolerance(slides: dict[str, Path], name: str) -> None:
    path = _slide(slides, name)
    rng = np.random.default_rng(7)
    with SlideReader(path) as ref, open_slide(path) as fast:
        w, h = ref.dimensions
        diffs = []
        for _ in range(12):
            x = int(rng.integers(0, w - 448)) // 2 * 2
            y = int(rng.integers(0, h - 448)) // 2 * 2
            box = np.asarray(Image.fromarray(ref.read_region((x, y), 0, (448, 448))).reduce(2))
            half = fast.read_region_scaled((x, y), 0, (448, 448), 2)
            assert half is not None and half.shape == (224, 224, 3)
            diffs.append(np.abs(box.astype(np.int16) - half.astype(np.int16)))
        d = np.stack(diffs)
        assert d.mean() <= SCALED_MEAN_TOLERANCE, d.mean()
        assert np.percentile(d, 99.9) <= SCALED_P999_TOLERANCE
        assert d.max() <= SCALED_MAX_TOLERANCE
        # an odd corner cannot be decoded at half scale: the caller resizes instead
        assert fast.read_region_scaled((x + 1, y), 0, (448, 448), 2) is None


def test_read_tile_decodes_at_half_scale_and_reuses_stored_tiles(slides: dict[str, Path]) -> None:
    from histcode.tilereader import SlideGeometry, read_tile

    with open_slide(slides["svs40"]) as reader:
        assert isinstance(reader, TiffJpegReader)
        geometry = SlideGeometry("s40", str(slides["svs40"]), 0, 448)
        # a row of 4 adjacent 448 px windows on 256 px stored tiles: 4 × 9 = 36 reads of
        # stored tiles, but only the 3 rows × 7 columns they cover are decoded once
        tiles = [read_tile(reader, geometry, (448 * i, 448), 224) for i in range(4)]
        assert all(t.shape == (224, 224, 3) for t in tiles)
        assert reader.decoded_tiles == 3 * 7
        assert all(scale == 2 for _, _, scale in reader._cache)  # decoded at half scale
        full = read_tile(reader, geometry, (448, 448), 224, scaled_decode=False)
        assert np.abs(full.astype(int) - tiles[1].astype(int)).mean() <= SCALED_MEAN_TOLERANCE


def test_windows_of_one_stored_tile_are_decoded_into_the_output(slides: dict[str, Path]) -> None:
    """256 px tiles on 256 px stored tiles: each decoded straight into the array returned
    (no LRU entry, no copy), with the pixels of the cached path and of OpenSlide."""
    path = slides["svs20"]
    with SlideReader(path) as ref, open_slide(path) as fast, open_slide(path) as cached:
        assert isinstance(fast, TiffJpegReader) and isinstance(cached, TiffJpegReader)
        lv = fast._levels[0]
        assert lv is not None and (lv.tile_width, lv.tile_height) == (256, 256)
        corners = [(256 * i, 256 * j) for i in range(3) for j in range(2)]
        for x, y in corners:
            a = fast.read_region((x, y), 0, (256, 256))
            # one pixel wider: the general path, through the LRU of decoded tiles
            b = cached.read_region((x, y), 0, (257, 256))[:, :256]
            assert a.flags.c_contiguous and a.flags.writeable and a.base is None
            assert np.array_equal(a, b)
            diff = np.abs(a.astype(np.int16) - ref.read_region((x, y), 0, (256, 256)))
            assert diff.max() <= FULL_TOLERANCE
        assert fast.decoded_tiles == len(corners) and not fast._cache
        # the 257 px windows covered columns 0-3 of rows 0-1; one of those, asked again as an
        # aligned window, is copied from the LRU, not decoded again
        assert cached.decoded_tiles == 8
        a = cached.read_region((256, 0), 0, (256, 256))
        assert cached.decoded_tiles == 8
        assert np.array_equal(a, fast.read_region((256, 0), 0, (256, 256)))
        # at half scale (a 256 px window of one stored tile → 128 px)
        half = fast.read_region_scaled((512, 256), 0, (256, 256), 2)
        via_cache = cached.read_region_scaled((512, 256), 0, (258, 256), 2)
        assert half is not None and via_cache is not None
        assert np.array_equal(half, via_cache[:, :128])


def test_a_missing_stored_tile_reads_as_glass(slides: dict[str, Path]) -> None:
    """A stored tile with byte count 0 (TIFF's missing tile) is the slide's background, in
    an aligned window (decoded into the output) and in a window across it (copied)."""
    with open_slide(slides["svs20"]) as reader:
        assert isinstance(reader, TiffJpegReader)
        lv = reader._levels[0]
        assert lv is not None
        lv.bytecounts[lv.tiles_across + 1] = 0  # stored tile (1, 1): x, y 256-511
        glass = np.broadcast_to(np.asarray(reader.background, np.uint8), (256, 256, 3))
        assert np.array_equal(reader.read_region((256, 256), 0, (256, 256)), glass)
        window = reader.read_region((128, 128), 0, (256, 256))
        assert np.array_equal(window[128:, 128:], glass[:128, :128])
        assert not np.array_equal(window[:128, :128], glass[:128, :128])
        assert reader.decoded_tiles == 3  # (0, 0), (0, 1), (1, 0)


def test_auto_reader_falls_back_to_openslide_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import tifffile

    # a tiled TIFF with LZW tiles: OpenSlide reads it, the direct reader does not
    path = tmp_path / "lzw.tiff"
    pixels = np.random.default_rng(0).integers(0, 255, (600, 700, 3), np.uint8)
    tifffile.imwrite(
        path,
        pixels,
        tile=(256, 256),
        compression="lzw",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
        photometric="rgb",
    )
    with caplog.at_level(logging.INFO, logger="histcode.slide"):
        reader = open_slide(path)
    with reader:
        assert type(reader) is SlideReader
        assert reader.read_region((0, 0), 0, (700, 600)).tolist() == pixels.tolist()
    assert "read with OpenSlide" in caplog.text and "compression LZW" in caplog.text


def test_next_slide_is_opened_while_the_last_tiles_are_read(small_cohort: dict) -> None:
    from histcode.tilereader import TileDataset, TileIndex

    index = TileIndex(small_cohort["tiles"])
    assert len(index.slides) >= 2
    dataset = TileDataset(index, prefetch=4)
    last = int(index.offsets[1]) - 1
    dataset[last - 5]
    assert not dataset.cache.is_open(index.slides[1].path)
    dataset[last]  # within 4 tiles of the end of slide 0: slide 1 is being opened
    assert dataset.cache.is_open(index.slides[1].path)
    first_of_next = dataset[last + 1]
    assert first_of_next.shape == (3, index.tile_size, index.tile_size)
    dataset.cache.close()


def test_loader_defaults_follow_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from histcode.tilereader import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    assert default_workers(cuda=True) == 7
    assert default_workers(cuda=False) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert default_workers(cuda=True) == 1 and default_workers(cuda=False) == 1


def test_embed_pins_memory_and_defaults_workers_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader embed builds: workers from the cores, pin_memory on CUDA (no GPU needed)."""
    import inspect

    from histcode import embedding

    assert inspect.signature(embedding.embed).parameters["workers"].default is None
    source = inspect.getsource(embedding._embed_slides)
    assert "pin_memory=cuda" in source


@pytest.mark.parametrize("argv", [["tile", "--help"]])
def test_tile_cli_does_not_import_torch(argv: list[str]) -> None:
    code = (
        "import sys, contextlib, io\n"
        "from histcode.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'torchvision', 'lightning', 'pytorch_lightning', "
        "'histcode.finetune', 'histcode.pretrain') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_tile_one_slide_does_not_import_torch(slides: dict[str, Path], tmp_path: Path) -> None:
    code = (
        "import sys, contextlib, io\n"
        "from histcode.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main(['tile', '--slides', {str(slides['svs20'])!r}, '--out', "
        f"{str(tmp_path / 't.zarr')!r}, '--workers', '1'])\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "print('HEAVY', [m for m in ('torch', 'torchvision') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.gpu
def test_device_decode_matches_cpu(slides: dict[str, Path]) -> None:
    from histcode.tiffjpeg import device_decoder_available

    ok, why = device_decoder_available()
    if not ok:
        pytest.skip(why)
    from histcode.tiffjpeg import decode_on_device

    with open_slide(slides["svs40"]) as reader:
        assert isinstance(reader, TiffJpegReader)
        lv = reader._levels[0]
        streams = [reader.stored_stream(0, i) for i in range(4)]
        cpu = [reader._decode_stream(s, lv, 1, 0, i) for i, s in enumerate(streams)]
        gpu = decode_on_device(streams)
        for a, b in zip(cpu, gpu, strict=True):
            assert np.abs(a.astype(int) - b.cpu().numpy().astype(int)).max() <= 8
