"""The benchmark runner: report rendering and failure recording on fake results (fast), and
one real quick run of a small benchmark (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import run as runner  # noqa: E402


def _stat(mean: float, sd: float) -> dict[str, Any]:
    return {"mean": mean, "sd": sd, "folds": [mean - sd, mean, mean + sd]}


def _row(encoder: str, aggregator: str, auc: float) -> dict[str, Any]:
    return {
        "encoder": encoder,
        "aggregator": aggregator,
        "status": "ok",
        "folds": 3,
        "tumour_auc": _stat(auc, 0.05),
        "driver_r": _stat(0.6, 0.1),
        "noise_r": _stat(0.01, 0.1),
        "driver_auc_up": _stat(0.8, 0.1),
        "sig_drivers": 9,
        "sig_noise": 0,
        "drivers": 12,
        "noise": 8,
    }


def _accuracy() -> dict[str, Any]:
    return {
        "benchmark": "accuracy",
        "cohort": {"patients": 18, "slides": 27, "normal_slides": 9, "mean_tumour_fraction": 0.04},
        "tiles": {"mpp": 2.0, "tile_size": 32, "total": 20000},
        "pretrain": {"encoder": "resnet18", "steps": 150, "batch_size": 64, "final_loss": 4.1},
        "finetune": {"epochs": 30, "folds": 3, "config": "deg + cpu_smoke"},
        "encoders": {
            "simclr": {"status": "ok"},
            "random": {"status": "ok"},
            "imagenet": {"status": "not given", "error": "no --imagenet-weights FILE"},
        },
        "rows": [
            _row("simclr", "abmil", 0.912),
            _row("random", "abmil", 0.7),
            {"encoder": "random", "aggregator": "max", "status": "failed", "error": "Boom"},
            *[
                {"encoder": "imagenet", "aggregator": a, "status": "not given"}
                for a in ("abmil", "max")
            ],
        ],
        "naive": {
            "status": "ok",
            "method": "random ResNet-18, mean pooling, linear",
            **_row("naive", "mean", 0.612),
            "synth_difficulty_protocol": {"auc": 0.6, "auc_sd": 0.05},
        },
        "tile_ceiling": {"simclr": {"tile_auc": 0.79, "slide_auc_top2pct": 0.62}},
        "verdict": {
            "margin": 0.05,
            "beats_naive_clearly": True,
            "full_pipeline_tumour_auc": 0.912,
            "naive_tumour_auc": 0.612,
            "full_pipeline_driver_r": 0.6,
            "naive_driver_r": 0.6,
            "best_tumour_auc": "simclr × abmil",
            "best_driver_r": "simclr × abmil",
        },
    }


def _report() -> dict[str, Any]:
    ok = {"status": "ok", "quick": False, "device": "cpu", "seconds": 12.0, "command": "python"}
    return {
        "date": "2026-01-01 00:00 UTC",
        "command": "python -m benchmarks.run",
        "git_commit": "abc123",
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "cpu_count": 2,
            "ram_gib": 8.0,
            "torch": "2.x",
            "gpu": "none",
            "load_average": [0.1, 0.1, 0.1],
            "load_average_at_start": [0.1, 0.1, 0.1],
        },
        "quick": False,
        "gpu": False,
        "results": {
            "tiling": {
                **ok,
                "result": {
                    "slide_px": [100000, 80000],
                    "tile_s_per_slide": 1.5,
                    "peak_rss_mib": 400.0,
                    "thumbnail_read_s": 1.0,
                    "ratio_to_thumbnail_read": 1.5,
                    "goal_s_per_slide": 2.0,
                    "goal_peak_rss_mib": 1024,
                    "meets_goal": True,
                },
            },
            "embedding": {
                **ok,
                "result": {
                    "encoder": "resnet18",
                    "device": "cpu",
                    "precision": "fp32",
                    "workers": 1,
                    "torch_threads": 2,
                    "pure_forward_tiles_per_s": 100.0,
                    "pure_forward_best_threads": 2,
                    "embed_tiles_per_s": 70.0,
                    "naive_loop_tiles_per_s": 50.0,
                    "decode_only_tiles_per_s_one_core": 500.0,
                    "ratio_to_pure_forward": 0.7,
                    "ratio_to_naive_loop": 1.4,
                    "goal_ratio_to_pure_forward": 0.9,
                    "goal_ratio_to_naive_loop": 1.5,
                },
            },
            "finetune_speed": {
                **ok,
                "result": {
                    "tiles_per_bag": 10000,
                    "dim": 512,
                    "precision": "32-true",
                    "results": {
                        "abmil": {
                            "pipeline_slides_per_s": 9.0,
                            "pure_slides_per_s": 10.0,
                            "ratio": 0.9,
                        }
                    },
                },
            },
            "pretrain_speed": {
                "status": "failed",
                "error": "exit status 1: RuntimeError: out of memory",
                "quick": False,
                "device": "cpu",
                "seconds": 3.0,
                "command": "python -m benchmarks.pretrain_speed",
            },
            "embedding_memory": {"status": "skipped", "reason": "left out of --quick runs"},
            "accuracy": {**ok, "result": _accuracy()},
        },
    }


def test_markdown_has_machine_speed_ratios_notes_and_accuracy_table() -> None:
    md = runner.render_markdown(_report())
    assert "- date: 2026-01-01 00:00 UTC" in md
    assert "Test CPU, 2 cores" in md and "GPU: none" in md and "abc123" in md
    assert "other jobs shared the cores" not in md  # an idle machine
    # speed rows: figure, reference, ratio, goal, verdict
    assert "| tiling (100,000×80,000 px slide) | 1.5 s/slide, peak RSS 400 MiB |" in md
    assert "| embedding (resnet18, cpu, fp32) | 70 tiles/s | pure forward 100 tiles/s | 0.7 |" in md
    assert "| MIL training abmil" in md and "| 0.9 | ≥ 0.8 | yes |" in md
    # embedding is below 0.8 of its pure limit: where the time goes, from its own figures
    notes = md.split("### Where the time goes")[1].split("##")[0]
    assert "**embedding** at 0.70" in notes and "decoding a tile 2.0 core-ms" in notes
    assert "MIL training" not in notes  # 0.9 needs no note
    # accuracy: mean ± sd over folds, the naive row, encoders without weights, failures
    assert "| simclr | abmil | 0.912 ± 0.050 | 0.600 ± 0.100 |" in md
    assert "| **naive baseline** | mean + linear | 0.612 ± 0.050 |" in md
    assert "| imagenet | all | not given | no --imagenet-weights FILE |" in md
    assert md.count("| imagenet |") == 1
    assert "| random | max | failed | Boom |" in md
    assert "**beats it clearly**" in md and "Δ +0.300" in md
    assert "simclr tile AUC 0.79 → slide AUC 0.62" in md
    # the runs table and the failure list
    assert "| pretrain_speed | **failed** |" in md
    assert "- **pretrain_speed** (failed): exit status 1: RuntimeError: out of memory" in md
    assert "- **embedding_memory** (skipped): left out of --quick runs" in md


def test_markdown_flags_a_busy_machine_and_a_quick_accuracy_run() -> None:
    report = _report()
    report["machine"]["load_average"] = [3.5, 3.0, 2.0]
    report["results"]["accuracy"]["result"]["quick"] = True
    report["results"]["accuracy"]["quick"] = True
    md = runner.render_markdown(report)
    assert "quick and full sizes mixed" in md
    assert "other jobs shared the cores" in md
    assert "Quick run" in md and "not evidence" in md


def test_markdown_survives_partial_results() -> None:
    """Missing figures render as '–' rather than failing the whole report."""
    report = _report()
    report["results"] = {
        "embedding": {"status": "ok", "result": {}},
        "accuracy": {"status": "ok", "result": {"naive": {"status": "failed", "error": "x"}}},
    }
    md = runner.render_markdown(report)
    assert "| embedding (None, None, None) | – tiles/s |" in md
    assert "| **naive baseline** | | failed: x |" in md


class _Done:
    def __init__(self, returncode: int, stdout: str = "", stderr: str = "") -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def test_run_one_records_results_and_failures() -> None:
    bench = runner.Benchmark("x", "test", quick=["--small"], cpu=["--device", "cpu"])
    seen: list[list[str]] = []

    def fake(result: _Done):
        def call(cmd: list[str], **kwargs: Any) -> _Done:
            seen.append(cmd)
            return result

        return call

    ok = runner.run_one(bench, True, False, {}, fake(_Done(0, 'log\n{"a": 1}\nmore log\n')))
    assert ok["status"] == "ok" and ok["result"] == {"a": 1} and ok["quick"] is True
    assert seen[-1][-4:] == ["benchmarks.x", "--small", "--device", "cpu"]
    failed = runner.run_one(bench, False, False, {}, fake(_Done(1, "", "Traceback\nValueError")))
    assert failed["status"] == "failed" and "exit status 1" in failed["error"]
    assert "ValueError" in failed["error"]
    silent = runner.run_one(bench, False, False, {}, fake(_Done(0, "no json here", "warn")))
    assert silent["status"] == "failed" and "printed no JSON line" in silent["error"]

    def timeout(cmd: list[str], **kwargs: Any) -> _Done:
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    late = runner.run_one(bench, False, False, {}, timeout)
    assert late["status"] == "failed" and "timed out" in late["error"]


def test_command_adds_gpu_or_cpu_arguments() -> None:
    bench = runner.Benchmark("b", "t", args=["--big"], quick=None, cpu=["--c"], gpu=["--g"])
    assert runner.command(bench, False, True, {})[-2:] == ["--big", "--g"]
    assert runner.command(bench, False, False, {"b": ["--x"]})[-3:] == ["--big", "--c", "--x"]
    # a benchmark without a quick size runs full size when asked for by name
    assert runner.command(bench, True, False, {})[-2:] == ["--big", "--c"]


def test_main_records_a_failure_and_runs_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake_run_one(bench: runner.Benchmark, quick: bool, gpu: bool, extra: dict) -> dict:
        if bench.name == "tiling":
            return {"status": "failed", "error": "exit status 1: boom", "seconds": 1.0}
        return {"status": "ok", "result": {"benchmark": bench.name}, "seconds": 1.0}

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    monkeypatch.setattr(runner, "machine", lambda: {"cpu": "fake", "cores": 2})
    out, js = tmp_path / "RESULTS.md", tmp_path / "results.json"
    argv = ["--quick", "--only", "tiling", "tile_reading", "embedding_memory"]
    code = runner.main([*argv, "--out", str(out), "--json", str(js)])
    assert code == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["results"]["tiling"]["status"] == "failed"
    assert report["results"]["tile_reading"]["status"] == "ok"
    assert report["results"]["embedding_memory"]["status"] == "skipped"
    assert "- **tiling** (failed): exit status 1: boom" in out.read_text()
    assert json.loads(js.read_text())["results"].keys() == report["results"].keys()

    # --reuse: an earlier report fills in what is not run now; a lone benchmark line too
    line = tmp_path / "acc.json"
    line.write_text("log\n" + json.dumps(_accuracy()) + "\n")
    reused = runner.load_reuse(line)
    assert reused["accuracy"]["status"] == "ok" and reused["accuracy"]["reused_from"]
    code = runner.main(
        ["--only", "tile_reading", "--reuse", str(js), "--out", str(out), "--json", str(js)]
    )
    assert code == 1  # the reused failure of tiling still counts
    assert "tiling" in json.loads(js.read_text())["results"]

    # --report-only renders what is reused, later files winning, and runs nothing
    monkeypatch.setattr(runner, "run_one", lambda *a: pytest.fail("ran a benchmark"))
    md = tmp_path / "R2.md"
    code = runner.main(
        ["--report-only", "--reuse", str(js), str(line), "--out", str(md), "--json", str(js)]
    )
    assert code == 1
    text = md.read_text()
    assert "| simclr | abmil | 0.912 ± 0.050 |" in text
    assert "| accuracy | ok | full (reused) |" in text
    assert "- mode: full, CPU" in text


def test_gpu_without_cuda_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runner.main(["--gpu", "--out", str(tmp_path / "R.md")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists()


@pytest.mark.slow
def test_quick_run_of_tile_reading(tmp_path: Path) -> None:
    """The real runner on the smallest benchmark: a report with the reader's ratio."""
    out, js = tmp_path / "RESULTS.md", tmp_path / "results.json"
    argv = ["--quick", "--only", "tile_reading", "--out", str(out), "--json", str(js)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    result = report["results"]["tile_reading"]["result"]
    for slide in ("svs40x", "svs20x"):  # the reader vs OpenSlide and the decode limit, per slide
        measured = result["slides"][slide]
        assert measured["tiles"] > 100, measured
        assert measured["ratio_to_openslide"]["median"] > 0
        assert measured["ratio_to_decode_limit"]["median"] > 0
    report_text = out.read_text()
    assert "| tile reading svs40x (" in report_text and "| tile reading svs20x (" in report_text
