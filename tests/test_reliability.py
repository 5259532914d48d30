"""Reliability, part 1: bad input gives a clear error, the right exit, no damage.

Every row of :data:`CASES` runs the real CLI (``histcode.cli.main``, the console script's
function; rows with ``process=True`` run it in a child process) against copies of outputs
written before the case — a tile store, a feature store, a registry holding an encoder and a
MIL model, a finished finetune run — and checks three things:

* the exit status (the CLI contract: 0 ok, 1 some inputs failed and the rest completed,
  2 unusable arguments or inputs);
* the message: ``says`` are substrings of what the run printed or logged, naming the file,
  row or key and saying how to fix it;
* nothing already written is damaged: every file of those outputs is byte-identical after the
  run, except that the one output a row ``writes`` may gain slides and a new ``summary.json``.

Interruption (``kill -9``) and concurrency are in ``test_reliability_interrupt.py``.
:func:`test_every_fault_of_the_issue_has_a_case` maps each fault of :data:`FAULTS` (bad input,
interruption, concurrency) to the cases that try it, so a fault without a case fails the suite.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import tifffile
import torch

from histcode.cli import main as cli_main
from histcode.embedding import embed_store
from histcode.encoders import create_encoder, encoder_card
from histcode.featurestore import FeatureStore
from histcode.finetune.heads import build_slide_model
from histcode.finetune.pipeline import lineage
from histcode.registry import Card, Registry
from histcode.synth import write_test_slide
from histcode.tilestore import TileStore
from histcode.tiling import TilingParams, tile_slides
from tests.finetune.finetune_cohort import SignalCohort, write_signal_cohort
from tests.histcode.recoloured_slides import write_recoloured

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIGS = ROOT / "histcode" / "configs" / "pretrain"
FINETUNE_CONFIGS = ROOT / "histcode" / "configs" / "finetune"
S1, S2, S3 = "TCGA-S1-0001-01A-01-TS1", "TCGA-S2-0002-11A-01-TS1", "TCGA-S3-0003-01A-01-TS1"

# -- what exists before every case ----------------------------------------------------------------


@dataclass
class World:
    """Inputs and outputs written once; each case works on copies of the outputs.

    Attributes:
        slides: the three good slides of ``small_cohort`` by id.
        bad: bad slide files by kind (corrupt, notes, blank, nompp, damaged, dotdot, and
            S1 as a fluorescence scan and as YCbCr decoded as RGB: fluorescence, ycbcr).
        tiles: a tile store of ``small_cohort`` (three ok slides and the failed ``broken``).
        blank_tiles: a tile store whose only slide is blank (``empty``).
        no_slides_tiles: a tile store without any slide.
        features: ``tiles`` embedded by the registry encoder ``enc@1``.
        registry: ``enc@1`` (a tiny encoder for 1 µm/px, 64 px), ``ft@1`` (a MIL model) and
            ``hm@1`` (an untrained MIL model on ``features``, for heatmaps).
        cohort: the finetune inputs (feature store, labels CSV, expression matrix).
        ft_run: the output folder of the finetune run that registered ``ft@1``.
    """

    slides: dict[str, Path]
    bad: dict[str, Path]
    tiles: Path
    blank_tiles: Path
    no_slides_tiles: Path
    features: Path
    registry: Path
    cohort: SignalCohort
    ft_run: Path


def _damage_level0(src: Path, dst: Path) -> None:
    """Copy a slide and zero the second half of its level-0 tile data, as a bad copy would."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    start = offsets[len(offsets) // 2]
    with open(dst, "r+b") as f:
        f.seek(start)
        f.write(b"\0" * (offsets[-1] + counts[-1] - start))


