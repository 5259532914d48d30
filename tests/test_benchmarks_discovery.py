"""The benchmark runner finds its benchmarks by their ``SPEC``, renders what each one reports,
and keeps the hand-written text of ``RESULTS.md`` (fast)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

import benchmarks  # noqa: E402
from benchmarks import run as runner  # noqa: E402
from benchmarks.spec import Benchmark  # noqa: E402


def test_runner_discovers_every_benchmark_module() -> None:
    modules = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "run", "spec"}
    found = runner.discover()
    assert {b.name for b in found} == modules
    assert tuple(b.name for b in found) == runner.NAMES
    assert [b.order for b in found] == sorted(b.order for b in found)
    for bench in found:
        assert isinstance(bench, Benchmark) and bench.what and bench.goals, bench.name
        hooks = (bench.speed_rows, bench.time_notes, bench.section, bench.summary)
        assert any(h is not None for h in hooks), f"{bench.name} renders nothing"
    # the order runs and reports have always had
    assert runner.NAMES[:3] == ("tiling", "tile_reading", "embedding")
    assert runner.NAMES[-2:] == ("ceiling", "accuracy")
    # functions that moved to their benchmark are still importable from the runner
    from benchmarks import accuracy, ceiling

    assert runner.ceiling_section is ceiling.ceiling_section
    assert runner.accuracy_section is accuracy.accuracy_section
    with pytest.raises(AttributeError):
        _ = runner.no_such_thing


NEW_MODULE = """
from benchmarks.spec import Benchmark, RunnerOption, Section


def speed_rows(r):
    return [("new stage", f"{r['rate']} things/s", "pure 4", "0.5", "≥ 0.9", "**no**")]


def time_notes(r, cores):
    return [f"**new stage** at 0.50 on {cores} core(s)"]


def section(entry):
    return [f"New figure: {entry['result']['figure']}."]


def summary(r):
    return "- **zz_new**: one more accuracy figure."


