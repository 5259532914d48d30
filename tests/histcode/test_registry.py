"""Tests of the checkpoint registry and ``histcode registry``."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from histcode.cli import main as cli_main
from histcode.encoders import create_encoder, encoder_card
from histcode.registry import (
    CARD_FILE,
    WEIGHTS_FILE,
    Card,
    ChecksumError,
    InputSpec,
    Registry,
    UnknownRefError,
    default_root,
    parse_ref,
)

WORKERS, SAVES_PER_WORKER = 8, 10


def tiny(seed: int = 0, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_encoder("tiny", embed_dim=8, width=4, **kwargs)


def save_tiny(registry: Registry, name: str, seed: int = 0, **card: object) -> str:
    encoder = tiny(seed)
    return registry.save(name, encoder, encoder_card(encoder, **card))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


# -- refs, names, default root -----------------------------------------------------------------


def test_parse_ref() -> None:
    assert parse_ref("simclr-r50") == ("simclr-r50", None)
    assert parse_ref("simclr-r50@latest") == ("simclr-r50", None)
    assert parse_ref("a.b_c@12") == ("a.b_c", 12)
    for bad in ["", "a@", "a@0", "a@v3", "a@-1", "../x", "a/b", ".hidden", "a..b", "a b"]:
        with pytest.raises(ValueError, match="invalid checkpoint"):
            parse_ref(bad)


def test_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HISTCODE_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_root() == tmp_path / "registry"
    assert Registry().root == tmp_path / "registry"
    monkeypatch.setenv("HISTCODE_REGISTRY", str(tmp_path / "shared"))
    assert Registry().root == tmp_path / "shared"
    assert not (tmp_path / "shared").exists()  # nothing is created until a save


def test_latest_and_numbered_versions(registry: Registry) -> None:
    refs = [save_tiny(registry, "enc", seed=s) for s in range(3)]
    assert refs == ["enc@1", "enc@2", "enc@3"]
    assert str(registry.resolve("enc")) == "enc@3"
    assert str(registry.resolve("enc@latest")) == "enc@3"
    assert registry.resolve("enc@2").path == registry.root / "enc" / "2"
    assert registry.versions("enc") == [1, 2, 3]
    second, card = registry.load("enc@2")
    assert card.version == 2
    assert torch.equal(second.state_dict()["features.0.weight"], tiny(1).features[0].weight)


def test_unknown_name_lists_close_matches(registry: Registry) -> None:
    save_tiny(registry, "simclr-resnet50")
    save_tiny(registry, "abmil-tumour")
    with pytest.raises(UnknownRefError) as err:
        registry.load("simclr-resnet5")
    message = str(err.value)
    assert "Did you mean 'simclr-resnet50'" in message
    assert "abmil-tumour" in message  # everything that exists is listed
    with pytest.raises(UnknownRefError, match=r"has no version 4.*versions 1"):
        registry.resolve("abmil-tumour@4")
    with pytest.raises(UnknownRefError, match="registry is empty"):
        Registry(registry.root / "nowhere").resolve("x")
    assert isinstance(err.value, KeyError)  # the CLI runner maps it to exit status 2


# -- saving and loading ------------------------------------------------------------------------


def test_round_trip_bit_identical(registry: Registry) -> None:
    encoder = tiny(3, mpp=0.25, tile_size=64).eval()
    x = torch.randn(4, 3, 64, 64)
    ref = registry.save(
        "rt", encoder, encoder_card(encoder, metrics={"loss": 0.5}, parents=["tiles.zarr#abc"])
    )
    loaded, card = registry.load(ref)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(encoder(x), loaded(x))
    assert loaded.input_spec == InputSpec(mpp=0.25, tile_size=64) == card.input_spec
    assert loaded.embed_dim == 8
    assert card.kind == "encoder" and card.architecture == "tiny"
    assert card.metrics == {"loss": 0.5} and card.parents == ["tiles.zarr#abc"]
    assert card.name == "rt" and card.version == 1 and card.created.endswith("Z")
    # state only, for callers that build the module themselves
    state, card2 = registry.load_state(ref)
    assert card2 == card
    assert all(torch.equal(state[k], v) for k, v in encoder.state_dict().items())


def test_card_json_round_trip() -> None:
    card = Card(
        kind="mil",
        architecture="abmil",
        arguments={"in_dim": 1024, "hidden": [256, 128]},
        input_spec=InputSpec(mpp=0.5, tile_size=256, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)),
        metrics={"auc": 0.91},
        parents=["simclr@3"],
        extra={"note": "x"},
        name="m",
        version=2,
        sha256="0" * 64,
        created="2024-01-01T00:00:00Z",
        histcode_version="0.1.0",
    )
    assert Card.from_dict(json.loads(card.to_json())) == card
    assert list(card.to_dict())[:4] == ["name", "version", "kind", "architecture"]


def test_files_on_disk_are_json_and_safetensors(registry: Registry) -> None:
    ref = save_tiny(registry, "disk")
    folder = registry.resolve(ref).path
    assert sorted(p.name for p in folder.iterdir()) == [CARD_FILE, WEIGHTS_FILE]
    card = json.loads((folder / CARD_FILE).read_text())
    assert {"name", "version", "kind", "architecture", "arguments", "input_spec", "metrics"} <= set(
        card
    )
    assert {"parents", "sha256", "created", "histcode_version"} <= set(card)
    from safetensors import safe_open

    with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
        assert "features.0.weight" in set(f.keys())


def test_nothing_is_unpickled(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = save_tiny(registry, "nopickle")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the registry must never unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    module, _ = registry.load(ref)
    assert module.embed_dim == 8


def test_non_encoder_kinds_need_their_builders(registry: Registry) -> None:
    from histcode.builders import Builders

    aggregators = Builders[torch.nn.Module]("aggregator")
    aggregators.register("linear")(lambda in_dim, out_dim: torch.nn.Linear(in_dim, out_dim))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    card = Card(kind="mil", architecture="linear", arguments={"in_dim": 4, "out_dim": 2})
    ref = registry.save("head", model, card)
    with pytest.raises(ValueError, match="pass builders="):
        registry.load(ref)
    loaded, _ = registry.load(ref, builders=aggregators)
    assert torch.equal(loaded.weight, model.weight)


def test_shared_tensors_are_saved(registry: Registry) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[1].weight = model[0].weight  # tied weights share storage
    ref = registry.save("tied", model, Card(kind="mil", architecture="two-linear"))
    state, _ = registry.load_state(ref)
    assert torch.equal(state["0.weight"], state["1.weight"])
    assert torch.equal(state["1.bias"], model[1].bias)


def test_save_rejects_bad_input(registry: Registry) -> None:
    model = tiny()
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        registry.save("../escape", model, encoder_card(model))
    with pytest.raises(ValueError, match="kind"):
        registry.save("x", model, Card(kind="decoder", architecture="tiny"))
    with pytest.raises(ValueError, match="architecture is empty"):
        registry.save("x", model, Card(kind="encoder", architecture=""))
    with pytest.raises(ValueError, match="not JSON-able"):
        registry.save("x", model, Card("encoder", "tiny", metrics={"t": torch.tensor(1.0)}))
    assert registry.names() == []


def test_failed_save_leaves_nothing(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_tiny(registry, "broken")
    assert list((registry.root / "broken").iterdir()) == []
    assert registry.names() == []


def test_half_written_checkpoint_is_invisible(registry: Registry) -> None:
    save_tiny(registry, "enc")
    # a crashed save: a staging folder with partial files, under an existing and a new name
    for name in ["enc", "ghost"]:
        staging = registry.root / name / ".staging-0123abcd"
        staging.mkdir(parents=True)
        (staging / WEIGHTS_FILE).write_bytes(b"\x00" * 10)
    assert registry.names() == ["enc"]
    assert [c.ref for c in registry.list()] == ["enc@1"]
    assert str(registry.resolve("enc@latest")) == "enc@1"
    with pytest.raises(UnknownRefError):
        registry.resolve("ghost")
    assert save_tiny(registry, "enc") == "enc@2"  # the next save is unaffected


# -- integrity ---------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_weights_refuse_to_load(registry: Registry) -> None:
    ref = save_tiny(registry, "enc")
    weights = registry.resolve(ref).weights_path
    assert registry.verify(ref).ok
    flip_byte(weights)
    with pytest.raises(ChecksumError) as err:
        registry.load(ref)
    assert str(weights) in str(err.value)
    assert "checksum mismatch" in str(err.value)
    with pytest.raises(ChecksumError):
        registry.load_state(ref)
    report = registry.verify(ref)
    assert not report.ok
    assert str(weights) in report.reason
    assert report.expected_sha256 != report.actual_sha256


def test_verify_reports_missing_and_broken_files(registry: Registry) -> None:
    ref = save_tiny(registry, "enc")
    folder = registry.resolve(ref).path
    (folder / WEIGHTS_FILE).unlink()
    assert not registry.verify(ref).ok
    (folder / CARD_FILE).write_text("{not json")
    report = registry.verify(ref)
    assert not report.ok and CARD_FILE in report.reason
    assert registry.list() == []  # unreadable cards are skipped (with a warning)


# -- concurrency -------------------------------------------------------------------------------


def test_concurrent_saves_get_distinct_versions(tmp_path: Path) -> None:
    """8 processes × 10 saves under one name: 80 distinct versions, none overwritten.

    The workers call ``Registry.save`` itself (a bound method pickles by reference to
    histcode), so nothing from this test module has to be importable in the children.
    """
    registry = Registry(tmp_path / "registry")
    encoder = create_encoder("tiny", embed_dim=4, width=2)
    total = WORKERS * SAVES_PER_WORKER
    tasks = []
    for task in range(total):  # every checkpoint's weights all equal its task number
        state = {k: torch.full_like(v, float(task)) for k, v in encoder.state_dict().items()}
        tasks.append(("shared", state, encoder_card(encoder, extra={"task": task})))
    # forkserver: children fork from a clean server process (never fork a threaded parent)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "histcode.registry", "safetensors.torch"])
    with context.Pool(WORKERS) as pool:
        refs = pool.starmap(registry.save, tasks, chunksize=SAVES_PER_WORKER)

    assert len(set(refs)) == total
    assert registry.versions("shared") == list(range(1, total + 1))
    assert [p.name for p in (registry.root / "shared").iterdir() if p.name[0] == "."] == []
    seen = set()
    for ref in refs:
        assert registry.verify(ref).ok
        state, card = registry.load_state(ref)
        task = card.extra["task"]
        seen.add(task)
        assert all(torch.all(t == task) for t in state.values())  # not overwritten
    assert seen == set(range(total))
    registry.load("shared@latest")  # loadable through the zoo too


# -- command line ------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli_main(["registry", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list_show_verify(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(registry.root)
    code, out, _ = run_cli(capsys, "list", "--root", root)
    assert code == 0 and "no checkpoints" in out
    save_tiny(registry, "enc")
    save_tiny(registry, "enc", seed=1)

    code, out, _ = run_cli(capsys, "list", "--root", root)
    assert code == 0 and "enc@1" in out and "enc@2" in out and "tiny" in out
    code, out, _ = run_cli(capsys, "list", "--root", root, "--json")
    listing = json.loads(out)
    assert [c["ref"] for c in listing["checkpoints"]] == ["enc@1", "enc@2"]

    code, out, _ = run_cli(capsys, "show", "enc", "--root", root)
    assert code == 0 and "enc@2" in out and "sha256" in out
    code, out, _ = run_cli(capsys, "show", "enc@1", "--root", root, "--json")
    shown = json.loads(out)
    assert shown["ref"] == "enc@1" and shown["card"]["architecture"] == "tiny"

    code, out, _ = run_cli(capsys, "verify", "enc@1", "--root", root, "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    flip_byte(registry.resolve("enc@2").weights_path)
    code, out, _ = run_cli(capsys, "verify", "enc@2", "--root", root)
    assert code == 1 and "FAILED" in out and WEIGHTS_FILE in out
    code, out, _ = run_cli(capsys, "verify", "--root", root, "--json")
    summary = json.loads(out)
    assert code == 1 and summary["ok"] is False
    assert [r["ok"] for r in summary["results"]] == [True, False]


def test_cli_unknown_ref_exits_2(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    save_tiny(registry, "simclr-r50")
    code, out, err = run_cli(capsys, "show", "simclr-r5", "--root", str(registry.root))
    assert code == 2 and "Did you mean 'simclr-r50'" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "verify", "simclr-r50@9", "--root", str(registry.root))
    assert code == 2 and "versions 1" in err
    code, _, err = run_cli(capsys, "show", "../x", "--root", str(registry.root))
    assert code == 2 and "invalid checkpoint name" in err
    code, _, _ = run_cli(capsys, "frobnicate")
    assert code == 2
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "verify" in out


def test_cli_subprocess_list_json(registry: Registry, tmp_path: Path) -> None:
    save_tiny(registry, "enc")
    script = Path(sys.executable).with_name("histcode")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "histcode.cli"]
    env = {**os.environ, "HISTCODE_REGISTRY": str(registry.root)}
    done = subprocess.run(
        [*command, "registry", "list", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout.strip().splitlines()[-1])
    assert listing["root"] == str(registry.root)
    assert [c["ref"] for c in listing["checkpoints"]] == ["enc@1"]