def finetune_args(
    out: Path, registry: Path, cohort: SignalCohort, *, labels: Path | None = None
) -> list[str]:
    """A short two-fold finetune run on ``cohort`` (append options to change it)."""
    return [
        "finetune",
        "--config", str(FINETUNE_CONFIGS / "deg.yaml"),
        "--config", str(FINETUNE_CONFIGS / "cpu_smoke.yaml"),
        "--features", str(cohort.features),
        "--labels", str(labels or cohort.labels),
        "--expression", str(cohort.expression),
        "--name", "ft",
        "--out", str(out),
        "--registry", str(registry),
        "--cv.folds", "2",
        "--trainer.max_epochs", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def world(small_cohort: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("reliability")
    slides = {p.name.split(".")[0]: p for p in small_cohort["slides"].glob("TCGA-*")}
    bad_dir = root / "bad"
    bad_dir.mkdir()
    good = slides[S1]
    bad = {
        "corrupt": bad_dir / "corrupt.svs",
        "notes": bad_dir / "notes.svs",
        "blank": bad_dir / "blank.svs",
        "nompp": bad_dir / "nompp.tiff",
        "damaged": bad_dir / "damaged.svs",
        "dotdot": bad_dir / "...svs",  # its id would be ".."
        "fluorescence": bad_dir / "fluorescence.svs",
        "ycbcr": bad_dir / "ycbcr.svs",
    }
    data = good.read_bytes()
    bad["corrupt"].write_bytes(data[: len(data) * 95 // 100])  # a copy cut short
    bad["notes"].write_text("patient notes, not an image\n")
    size = {"width_um": 1200, "height_um": 1000, "mpp": 0.5}
    write_test_slide(bad["blank"], seed=5, blank=True, **size)
    write_test_slide(bad["nompp"], seed=6, fmt="tiff", write_mpp=False, **size)
    _damage_level0(good, bad["damaged"])
    shutil.copy(good, bad["dotdot"])
    write_recoloured(good, bad["fluorescence"], "fluorescence")
    write_recoloured(good, bad["ycbcr"], "ycbcr")

    tiles = root / "tiles.zarr"
    shutil.copytree(small_cohort["tiles"], tiles)
    params = TilingParams(mpp=1.0, tile_size=64)
    tile_slides([bad["blank"]], root / "blank_tiles.zarr", params, progress=False)
    TileStore(root / "no_slides.zarr").initialise({"mpp": 1.0, "tile_size": 64})

    registry = Registry(root / "registry")
    torch.manual_seed(0)
    encoder = create_encoder("tiny", mpp=1.0, tile_size=64)
    registry.save("enc", encoder, encoder_card(encoder))
    features = root / "features.zarr"
    embed_store(tiles, features, "enc@1", registry=str(registry.root), workers=0, progress=False)
    dim = int(FeatureStore(features).attrs["embed_dim"])
    mil = build_slide_model("abmil", in_dim=dim, hidden=8, n_genes=1)
    arguments = {"in_dim": dim, "hidden": 8, "dropout": 0.25, "tumour": True, "n_genes": 1}
    card = Card(
        kind="mil",
        architecture="abmil",
        arguments={**arguments, "options": {}},
        parents=lineage(FeatureStore(features)),
        extra={"genes": ["MYC"]},
    )
    registry.save("hm", mil, card)

    cohort = write_signal_cohort(root / "cohort", n_patients=12, dim=16, tiles=(10, 30))
    ft_run = root / "ft_run"
    argv = finetune_args(ft_run, registry.root, cohort)
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main([*argv, "--data.genes", "MYC", "CD8A"]) == 0
    assert registry.versions("ft") == [1] and (ft_run / "predictions.csv").is_file()
    return World(
        slides=slides,
        bad=bad,
        tiles=tiles,
        blank_tiles=root / "blank_tiles.zarr",
        no_slides_tiles=root / "no_slides.zarr",
        features=features,
        registry=registry.root,
        cohort=cohort,
        ft_run=ft_run,
    )


@dataclass
class Ctx:
    """One case's workspace: copies of the world's outputs, and a folder for its own files."""

    world: World
    tmp: Path
    tiles: Path
    features: Path
    registry: Path
    ft_run: Path

    def outputs(self) -> dict[str, Path]:
        """The outputs that must not be damaged, by name."""
        return {
            "tiles": self.tiles,
            "features": self.features,
            "registry": self.registry,
            "ft_run": self.ft_run,
        }

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path


@pytest.fixture()
def ctx(world: World, tmp_path: Path) -> Ctx:
    copies = {}
    for name in ("tiles", "features", "registry", "ft_run"):
        copies[name] = tmp_path / "outputs" / name
        shutil.copytree(getattr(world, name), copies[name])
    work = tmp_path / "work"
    work.mkdir()
    return Ctx(world, work, **copies)


# -- argv builders --------------------------------------------------------------------------------


def tile(c: Ctx, *slides: Path | str, extra: tuple[str, ...] = ()) -> list[str]:
    """``histcode tile`` of ``slides`` into the case's copy of the tile store."""
    return [
        "tile", "--slides", *map(str, slides), "--out", str(c.tiles),
        "--mpp", "1.0", "--tile_size", "64", "--progress", "false", *extra,
    ]  # fmt: skip


def embed(c: Ctx, *extra: str, tiles: Path | None = None) -> list[str]:
    """``histcode embed`` with the registry encoder into the case's copy of the feature store."""
    return [
        "embed", "--tiles", str(tiles or c.tiles), "--out", str(c.features),
        "--encoder", "enc@1", "--registry", str(c.registry), "--workers", "0",
        "--progress", "false", *extra,
    ]  # fmt: skip


def pretrain(c: Ctx, *extra: str, tiles: Path | None = None) -> list[str]:
    """A CPU smoke ``histcode pretrain`` (run folder in the case's folder)."""
    return [
        "pretrain",
        "--config", str(PRETRAIN_CONFIGS / "simclr.yaml"),
        "--config", str(PRETRAIN_CONFIGS / "cpu_smoke.yaml"),
        "--data.tiles", str(tiles or c.tiles),
        "--name", "enc",
        "--registry", str(c.registry),
        "--out", str(c.tmp / "pretrain_run"),
        "--trainer.max_steps", "2",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def finetune(c: Ctx, *extra: str, labels: Path | None = None) -> list[str]:
    """``histcode finetune`` writing into the case's copy of the finished run's folder."""
    return [*finetune_args(c.ft_run, c.registry, c.world.cohort, labels=labels), *extra]


def labels_with(c: Ctx, name: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    """A copy of the cohort's labels CSV changed by ``change``."""
    frame = change(pd.read_csv(c.world.cohort.labels))
    frame.to_csv(c.tmp / name, index=False)
    return c.tmp / name


def flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def set_value(frame: pd.DataFrame, row: int, column: str, value: object) -> pd.DataFrame:
    frame = frame.astype({column: object})
    frame.loc[row, column] = value
    return frame


def nan_expression(c: Ctx) -> Path:
    frame = pd.read_csv(c.world.cohort.expression, sep="\t")
    frame = set_value(frame, 0, "TCGA-S1-0001-01A", float("nan"))  # MYC of a tumour sample
    frame.to_csv(c.tmp / "nan.tsv", sep="\t", index=False)
    return c.tmp / "nan.tsv"


def damaged_slide_in_store(c: Ctx) -> list[str]:
    """Point the tile store's S1 at a damaged copy of its slide, and drop S1's features."""
    damaged = c.tmp / f"{S1}.svs"
    _damage_level0(c.world.slides[S1], damaged)
    store = TileStore(c.tiles)
    t = store.read(S1)
    store.write(S1, {**t.attrs, "path": str(damaged)}, t.coords, t.tissue)
    shutil.rmtree(c.features / S1)
    return embed(c)


def replace_option(argv: list[str], option: str, value: Path | str) -> list[str]:
    """``argv`` with the value of ``option`` replaced."""
    argv = list(argv)
    argv[argv.index(option) + 1] = str(value)
    return argv


def empty_features(c: Ctx) -> Path:
    store = FeatureStore(c.tmp / "empty_features.zarr")
    store.initialise({"encoder_ref": "enc@1", "embed_dim": 16})
    return store.path


def tamper(c: Ctx, file: str = "weights.safetensors") -> None:
    """Change ``enc@1``'s weights (a flipped byte) or cut its card short."""
    path = c.registry / "enc" / "1" / file
    if file == "card.json":
        path.write_text('{"name": "enc", "ver')
    else:
        flip_byte(path)


def tampered(c: Ctx, argv: list[str], file: str = "weights.safetensors") -> list[str]:
    tamper(c, file)
    return argv


def heatmap(c: Ctx, slide: Path | str) -> list[str]:
    """``histcode heatmap`` of ``slide`` with ``hm@1`` over the case's copy of the features."""
    return [
        "heatmap", "--model", "hm@1", "--features", str(c.features), "--slide", str(slide),
        "--out", str(c.tmp / "maps"), "--registry", str(c.registry),
    ]  # fmt: skip


def another_scan(c: Ctx) -> Path:
    """S2's slide file under S1's name: the id matches the store, the scan does not."""
    path = c.tmp / f"{S1}.svs"
    shutil.copy(c.world.slides[S2], path)
    return path


def binary_file(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 4)
    return path


def bad_config(c: Ctx, text: str) -> Path:
    return c.write("bad.yaml", text)


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input and what the CLI must do with it.

    Attributes:
        name: the case id (``command/what``).
        fault: the fault it tries (a key of :data:`FAULTS`).
        argv: builds the arguments (and any bad file) in the case's workspace.
        exit: the exit status the CLI contract asks for.
        says: substrings of the output and log: what is wrong (the file, row or key) and how
            to fix it.
        writes: the output the run may add to (``tiles`` or ``features``); all others, and
            everything already in this one, must stay byte-identical.
        statuses: slide statuses expected in ``writes`` afterwards.
        process: run the console script in a child process instead of in-process.
    """

    name: str
    fault: str
    argv: Callable[[Ctx], list[str]]
    exit: int
    says: tuple[str, ...]
    writes: str | None = None
    statuses: dict[str, str] = field(default_factory=dict)
    process: bool = False


# fmt: off
CASES: list[Case] = [
    # -- slides --------------------------------------------------------------------------------
    Case(
        "tile/corrupt-slide", "corrupt slide",
        lambda c: tile(c, c.world.slides[S1], c.world.bad["corrupt"]),
        1, ("corrupt.svs", "corrupt or truncated", "Re-export or re-copy it"),
        writes="tiles", statuses={S1: "ok", "corrupt": "failed"}, process=True,
    ),
    Case(
        "tile/not-a-slide", "not-a-slide",
        lambda c: tile(c, c.world.bad["notes"], c.world.slides[S2]),
        1, ("notes.svs", "not a slide OpenSlide can read", "Check that it is a whole-slide image"),
        writes="tiles", statuses={S2: "ok", "notes": "failed"},
    ),
    Case(
        "tile/blank-slide", "blank slide",
        lambda c: tile(c, c.world.bad["blank"]),
        0, ("blank.svs", "no tissue found", "recorded as empty", "lower --min_tissue"),
        writes="tiles", statuses={"blank": "empty"},
    ),
    Case(
        "tile/damaged-tile-data", "damaged tile data",
        lambda c: tile(c, c.world.bad["damaged"], c.world.slides[S3]),
        1, ("damaged.svs", "the file is damaged. Re-export or re-copy it"),
        writes="tiles", statuses={"damaged": "failed", S3: "ok"},
    ),
    Case(
        "embed/damaged-tile-data", "damaged tile data",
        damaged_slide_in_store,
        1, (f"{S1}.svs", "the file is damaged. Re-export or re-copy it"),
        writes="features", statuses={S1: "failed", S2: "ok", S3: "ok", "broken": "failed"},
    ),
    Case(
        "tile/missing-mpp", "missing µm/px",
        lambda c: tile(c, c.world.bad["nompp"]),
        1, ("nompp.tiff", "no usable µm/px", "pass it with --mpp_override"),
        writes="tiles", statuses={"nompp": "failed"},
    ),
    Case(
        "tile/fluorescence-slide", "fluorescence or mis-decoded slide",
        lambda c: tile(c, c.world.bad["fluorescence"], c.world.slides[S2]),
        1, ("fluorescence.svs: not a brightfield H&E scan", "background_bright: background RGB",
            "tissue_absorbs: median tissue OD -", "tile it anyway with --brightfield_qc warn"),
        writes="tiles", statuses={S2: "ok", "fluorescence": "failed"},
    ),
    Case(
        "tile/ycbcr-decoded-as-rgb", "fluorescence or mis-decoded slide",
        lambda c: tile(c, c.world.bad["ycbcr"]),
        1, ("ycbcr.svs: not a brightfield H&E scan", "background_neutral: background RGB",
            "tissue_h_and_e: median angle", "Re-export mis-decoded colours as RGB"),
        writes="tiles", statuses={"ycbcr": "failed"},
    ),
    Case(
        "tile/mpp-csv-not-a-number", "malformed µm/px CSV",
        lambda c: tile(c, c.world.slides[S1], extra=(
            "--mpp_csv", str(c.write("mpp.csv", f"slide,mpp\n{S1},0.25 µm\n")))),
        2, ("mpp.csv, line 2: µm/px '0.25 µm' is not a number", "Expected rows of 'slide,mpp'"),
    ),
    Case(
        "tile/mpp-csv-slide-not-in-run", "malformed µm/px CSV",
        lambda c: tile(c, c.world.slides[S1], extra=(
            "--mpp_csv", str(c.write("mpp.csv", "TCGA-S9-0999-01A-01-TS1,0.25\n")))),
        2, ("mpp.csv, line 1: 'TCGA-S9-0999-01A-01-TS1' is not a slide of this run",
            "or remove the row"),
    ),
    Case(
        "tile/slide-id-would-escape", "slide id escaping the output folder",
        lambda c: tile(c, c.world.bad["dotdot"]),
        2, ("...svs", "slide id '..' cannot name an output", "Rename the file"),
    ),
    Case(
        "tile/other-settings-than-the-store", "config with a wrong value",
        lambda c: tile(c, c.world.slides[S1], extra=("--tile_size", "32")),
        2, ("tile_size=64 in the store but 32 asked", "Use another --out, or --overwrite"),
    ),
    Case(
        "tile/out-is-a-file", "config with a wrong value",
        lambda c: ["tile", "--slides", str(c.world.slides[S1]), "--out",
                   str(c.write("tiles.zarr", "x"))],
        2, ("tiles.zarr exists and is not a folder", "choose another --out"),
    ),
    # -- empty stores --------------------------------------------------------------------------
    Case(
        "embed/empty-tile-store", "empty tile store",
        lambda c: embed(c, tiles=c.world.no_slides_tiles),
        2, ("no_slides.zarr holds no slides", "histcode tile --slides"),
    ),
    Case(
        "pretrain/tile-store-without-tiles", "empty tile store",
        lambda c: pretrain(c, tiles=c.world.blank_tiles),
        2, ("blank_tiles.zarr holds no tiles of 'ok' slides", "tile some slides"),
    ),
    Case(
        "finetune/empty-feature-store", "empty feature store",
        lambda c: replace_option(finetune(c), "--features", empty_features(c)),
        2, ("empty_features.zarr holds no slide with usable features", "histcode embed"),
    ),
    # -- stores that do not fit ----------------------------------------------------------------
    Case(
        "embed/store-from-another-encoder", "feature store from another encoder",
        lambda c: replace_option(embed(c), "--encoder", "resnet18"),
        2, ("holds other features", "its encoder is 'registry:enc@1'",
            "Use another --out, or --overwrite"),
    ),
    Case(
        "finetune/tile-store-as-features", "feature store from another encoder",
        lambda c: replace_option(finetune(c), "--features", c.tiles),
        2, ("is a 'histcode.tiles' store, not a 'histcode.features' store", "histcode embed"),
    ),
    # -- labels, expression, genes -------------------------------------------------------------
    Case(
        "finetune/labels-with-unknown-ids", "labels with unknown ids",
        lambda c: finetune(
            c, labels=labels_with(c, "unknown.csv", lambda f: f.assign(slide_id="X" + f.slide_id))
        ),
        2, ("no slide has both features and labels", "XTCGA-S1-0001-01A-01-TS1",
            "Slide ids must be the slide files' stems"),
    ),
    Case(
        "finetune/labels-with-some-unknown-ids", "labels with unknown ids",
        lambda c: [
            *finetune(c, labels=labels_with(c, "some.csv", lambda f: set_value(
                f, 4, "slide_id", "TCGA-S9-0999-01A-01-TS1"))),
            "--out", str(c.tmp / "partial_run"), "--cv.register", "none",
            "--data.genes", "MYC",
        ],
        1, ('"failed_slides": ["TCGA-S9-0999-01A-01-TS1"]', "run histcode embed on them"),
    ),
    Case(
        "finetune/labels-with-duplicate-ids", "labels with duplicate ids",
        lambda c: finetune(
            c, labels=labels_with(c, "dupes.csv", lambda f: pd.concat([f, f.iloc[[3]]]))
        ),
        2, ("dupes.csv lists slides more than once", "TCGA-S2-0002-01A-01-TS1 (line 5)",
            "keep one row per slide"),
    ),
    Case(
        "finetune/labels-id-would-escape", "slide id escaping the output folder",
        lambda c: finetune(
            c, labels=labels_with(c, "escape.csv", lambda f: set_value(f, 2, "slide_id", "../x"))
        ),
        2, ("escape.csv", "'../x' (line 4)", "slide file's name without extension",
            "fix those rows"),
    ),
    Case(
        "finetune/expression-with-nan", "NaN expression",
        lambda c: replace_option(finetune(c), "--expression", nan_expression(c)),
        2, ("nan.tsv has 1 missing or infinite (NaN/empty/inf) value",
            "MYC/TCGA-S1-0001-01A", "Fill them, or drop those genes or samples"),
    ),
    Case(
        "finetune/unknown-genes", "gene list with unknown genes",
        lambda c: finetune(c, "--data.genes", "MYCC", "NOTAGENE"),
        2, ("2 gene(s) are not in expression matrix", "MYCC (did you mean MYC?)", "NOTAGENE",
            "Remove them from --data.genes"),
    ),
    Case(
        "finetune/gene-file-with-unknown-genes", "gene list with unknown genes",
        lambda c: finetune(c, "--data.genes_file", str(c.write("genes.txt", "MYC\nNOTAGENE\n"))),
        2, ("1 gene(s) are not in expression matrix", "NOTAGENE",
            "Remove them from the gene list", "genes.txt"),
    ),
    Case(
        "finetune/labels-not-text", "unreadable input file",
        lambda c: finetune(c, labels=binary_file(c.tmp / "labels.csv")),
        2, ("labels.csv is not UTF-8 text", "save it as a CSV or TSV file in UTF-8"),
    ),
    Case(
        "finetune/expression-without-genes", "unreadable input file",
        lambda c: replace_option(
            finetune(c), "--expression", c.write("genes.tsv", "gene\tTCGA-S1-0001-01A\n")
        ),
        2, ("genes.tsv has no gene rows", "expected a genes × samples table"),
    ),
    Case(
        "finetune/registry-is-a-file", "registry folder that is a file",
        lambda c: replace_option(finetune(c), "--registry", c.write("registry", "")),
        2, ("registry is a file, not a folder", "pass another registry folder"),
    ),
    Case(
        "pretrain/registry-is-a-file", "registry folder that is a file",
        lambda c: replace_option(pretrain(c), "--registry", c.write("registry", "")),
        2, ("registry is a file, not a folder", "pass another registry folder"),
    ),
    # -- names that would escape ---------------------------------------------------------------
    Case(
        "finetune/name-would-escape", "slide id escaping the output folder",
        lambda c: [*finetune(c), "--name", "../x"],
        2, ("invalid checkpoint name '../x'", "with no '/', '@' or '..'"),
    ),
    Case(
        "pretrain/name-would-escape", "slide id escaping the output folder",
        lambda c: [*pretrain(c), "--name", "../x"],
        2, ("invalid checkpoint name '../x'", "with no '/', '@' or '..'"),
    ),
    Case(
        "registry/ref-would-escape", "slide id escaping the output folder",
        lambda c: ["registry", "show", "../x@1", "--root", str(c.registry)],
        2, ("invalid checkpoint name '../x'", "with no '/', '@' or '..'"),
    ),
    # -- configs -------------------------------------------------------------------------------
    Case(
        "tile/config-unknown-key", "config with an unknown key",
        lambda c: [*tile(c, c.world.slides[S1]), "--config",
                   str(bad_config(c, "mpp: 1.0\ntile_sizes: 64\n"))],
        2, ("Option 'tile_sizes' is not accepted", "Did you mean 'tile_size'?"), process=True,
    ),
    Case(
        "tile/config-wrong-type", "config with a wrong type",
        lambda c: [*tile(c, c.world.slides[S1]), "--config",
                   str(bad_config(c, "tile_size: large\n"))],
        2, ('Parser key "tile_size"', "Expected a <class 'int'>. Got value: large"),
    ),
    Case(
        "embed/config-unknown-key", "config with an unknown key",
        lambda c: [*embed(c), "--config", str(bad_config(c, "batchsize: 8\n"))],
        2, ("Option 'batchsize' is not accepted", "Did you mean 'batch_size'?"),
    ),
    Case(
        "embed/config-wrong-type", "config with a wrong type",
        lambda c: [*embed(c), "--config", str(bad_config(c, "batch_size: [8]\n"))],
        2, ('Parser key "batch_size"', "Expected a <class 'int'>"),
    ),
    Case(
        "pretrain/config-unknown-key", "config with an unknown key",
        lambda c: [*pretrain(c), "--config", str(bad_config(c, "trainer:\n  max_step: 5\n"))],
        2, ("Group 'trainer' does not accept option 'max_step'",
            "Did you mean 'trainer.max_steps'?"),
    ),
    Case(
        "pretrain/config-wrong-type", "config with a wrong type",
        lambda c: [*pretrain(c), "--config", str(bad_config(c, "data:\n  batch_size: lots\n"))],
        2, ('Parser key "data.batch_size"', "Expected a <class 'int'>. Got value: lots"),
    ),
    Case(
        "finetune/config-unknown-key", "config with an unknown key",
        lambda c: [*finetune(c), "--config", str(bad_config(c, "cv:\n  fold: 3\n"))],
        2, ("Group 'cv' does not accept option 'fold'", "Did you mean 'cv.folds'?"),
    ),
    Case(
        "finetune/config-wrong-type", "config with a wrong type",
        lambda c: [*finetune(c), "--config", str(bad_config(c, "cv:\n  folds: three\n"))],
        2, ('Parser key "cv.folds"', "Expected a <class 'int'>. Got value: three"),
    ),
    # -- heatmaps of a slide that is not there, or not the one tiled ---------------------------
    Case(
        "heatmap/missing-slide-file", "heatmap slide missing or not the scan tiled",
        lambda c: heatmap(c, c.tmp / "moved" / f"{S1}.svs"),
        2, (f"moved/{S1}.svs: no such slide file", "Pass the slide file that was tiled"),
    ),
    Case(
        "heatmap/not-the-scan-that-was-tiled", "heatmap slide missing or not the scan tiled",
        lambda c: heatmap(c, another_scan(c)),
        2, (f"is not the scan that was tiled as {S1}", "fingerprint",
            "Pass the file that was tiled, or tile and embed this one"),
    ),
    # -- a tampered registry -------------------------------------------------------------------
    Case(
        "registry/verify-tampered-weights", "tampered registry checkpoint",
        lambda c: tampered(c, ["registry", "verify", "enc@1", "--root", str(c.registry)]),
        1, ("checksum mismatch for", "enc/1/weights.safetensors",
            "restore the file from a backup, or save the model again"),
    ),
    Case(
        "registry/verify-tampered-card", "tampered registry checkpoint",
        lambda c: tampered(
            c, ["registry", "verify", "enc@1", "--root", str(c.registry)], file="card.json"
        ),
        1, ("enc/1/card.json is not a valid card", "restore it from a backup or delete the folder"),
    ),
    Case(
        "embed/tampered-encoder", "tampered registry checkpoint",
        lambda c: tampered(c, embed(c)),
        2, ("refusing to load enc@1", "checksum mismatch", "restore the file from a backup"),
    ),
    Case(
        "pretrain/init-from-tampered-encoder", "tampered registry checkpoint",
        lambda c: tampered(c, pretrain(c, "--model.init_from", "enc@1")),
        2, ("refusing to load enc@1", "checksum mismatch", "restore the file from a backup"),
    ),
]
# fmt: on

#: every fault histcode must handle → it must have at least one case (here or in the
#: interruption and concurrency file)
FAULTS = {
    "corrupt slide": "bad input",
    "not-a-slide": "bad input",
    "blank slide": "bad input",
    "damaged tile data": "bad input",
    "missing µm/px": "bad input",
    "empty tile store": "bad input",
    "empty feature store": "bad input",
    "feature store from another encoder": "bad input",
    "labels with unknown ids": "bad input",
    "labels with duplicate ids": "bad input",
    "NaN expression": "bad input",
    "gene list with unknown genes": "bad input",
    "config with an unknown key": "bad input",
    "config with a wrong type": "bad input",
    "config with a wrong value": "bad input",
    "slide id escaping the output folder": "bad input",
    "tampered registry checkpoint": "bad input",
    "unreadable input file": "bad input",
    "registry folder that is a file": "bad input",
    "heatmap slide missing or not the scan tiled": "bad input",
    "fluorescence or mis-decoded slide": "bad input",
    "malformed µm/px CSV": "bad input",
    "kill -9 during tile": "interruption",
    "kill -9 during embed": "interruption",
    "kill -9 during pretrain": "interruption",
    "two runs writing one tile store": "concurrency",
    "two runs writing one feature store": "concurrency",
    "registry saves from many processes": "concurrency",
}

# -- running a case -------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path (lock files aside)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".lock")
    }


@dataclass
class Ran:
    """What a CLI run gave: exit status, stdout, and stderr with the log."""

    code: int
    out: str
    err: str


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture[str], caplog) -> Ran:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        try:
            code = cli_main(argv)
        except SystemExit as done:  # jsonargparse exits on a parse error, as in the console
            code = done.code if isinstance(done.code, int) else 2
    captured = capsys.readouterr()
    return Ran(code, captured.out, captured.err + caplog.text)


def run_process(argv: list[str]) -> Ran:
    """The console script's entry point in a child process."""
    code = "import sys; from histcode.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300
    )
    return Ran(done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, ctx: Ctx, capsys: pytest.CaptureFixture[str], caplog) -> None:
    argv = case.argv(ctx)
    before = {name: snapshot(path) for name, path in ctx.outputs().items()}

    ran = run_process(argv) if case.process else run_in_process(argv, capsys, caplog)

    text = ran.out + ran.err
    assert ran.code == case.exit, f"exit {ran.code}, expected {case.exit}:\n{text[-3000:]}"
    for phrase in case.says:
        assert phrase in text, f"the message lacks {phrase!r}:\n{text[-3000:]}"
    if case.exit == 2:
        assert "error:" in ran.err and not ran.out.strip(), "exit 2: a message, no result line"
    for name, path in ctx.outputs().items():
        after = snapshot(path)
        if name == case.writes:  # may gain slides and a summary; what was there stays
            changed = [f for f, h in before[name].items() if after.get(f) != h]
            assert changed in ([], ["summary.json"]), f"{name}: {changed} changed"
        else:
            assert after == before[name], f"{name} was changed by a run that should not write it"
    if case.statuses:
        store = TileStore(ctx.tiles) if case.writes == "tiles" else FeatureStore(ctx.features)
        statuses = {sid: store.status(sid) for sid in case.statuses}
        assert statuses == case.statuses
        summary = json.loads((store.path / "summary.json").read_text())
        assert summary["exit_code"] == case.exit
        failed = sorted(s for s, st in case.statuses.items() if st == "failed")
        assert sorted(summary["result"]["failed_slides"]) == failed


def test_stores_refuse_slide_ids_that_would_escape(world: World, tmp_path: Path) -> None:
    """Below the CLI: no store call takes an id such as ``../x`` to a path outside the store."""
    shutil.copytree(world.tiles, tmp_path / "tiles.zarr")
    store = TileStore(tmp_path / "tiles.zarr")
    before = snapshot(tmp_path)
    for sid in ("../x", "..", ".hidden", "a/b", "a\\b", ""):
        for call in (store.status, store.read, store.staging):
            with pytest.raises(ValueError, match="cannot name an output"):
                call(sid)
        with pytest.raises(ValueError, match="cannot name an output"):
            store.write(sid, {"status": "ok"}, [[0, 0]], [1.0])
    assert snapshot(tmp_path) == before


def test_every_fault_of_the_issue_has_a_case() -> None:
    """The table covers every fault of :data:`FAULTS` (counting only cases that run)."""
    from tests.test_reliability_interrupt import SCENARIOS

    tried = {c.fault for c in CASES} | {fault for fault, _ in SCENARIOS.values()}
    assert set(FAULTS) - tried == set(), "faults without a case"
    assert tried - set(FAULTS) == set(), "cases naming a fault the table does not know"
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