SPEC = Benchmark(
    name="zz_new",
    what="a benchmark added by dropping a module into the package",
    quick=["--small"],
    cpu=["--device", "cpu"],
    order=15,
    goals=("at least 0.9 of the pure rate",),
    options=(RunnerOption("--zz-weights", "a file zz_new reads"),),
    speed_rows=speed_rows,
    time_notes=time_notes,
    section=Section("New: a section of its own", section, order=5),
    summary=summary,
)
"""


def test_a_new_module_with_a_spec_is_picked_up_without_editing_the_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    package = tmp_path / "extra"
    package.mkdir()
    (package / "zz_new.py").write_text(NEW_MODULE)
    (package / "zz_helper.py").write_text("VALUE = 1\n")  # no SPEC: not a benchmark
    monkeypatch.setattr(benchmarks, "__path__", [*benchmarks.__path__, str(package)])
    for name in ("benchmarks.zz_new", "benchmarks.zz_helper"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    found = runner.discover()
    names = [b.name for b in found]
    assert "zz_new" in names and "zz_helper" not in names
    assert names.index("zz_new") == names.index("tiling") + 1  # its order, 15

    assert runner.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "zz_new: a benchmark added by dropping a module into the package" in listed
    assert "python -m benchmarks.zz_new --small --device cpu" in listed

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    seen: list[list[str]] = []

    def child(cmd: list[str], **kwargs: Any) -> Any:
        seen.append(cmd)
        out = json.dumps({"benchmark": "zz_new", "rate": 2.0, "figure": 0.75})
        return type("Done", (), {"returncode": 0, "stdout": out + "\n", "stderr": ""})()

    real_run_one = runner.run_one
    monkeypatch.setattr(runner, "run_one", lambda *a: real_run_one(*a, child))
    monkeypatch.setattr(runner, "machine", lambda: {"cpu": "fake", "cores": 2})
    out, js = tmp_path / "RESULTS.md", tmp_path / "results.json"
    argv = ["--quick", "--only", "zz_new", "--zz-weights", str(weights)]
    assert runner.main([*argv, "--out", str(out), "--json", str(js)]) == 0
    child_argv = ["--small", "--device", "cpu", "--zz-weights", str(weights.resolve())]
    assert seen == [[sys.executable, "-m", "benchmarks.zz_new", *child_argv]]
    md = out.read_text()
    assert "| new stage | 2.0 things/s | pure 4 | 0.5 | ≥ 0.9 | **no** |" in md
    assert "- **new stage** at 0.50 on 2 core(s)" in md
    assert "## New: a section of its own\n\nNew figure: 0.75.\n" in md
    assert "## Other accuracy figures\n\n- **zz_new**: one more accuracy figure." in md
    assert "| zz_new | ok | quick | cpu |" in md
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["results"]["zz_new"]["result"]["figure"] == 0.75

    # a missing file for its runner option is a usage error, as --imagenet-weights is
    assert runner.main(["--zz-weights", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "--zz-weights" in capsys.readouterr().out


def test_a_spec_must_name_its_own_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "zz_misnamed.py").write_text(
        "from benchmarks.spec import Benchmark\nSPEC = Benchmark('other', 'x')\n"
    )
    monkeypatch.setattr(benchmarks, "__path__", [*benchmarks.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "benchmarks.zz_misnamed", raising=False)
    with pytest.raises(ValueError, match="must be the module's name"):
        runner.discover()


def test_a_module_that_cannot_be_imported_is_run_and_recorded_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "zz_broken.py").write_text("import no_such_dependency_here\n")
    monkeypatch.setattr(benchmarks, "__path__", [*benchmarks.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "benchmarks.zz_broken", raising=False)
    broken = next(b for b in runner.discover() if b.name == "zz_broken")
    assert "could not be imported" in broken.what and broken.quick == []

    def child(cmd: list[str], **kwargs: Any) -> Any:
        err = "ModuleNotFoundError: No module named 'no_such_dependency_here'"
        return type("Done", (), {"returncode": 1, "stdout": "", "stderr": err})()

    entry = runner.run_one(broken, True, False, {}, child)
    assert entry["status"] == "failed" and "no_such_dependency_here" in entry["error"]


def _report(ceiling: bool = True) -> dict[str, Any]:
    results: dict[str, Any] = {
        "finetune_speed": {
            "status": "ok",
            "result": {
                "tiles_per_bag": 10,
                "dim": 4,
                "results": {
                    "abmil": {"pipeline_slides_per_s": 1, "pure_slides_per_s": 2, "ratio": 0.5}
                },
            },
        }
    }
    if ceiling:
        row = {"difficulty": "hard", "mpp": 1.0, "encoder": "simclr", "seeds": 3}
        row["tumour_tile_auc"] = {"mean": 0.45, "sd": 0.02}
        results["ceiling"] = {"status": "ok", "result": {"benchmark": "ceiling", "rows": [row]}}
    return {"machine": {"cores": 2}, "results": results}


CEILING = "## Ceiling: what the tile features can separate (labels MIL never gets)"
NOTES = "### Where the time goes (stages below 0.8 of their limit)"


def test_hand_written_text_is_carried_over_to_its_section() -> None:
    md = runner.render_markdown(_report())
    bare = runner.render_markdown(_report(ceiling=False))
    note = ["<!-- hand-written -->", "- **GPU**: not measured here.", "<!-- /hand-written -->"]
    source = ["<!-- hand-written: where the table comes from -->", "*From final.json.*"]
    source.append("<!-- /hand-written -->")
    diagnosis = ["<!-- hand-written -->", "### Diagnosis", "", "It is the features."]
    diagnosis.append("<!-- /hand-written -->")
    lines = md.rstrip("\n").split("\n")
    at = lines.index(NOTES) + 2  # before the generated notes
    lines[at:at] = [*note, ""]
    at = lines.index(CEILING) + 2  # before the generated text
    lines[at:at] = [*source, ""]
    at = lines.index("## Runs") - 1  # after the ceiling section's text
    lines[at:at] = ["", *diagnosis]
    previous = "\n".join(lines) + "\n"
    assert [b[0][-1] for b in runner.hand_written(previous)] == [NOTES, CEILING, CEILING]

    # rendered again from the same results: exactly the file that was there
    assert runner.carry_hand_written(md, previous) == previous
    # new figures: the blocks keep their places around the new text
    fresh = md.replace("0.45 ± 0.02", "0.99 ± 0.01")
    again = runner.carry_hand_written(fresh, previous)
    assert again == previous.replace("0.45 ± 0.02", "0.99 ± 0.01")
    assert runner.carry_hand_written(fresh, again) == again
    # the ceiling section is gone: its blocks go to the end rather than being dropped
    moved = runner.carry_hand_written(bare, previous)
    assert moved.index("- **GPU**") < moved.index("- **MIL training abmil**")
    assert moved.rstrip().endswith("\n".join(diagnosis))
    assert moved.index("*From final.json.*") > moved.index("## Runs")
    # no "where the time goes" this time: its note goes to the end of the speed section
    report = _report(ceiling=False)
    report["results"]["finetune_speed"]["result"]["results"]["abmil"]["ratio"] = 0.9
    fast = runner.render_markdown(report)
    assert NOTES not in fast
    kept = runner.carry_hand_written(fast, previous)
    speed = kept.split("## Speed")[1].split("## Runs")[0]
    assert speed.rstrip().endswith("\n".join(note)) and "| MIL training abmil" in speed
    # no hand-written text: nothing changes
    assert runner.carry_hand_written(md, md) == md


def test_main_keeps_the_hand_written_text_of_the_report_it_rewrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "machine", lambda: {"cpu": "fake", "cores": 2})
    monkeypatch.setattr(runner, "run_one", lambda *a: pytest.fail("ran a benchmark"))
    line = tmp_path / "tiling.json"
    line.write_text(json.dumps({"benchmark": "tiling", "machine": "x86_64", "slide_px": [4, 3]}))
    out, js = tmp_path / "RESULTS.md", tmp_path / "results.json"
    argv = ["--report-only", "--reuse", str(line), "--out", str(out), "--json", str(js)]
    assert runner.main(argv) == 0
    first = out.read_text()
    assert "| tiling (4×3 px slide) |" in first
    block = "<!-- hand-written -->\nMeasured by hand on another machine.\n<!-- /hand-written -->"
    out.write_text(first.replace("## Runs", block + "\n\n## Runs"))
    assert runner.main(argv) == 0
    assert block in out.read_text()
