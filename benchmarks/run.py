"""Run the benchmarks, print one JSON object and write ``benchmarks/RESULTS.md``.

Each benchmark runs as ``python -m benchmarks.<name> …`` in a child process; its last JSON
line is its result. A benchmark that fails is recorded as failed with its error and the
others still run (exit status 1). Speed figures are ratios measured in the same run (the
stage against the pure model, or against a naive loop), never absolute timings.

    python -m benchmarks.run [--quick] [--gpu] [--only NAME …] [--out benchmarks/RESULTS.md]

``--quick`` gives each benchmark small sizes (the whole run takes minutes on 2 CPU cores)
and leaves out the slowest ones; ``--gpu`` runs the stages that use a device on CUDA with
bf16 (exit status 2 when there is no CUDA device). ``--reuse FILE …`` takes the results of
benchmarks that are not run this time from earlier runs' JSON (``--json``) or from a
benchmark's own JSON line, so that a single long benchmark can be rerun and the report
rewritten; ``--report-only`` runs nothing and renders the reused results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Below this share of its pure-model limit a stage gets a "where the time goes" note.
PURE_LIMIT_SHARE = 0.8


@dataclass(frozen=True)
class Benchmark:
    """How the runner calls one benchmark.

    Attributes:
        name: module name under ``benchmarks``.
        what: one line for the report.
        args: arguments of a full run.
        quick: arguments of a quick run; None leaves the benchmark out of quick runs.
        cpu: extra arguments of a CPU run (where the benchmark would pick a GPU itself).
        gpu: extra arguments with ``--gpu``; None: the benchmark has no device (it runs as
            on CPU).
        timeout: seconds before the child is stopped (full run; quick runs get a third).
    """

    name: str
    what: str
    args: list[str] = field(default_factory=list)
    quick: list[str] | None = None
    cpu: list[str] = field(default_factory=list)
    gpu: list[str] | None = None
    timeout: int = 3600


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "tiling",
        "tiling a 100,000 × 80,000 px 40x slide: s/slide and peak RSS",
        quick=["--width", "12000", "--height", "10000", "--repeats", "1"],
    ),
    Benchmark(
        "tile_reading",
        "tiles/s of histcode's tile reader vs a naive read_region loop and the decode limit",
        quick=["--tiles", "500", "--repeats", "1"],
    ),
    Benchmark(
        "embedding",
        "embed tiles/s vs the encoder's pure forward and a naive loop",
        quick=["--tiles", "256"],
        cpu=["--device", "cpu"],
        gpu=[
            "--device",
            "cuda",
            "--encoder",
            "resnet50_trunc",
            "--batch_size",
            "256",
            "--tiles",
            "8192",
        ],  # workers: one a core, less two (see command())
    ),
    Benchmark(
        "embedding_memory",
        "peak RSS embedding a ~145,000-tile slide vs a small one",
        quick=None,
    ),
    Benchmark(
        "pretrain_speed",
        "SimCLR tiles/s vs pure forward+backward and a CPU-augmenting reference",
        quick=["--steps", "3", "--warmup", "1", "--repeats", "1", "--slides", "1"],
        cpu=["--device", "cpu"],
        gpu=["--device", "cuda"],
    ),
    Benchmark(
        "finetune_speed",
        "MIL training slides/s on bags of 10,000 tiles vs pure forward+backward",
        quick=["--tiles", "2000", "--slides", "2", "--epochs", "2"],
        cpu=["--device", "cpu"],
        gpu=["--device", "cuda", "--precision", "bf16-mixed"],
    ),
    Benchmark(
        "pretrain_quality",
        "linear probe of SimCLR features vs the same encoder untrained (hard cohort)",
        quick=None,
        gpu=["--device", "cuda"],
    ),
    Benchmark(
        "synth_difficulty",
        "the naive baseline on easy vs hard synthetic cohorts",
        args=["--out", "benchmarks/out/synth_difficulty"],
        quick=None,
    ),
    Benchmark(
        "heatmap_localisation",
        "attention and gene maps vs the synthetic truth masks",
        quick=None,
    ),
    Benchmark(
        "ceiling",
        "tile probes with truth-mask labels: what the features can separate, per resolution",
        quick=["--quick"],
        timeout=3 * 3600,
    ),
    Benchmark(
        "accuracy",
        "encoder × aggregator on the hard cohort vs the naive baseline",
        quick=["--quick"],
        gpu=["--device", "cuda"],
        timeout=3 * 3600,
    ),
)
NAMES = tuple(b.name for b in BENCHMARKS)


# -- running -------------------------------------------------------------------------------


def command(bench: Benchmark, quick: bool, gpu: bool, extra: dict[str, list[str]]) -> list[str]:
    """The child's command line."""
    args = list(bench.quick if quick and bench.quick is not None else bench.args)
    if gpu and bench.gpu is not None:
        args += bench.gpu
        if bench.name == "embedding":  # loader workers: one a core, less two for the host
            args += ["--workers", str(max(1, min(8, (os.cpu_count() or 2) - 2)))]
    elif not gpu:
        args += bench.cpu
    args += extra.get(bench.name, [])
    return [sys.executable, "-m", f"benchmarks.{bench.name}", *args]


def last_json(stdout: str) -> dict[str, Any]:
    """The last line of ``stdout`` that is a JSON object.

    Raises:
        ValueError: there is none.
    """
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise ValueError("printed no JSON line")


def _tail(text: str, chars: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= chars else "…" + text[-chars:]


def run_one(
    bench: Benchmark,
    quick: bool,
    gpu: bool,
    extra: dict[str, list[str]],
    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> dict[str, Any]:
    """Run one benchmark in a child process; never raises for the benchmark's own failure.

    Returns:
        ``{"status": "ok", "result", "command", "seconds", "quick"}`` or ``{"status":
        "failed", "error", …}``.
    """
    cmd = command(bench, quick, gpu, extra)
    entry: dict[str, Any] = {
        "command": " ".join(["python", *cmd[1:]]),
        "quick": quick and bench.quick is not None,
        "device": "cuda" if gpu and bench.gpu is not None else "cpu",
    }
    timeout = bench.timeout // 3 if quick else bench.timeout
    start = time.perf_counter()
    try:
        done = runner(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            **entry,
            "status": "failed",
            "error": f"timed out after {timeout} s",
            "seconds": round(time.perf_counter() - start, 1),
        }
    entry["seconds"] = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return {
            **entry,
            "status": "failed",
            "error": f"exit status {done.returncode}: {_tail(done.stderr or done.stdout)}",
        }
    try:
        result = last_json(done.stdout)
    except ValueError as err:
        return {**entry, "status": "failed", "error": f"{err}: {_tail(done.stderr)}"}
    return {**entry, "status": "ok", "result": result}


# -- machine -------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def git_commit(root: Path = ROOT) -> str | None:
    """The checked-out commit, read from ``.git`` (no git process)."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """CPU, cores, RAM, torch and GPU of this machine."""
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": ", ".join(gpus) if gpus else "none",
        "load_average": _load(),
    }


def _load() -> list[float] | None:
    """1, 5 and 15 minute load averages (other jobs on a shared machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# -- report --------------------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    """A number for a table cell ("–" when missing)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def _pm(stat: dict[str, Any] | None) -> str:
    """``mean ± sd`` of a ``{"mean", "sd"}`` figure."""
    if not stat or stat.get("mean") is None:
        return "–"
    if stat.get("sd") is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def _meets(value: float | None, goal: float | None, higher: bool = True) -> str:
    if value is None or goal is None:
        return "–"
    ok = value >= goal if higher else value <= goal
    return "yes" if ok else "**no**"


#: One speed row: (stage, measured, reference, ratio, goal, meets).
Row = tuple[str, str, str, str, str, str]


def speed_rows(name: str, r: dict[str, Any]) -> list[Row]:
    """The speed table's rows of one benchmark's result (unknown benchmarks give none)."""
    rows: list[Row] = []
    if name == "tiling":
        s, rss = r.get("tile_s_per_slide"), r.get("peak_rss_mib")
        px = "×".join(f"{v:,}" for v in r.get("slide_px", []))
        rows.append(
            (
                f"tiling ({px} px slide)",
                f"{_f(s)} s/slide, peak RSS {_f(rss)} MiB",
                f"thumbnail read {_f(r.get('thumbnail_read_s'))} s",
                _f(r.get("ratio_to_thumbnail_read")),
                f"≤ {r.get('goal_s_per_slide')} s, ≤ {r.get('goal_peak_rss_mib')} MiB",
                "yes" if r.get("meets_goal") else "**no**",
            )
        )
        if r.get("ratio_to_clam") is not None:
            lo, hi = r.get("ratio_to_clam_range", [None, None])
            rows.append(
                (
                    f"`histcode tile` CLI process vs CLAM ({px} px slide)",
                    f"{_f(min(r['histcode_tile_s']))}–{_f(max(r['histcode_tile_s']))} s, "
                    f"peak RSS {_f(r.get('histcode_peak_rss_mib'))} MiB",
                    f"CLAM create_patches_fp {_f(min(r['clam_create_patches_fp_s']))}–"
                    f"{_f(max(r['clam_create_patches_fp_s']))} s, "
                    f"{_f(r.get('clam_peak_rss_mib'))} MiB",
                    f"{_f(r.get('ratio_to_clam'))} ({_f(lo)}–{_f(hi)})",
                    f"≤ {r.get('goal_ratio_to_clam')}, ≤ 1024 MiB",
                    "yes" if r.get("meets_clam_goal") else "**no**",
                )
            )
    elif name == "tile_reading":
        for label, sr in (r.get("slides") or {}).items():
            t = sr.get("tiles_per_s", {})
            to_os, to_limit = sr.get("ratio_to_openslide", {}), sr.get("ratio_to_decode_limit", {})
            stage = (
                f"tile reading {label} (1 core, {r.get('tile_size')} px at {r.get('mpp')} µm/px)"
            )
            rows.append(
                (
                    stage,
                    f"{_f(t.get('histcode', {}).get('median'))} tiles/s",
                    f"OpenSlide read_region {_f(t.get('openslide', {}).get('median'))} tiles/s",
                    f"{_f(to_os.get('median'))} ({_f(to_os.get('min'))}–{_f(to_os.get('max'))})",
                    f"≥ {r.get('goal_ratio_to_openslide')}",
                    _meets(to_os.get("median"), r.get("goal_ratio_to_openslide")),
                )
            )
            rows.append(
                (
                    f"{stage} vs decode limit",
                    f"{_f(t.get('histcode', {}).get('median'))} tiles/s",
                    f"JPEG decode of the covered stored tiles ({sr.get('decode_scale')} scale) "
                    f"{_f(t.get('decode_limit', {}).get('median'))} tiles/s",
                    f"{_f(to_limit.get('median'))} ({_f(to_limit.get('min'))}–"
                    f"{_f(to_limit.get('max'))})",
                    f"≥ {r.get('goal_ratio_to_decode_limit')}",
                    _meets(to_limit.get("median"), r.get("goal_ratio_to_decode_limit")),
                )
            )
    elif name == "embedding":
        rows.append(
            (
                f"embedding ({r.get('encoder')}, {r.get('device')}, {r.get('precision')})",
                f"{_f(r.get('embed_tiles_per_s'))} tiles/s",
                f"pure forward {_f(r.get('pure_forward_tiles_per_s'))} tiles/s",
                _f(r.get("ratio_to_pure_forward")),
                f"≥ {r.get('goal_ratio_to_pure_forward')}",
                _meets(r.get("ratio_to_pure_forward"), r.get("goal_ratio_to_pure_forward")),
            )
        )
        rows.append(
            (
                "embedding vs naive loop",
                f"{_f(r.get('embed_tiles_per_s'))} tiles/s",
                f"naive loop {_f(r.get('naive_loop_tiles_per_s'))} tiles/s",
                _f(r.get("ratio_to_naive_loop")),
                f"≥ {r.get('goal_ratio_to_naive_loop')}",
                _meets(r.get("ratio_to_naive_loop"), r.get("goal_ratio_to_naive_loop")),
            )
        )
    elif name == "embedding_memory":
        large, small = r.get("large", {}), r.get("small", {})
        rows.append(
            (
                f"embedding memory ({_f(large.get('tiles'))} tiles)",
                f"peak RSS {_f(large.get('peak_rss_mib'))} MiB",
                f"{_f(small.get('tiles'))}-tile slide {_f(small.get('peak_rss_mib'))} MiB",
                _f(r.get("rss_ratio_large_to_small")),
                "≈ 1 (flat)",
                _meets(r.get("rss_ratio_large_to_small"), 1.25, higher=False),
            )
        )
    elif name == "pretrain_speed":
        t = r.get("tiles_per_s", {})
        goal = 0.7 if "bf16" in str(r.get("precision", "")) else None  # the GPU goal
        rows.append(
            (
                f"pretraining ({r.get('encoder')}, {r.get('tile_size')} px, {r.get('precision')})",
                f"{_f(t.get('histcode'))} tiles/s",
                f"pure fwd+bwd {_f(t.get('pure'))} tiles/s",
                _f(r.get("ratio_histcode_to_pure")),
                f"≥ {goal} (GPU)" if goal else "≥ 0.7 on a GPU; CPU: reported",
                _meets(r.get("ratio_histcode_to_pure"), goal),
            )
        )
        rows.append(
            (
                "pretraining vs CPU augmentation",
                f"{_f(t.get('histcode'))} tiles/s",
                f"lightly SimCLRTransform in workers {_f(t.get('reference'))} tiles/s",
                _f(r.get("ratio_histcode_to_reference")),
                "> 1",
                _meets(r.get("ratio_histcode_to_reference"), 1.0),
            )
        )
    elif name == "finetune_speed":
        for agg, v in r.get("results", {}).items():
            rows.append(
                (
                    f"MIL training {agg} ({_f(r.get('tiles_per_bag'))} tiles/bag, "
                    f"{r.get('precision')})",
                    f"{_f(v.get('pipeline_slides_per_s'))} slides/s",
                    f"pure fwd+bwd {_f(v.get('pure_slides_per_s'))} slides/s",
                    _f(v.get("ratio")),
                    f"≥ {PURE_LIMIT_SHARE}",
                    _meets(v.get("ratio"), PURE_LIMIT_SHARE),
                )
            )
    return rows


def time_notes(name: str, r: dict[str, Any], cores: int | None) -> list[str]:
    """Where the time goes, for each stage below :data:`PURE_LIMIT_SHARE` of its limit.

    Built only from figures the benchmarks report (their own decompositions), so that it
    stays true when the numbers change.
    """
    notes: list[str] = []
    if name == "embedding" and (ratio := r.get("ratio_to_pure_forward")) is not None:
        pure, decode = r.get("pure_forward_tiles_per_s"), r.get("decode_only_tiles_per_s_one_core")
        if ratio < PURE_LIMIT_SHARE and pure and decode and r.get("device") == "cpu":
            n = cores or 1
            # core-seconds a tile: the encoder's n / pure, plus one decode on one core
            share = pure / (n * decode)
            model = 1 / (1 + share)
            workers = int(r.get("workers") or 0)
            threads = max(1, n - workers) if workers else n
            notes.append(
                f"**embedding** at {ratio:.2f} of the pure forward: on CPU the stage is "
                f"compute-bound and decoding shares the {n} cores with the encoder. The "
                f"pure forward takes {n / pure * 1000:.1f} core-ms a tile, decoding a tile "
                f"{1000 / decode:.1f} core-ms ({share:.0%} of the forward's work): sharing "
                f"the cores that way alone would allow about {model:.2f}. embed ran the "
                f"encoder on {threads} thread(s) next to {workers} decoding worker(s) (the "
                f"pure forward was fastest on {r.get('pure_forward_best_threads')}); the rest "
                f"({max(0.0, model - ratio):.2f}) is the batches' hand-over through shared "
                "memory, the zarr writes and other jobs on the cores. On a GPU the forward "
                "leaves the cores to the decoders."
            )
        elif ratio < PURE_LIMIT_SHARE:
            notes.append(
                f"**embedding** at {ratio:.2f} of the pure forward on {r.get('device')}: "
                f"decoding alone is {_f(decode)} tiles/s a core with {r.get('workers')} "
                "loader worker(s); below the forward's rate, reading is the limit."
            )
    if name == "pretrain_speed" and (ratio := r.get("ratio_histcode_to_pure")) is not None:
        t = r.get("tiles_per_s", {})
        pure, aug = t.get("pure"), r.get("augmentation_only_tiles_per_s")
        if ratio < PURE_LIMIT_SHARE and pure and aug:
            model = 1 / (1 + pure / aug)
            notes.append(
                f"**pretraining** at {ratio:.2f} of the pure forward+backward: the views are "
                f"made on the device ({r.get('device')}), {aug:,.0f} tiles/s for the "
                f"augmentation alone against {pure:,.0f} for the model, so augmentation adds "
                f"{pure / aug:.0%} to each step (bound ≈ {model:.2f}); the rest "
                f"({max(0.0, model - ratio):.2f}) is decoding in {r.get('loader_workers')} "
                "loader worker(s) on the same cores and Lightning's step overhead. On a GPU "
                "the augmentation is a small share of the step."
            )
    if name == "finetune_speed":
        for agg, v in r.get("results", {}).items():
            ratio = v.get("ratio")
            if ratio is not None and ratio < PURE_LIMIT_SHARE:
                pure, ours = v.get("pure_slides_per_s"), v.get("pipeline_slides_per_s")
                extra_ms = (1 / ours - 1 / pure) * 1000 if pure and ours else None
                notes.append(
                    f"**MIL training {agg}** at {ratio:.2f} of the pure loop: "
                    f"{_f(extra_ms)} ms a slide outside the model's forward + backward + "
                    "step — the Trainer's loop and hooks, and the bag data path (cached bag → "
                    "BagDataset sampling → padded, masked batch; a bag of "
                    f"{_f(r.get('tiles_per_bag'))} × {r.get('dim')} float32 is "
                    f"{(r.get('tiles_per_bag') or 0) * (r.get('dim') or 0) * 4 / 2**20:.0f} MiB "
                    "to copy)."
                )
    if name == "tile_reading" and (ratio := r.get("ratio_to_naive")) is not None:
        t = r.get("tiles_per_s", {})
        goal = r.get("goal_ratio_to_naive") or 1.5
        naive, loop, one = t.get("naive"), t.get("dataset_loop"), t.get("histcode_one_process")
        if ratio < goal and naive and loop and one:
            parts = [
                f"**tile reading** at {ratio:.2f} of the naive loop with {r.get('workers')} "
                f"worker(s) on {r.get('cores')} core(s). Per tile, OpenSlide's `read_region` "
                f"costs {1000 / naive:.1f} ms (the naive loop) against "
                f"{1000 / (r.get('decode_only_tiles_per_s_one_core') or 1):.2f} ms to decode "
                "a tile's JPEG: OpenSlide's region assembly, not decoding, sets the per-core "
                "limit here.",
                f"histcode's per-tile path alone (`TileDataset[i]` in a loop) runs at "
                f"{loop / naive:.2f} of the naive loop (RGBA → RGB compositing in numpy and a "
                "copy a tile, where the naive loop lets PIL convert).",
                f"The loader without workers runs at {one / loop:.2f} of that"
                + (
                    f" (`collate_tiles` calls torch.stack on {r.get('torch_threads')} intra-op "
                    "thread(s), which stall when the cores are busy)."
                    if one < 0.8 * loop
                    else "."
                ),
            ]
            per_worker = t.get("histcode", 0) / max(1, int(r.get("workers") or 1))
            if per_worker < 0.6 * loop:
                parts.append(
                    f"With {r.get('workers')} worker processes each one read "
                    f"{per_worker:,.0f} tiles/s, {per_worker / loop:.2f} of the in-process "
                    "loop: the workers did not get a core each (other jobs, see the load "
                    "average; the main process also needs one), and each batch crosses "
                    "processes through shared memory."
                )
            notes.append(" ".join(parts))
    return notes


def accuracy_table(r: dict[str, Any]) -> list[str]:
    """The markdown table of ``benchmarks.accuracy``'s result."""
    lines = [
        "| encoder | aggregator | tumour AUC | driver r | noise r | driver AUC (up) "
        "| sig. drivers | sig. noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    missing = {e: v for e, v in r.get("encoders", {}).items() if v.get("status") != "ok"}
    for encoder, info in missing.items():
        why = info.get("error") or ""
        lines.append(f"| {encoder} | all | {info.get('status')} | {_tail(str(why), 120)} | | | | |")
    for row in r.get("rows", []):
        if row["encoder"] in missing:
            continue
        if row.get("status") != "ok":
            why = _tail(str(row.get("error") or ""), 120)
            lines.append(
                f"| {row['encoder']} | {row['aggregator']} | {row.get('status')} | {why} | | | | |"
            )
            continue
        lines.append(
            f"| {row['encoder']} | {row['aggregator']} | {_pm(row['tumour_auc'])} "
            f"| {_pm(row['driver_r'])} | {_pm(row['noise_r'])} | {_pm(row['driver_auc_up'])} "
            f"| {row['sig_drivers']}/{row['drivers']} | {row['sig_noise']}/{row['noise']} |"
        )
    naive = r.get("naive", {})
    if naive.get("status") == "ok":
        lines.append(
            f"| **naive baseline** | mean + linear | {_pm(naive['tumour_auc'])} "
            f"| {_pm(naive['driver_r'])} | {_pm(naive['noise_r'])} "
            f"| {_pm(naive['driver_auc_up'])} | {naive['sig_drivers']}/{naive['drivers']} "
            f"| {naive['sig_noise']}/{naive['noise']} |"
        )
    else:
        lines.append(f"| **naive baseline** | | failed: {naive.get('error')} | | | | | |")
    return lines


def accuracy_section(entry: dict[str, Any]) -> list[str]:
    """Cohort, table and verdict of the accuracy benchmark."""
    r = entry["result"]
    c, t, p = r.get("cohort", {}), r.get("tiles", {}), r.get("pretrain", {})
    f = r.get("finetune") or {}
    lines = []
    if r.get("quick"):
        lines += [
            "*Quick run: a handful of slides, few steps and epochs — a smoke test of the "
            "benchmark, not evidence; see a full run for the figures.*",
            "",
        ]
    steps = [k for k, v in (r.get("reused") or {}).items() if v]
    if steps:
        lines += [
            f"*Resumed (`--resume`): {', '.join(steps)} and the finetune runs marked so were "
            "reused from an earlier run with the same settings in the same folder.*",
            "",
        ]
    lines += [
        f"Hard synthetic cohort: {c.get('patients')} patients, {c.get('slides')} slides "
        f"({c.get('normal_slides')} normal), tumour "
        f"{100 * (c.get('mean_tumour_fraction') or 0):.1f} % of the tissue on average; "
        f"{_f(t.get('total'))} tiles of {t.get('tile_size')} px at "
        f"{t.get('mpp')} µm/px. SimCLR: {p.get('encoder')}, {p.get('steps')} steps of "
        f"{p.get('batch_size')} tiles (final loss {_f(p.get('final_loss'))}). Finetune: "
        f"{f.get('config')}, {f.get('epochs')} epochs, {f.get('folds')} patient-grouped "
        "folds; every figure is mean ± sd over the test folds. Driver r: Pearson r of "
        "predicted vs true log2FC over the 12 driver genes; noise r: over the 8 noise genes "
        "(≈ 0 expected); sig.: genes significant at FDR 5 % (one-sided Pearson per test fold "
        "on patient means, Stouffer-combined, Benjamini–Hochberg over all genes).",
        "",
        *accuracy_table(r),
        "",
    ]
    naive = r.get("naive", {})
    if naive.get("status") == "ok" and naive.get("synth_difficulty_protocol"):
        proto = naive["synth_difficulty_protocol"]
        lines.append(
            f"Naive baseline: {naive.get('method')}; on synth_difficulty's own protocol "
            f"(repeated grouped CV) its tumour AUC is {proto.get('auc')} ± {proto.get('auc_sd')}."
        )
    ceiling = {k: c for k, c in (r.get("tile_ceiling") or {}).items() if isinstance(c, dict)}
    if ceiling:
        parts = ", ".join(
            f"{name} tile AUC {_f(c.get('tile_auc'))} → slide AUC {_f(c.get('slide_auc_top2pct'))}"
            for name, c in ceiling.items()
        )
        lines += [
            "",
            "Ceiling check, with labels MIL never gets: a linear tile classifier trained on "
            "tiles labelled from the truth masks (patient-grouped folds), slides scored by "
            f"their top 2 % tiles: {parts}. A slide AUC near chance here means the features, "
            "not the aggregator, limit the slide-level figures.",
        ]
    v = r.get("verdict", {})
    if v.get("beats_naive_clearly") is not None:
        lines.append("")
        gap = (v.get("full_pipeline_tumour_auc") or 0) - (v.get("naive_tumour_auc") or 0)
        lines.append(
            f"**Full pipeline (SimCLR × gated attention) vs naive:** tumour AUC "
            f"{_f(v.get('full_pipeline_tumour_auc'))} vs {_f(v.get('naive_tumour_auc'))} "
            f"(Δ {gap:+.3f}; clearly better means Δ ≥ {v.get('margin')}): "
            + (
                "**beats it clearly**"
                if v["beats_naive_clearly"]
                else "**does not beat it clearly**"
            )
            + f"; driver r {_f(v.get('full_pipeline_driver_r'))} vs "
            f"{_f(v.get('naive_driver_r'))}. Best tumour AUC: {v.get('best_tumour_auc')}; "
            f"best driver r: {v.get('best_driver_r')}."
        )
        if not v["beats_naive_clearly"]:
            lines += ["", *why_not(r)]
    return lines


#: Slide ceilings at or below this leave MIL little to find (a reading, not a goal).
CEILING_WEAK = 0.75


def _pm2(stat: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean ± sd (n)`` with fewer digits, for the ceiling table."""
    if not stat or stat.get("mean") is None:
        return "–"
    sd = "" if stat.get("sd") is None else f" ± {stat['sd']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{sd}"


def ceiling_table(r: dict[str, Any]) -> list[str]:
    """The markdown table of ``benchmarks.ceiling``'s result: one row a cohort × µm/px × encoder."""
    lines = [
        "| cohort | µm/px (px) | encoder | seeds | tumour tile AUC | tumour slide AUC (top "
        "2 %) | lymphocyte tile AUC | lymphocyte slide r | effective rank | SimCLR final loss "
        "(ln(2B−1)) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dims = {}
    for cell in r.get("cells", []):
        for name, e in cell.get("encoders", {}).items():
            if e.get("status") == "ok":
                dims[name] = (e.get("features") or {}).get("dim")
            else:
                lines.append(
                    f"| {cell.get('difficulty')} | {cell.get('mpp')} | {name} | seed "
                    f"{cell.get('seed')} | failed: {_tail(str(e.get('error')), 100)} "
                    "| | | | | |"
                )
    rows = sorted(
        r.get("rows", []),
        key=lambda x: (
            x.get("difficulty") != "hard",
            -(x.get("mpp") or 0),
            x.get("encoder", ""),
            x.get("steps") or 0,
        ),
    )
    for row in rows:
        px = round(r.get("context_um", 64) / row["mpp"]) if row.get("mpp") else "?"
        loss = "–"
        if row.get("final_loss"):
            loss = f"{_pm2(row['final_loss'])} ({row.get('chance_loss', 0):.2f})"
        dim = dims.get(row["encoder"])
        name = row["encoder"] + (f" ({row['steps']} steps)" if row.get("steps") else "")
        lines.append(
            f"| {row['difficulty']} | {row['mpp']:g} ({px}) | {name} | {row['seeds']} "
            f"| {_pm2(row.get('tumour_tile_auc'))} | {_pm2(row.get('tumour_slide_auc'))} "
            f"| {_pm2(row.get('lymphocyte_tile_auc'))} | {_pm2(row.get('lymphocyte_slide_r'))} "
            f"| {_pm2(row.get('effective_rank'), 1)}{f' / {dim}' if dim else ''} | {loss} |"
        )
    return lines


def ceiling_section(entry: dict[str, Any]) -> list[str]:
    """Setup, table and a reading of the ceiling benchmark."""
    r = entry["result"]
    lines = []
    if r.get("quick"):
        lines += ["*Quick run: a smoke test of the benchmark, not evidence.*", ""]
    cohorts = "; ".join(
        f"{d}: {c.get('patients')} patients, {c.get('slides')} slides ({c.get('normal_slides')} "
        f"normal), tumour {100 * (c.get('mean_tumour_fraction') or 0):.1f} % of the tissue"
        for d, c in (r.get("cohorts") or {}).items()
    )
    recipe = r.get("simclr_recipe") or {}
    lines += [
        f"Synthetic cohorts ({cohorts}); tiles of {r.get('context_um', 64):g} µm at every "
        f"resolution, up to {r.get('tiles_per_slide')} a slide. Probe: {r.get('probe')}. "
        f"Encoders: the tiny CNN with random weights, a random-weight ResNet-18 (the naive "
        f"baseline's) and the tiny CNN after SimCLR with the demo's recipe "
        f"({recipe.get('optimizer')} lr {recipe.get('lr')}, batch {recipe.get('batch_size')}, "
        f"{recipe.get('steps')} steps). Figures are mean ± sd over seeds {r.get('seeds')} "
        "(encoder initialisation and SimCLR; cohort and folds fixed). Lymphocyte slide r: "
        "Pearson r of a slide's mean tile probability with its true lymphocyte fraction.",
        "",
        *ceiling_table(r),
    ]
    notes = []
    rows = r.get("rows", [])
    for d, mpp in sorted({(x["difficulty"], x["mpp"]) for x in rows}, key=lambda k: (k[0], -k[1])):
        here = [x for x in rows if (x["difficulty"], x["mpp"]) == (d, mpp)]
        slide = {
            x["encoder"] + (f" ({x['steps']} steps)" if x.get("steps") else ""): v
            for x in here
            if (v := (x.get("tumour_slide_auc") or {}).get("mean")) is not None
        }
        if slide and max(slide.values()) <= CEILING_WEAK:
            best = max(slide, key=slide.__getitem__)
            notes.append(
                f"on {d} at {mpp:g} µm/px no encoder's tiles rank slides above "
                f"{slide[best]:.2f} ({best}) even with a tile probe trained on the truth masks: "
                "the features, not the aggregator, cap the slide result"
            )
        random_rank = next(
            (
                (x.get("effective_rank") or {}).get("mean")
                for x in here
                if x["encoder"] == "tiny_random"
            ),
            None,
        )
        for x in here:
            loss, chance = (x.get("final_loss") or {}).get("mean"), x.get("chance_loss")
            if loss is None or not chance:
                continue
            rank = (x.get("effective_rank") or {}).get("mean")
            verdict = (
                "at chance"
                if abs(loss - chance) <= 0.05 * chance
                else ("above chance" if loss > chance else "below chance")
            )
            notes.append(
                f"{x['encoder']} ({x.get('steps')} steps) on {d} at {mpp:g} µm/px: final loss "
                f"{loss:.2f} = {loss / chance:.2f} × ln(2B−1) ({verdict}; a constant embedding "
                f"scores exactly ln(2B−1)), effective rank {_f(rank)}"
                + (f" vs {random_rank:.1f} with random weights" if random_rank else "")
            )
    if notes:
        lines += ["", "Reading: " + "; ".join(notes) + "."]
    return lines


def why_not(r: dict[str, Any]) -> list[str]:
    """Why the full pipeline does not clearly beat the naive baseline, from the figures."""
    c, t, p = r.get("cohort", {}), r.get("tiles", {}), r.get("pretrain", {})
    folds = (r.get("finetune") or {}).get("folds") or 3
    slides = c.get("slides") or 0
    naive = (r.get("naive") or {}).get("tumour_auc") or {}
    full = next(
        (x for x in r.get("rows", []) if (x["encoder"], x["aggregator"]) == ("simclr", "abmil")),
        {},
    )
    reasons = []
    if naive.get("mean") is not None and naive["mean"] <= 0.7:
        reasons.append(
            f"the hard cohort defeats the naive baseline as designed (tumour AUC "
            f"{naive['mean']:.2f}), so there is no easy margin to show"
        )
    ceiling = (r.get("tile_ceiling") or {}).get("simclr")
    if isinstance(ceiling, dict) and (ceiling.get("slide_auc_top2pct") or 1) <= 0.75:
        reasons.append(
            f"the features are the limit: with tile labels from the truth masks a linear "
            f"classifier on the SimCLR features separates tumour tiles at AUC "
            f"{ceiling['tile_auc']:.2f} but slides only at {ceiling['slide_auc_top2pct']:.2f}, "
            f"because foci of ~{100 * (c.get('mean_tumour_fraction') or 0):.0f} % of the "
            f"tissue drown in the false positives of the other tiles; at {t.get('mpp')} µm/px "
            f"and {p.get('steps')} pretraining steps of {p.get('batch_size')} tiles the "
            "encoder does not single out the subtle tumour morphology, and no aggregator "
            "trained on slide labels can recover what the features lack"
        )
    if slides:
        train = round(slides * (folds - 1) / folds * 0.8)
        reasons.append(
            f"each fold trains on about {train} slides (plus a validation share that picks "
            f"the epoch) and tests on {slides // folds}: attention MIL has too few bags to "
            "learn where 2–6 % foci are, and models that fall back to the training mean give "
            "the negative out-of-fold correlations seen for several genes (leaving patients "
            "out shifts the training mean away from the test values)"
        )
    sd = [(x.get("tumour_auc") or {}).get("sd") for x in (full, {"tumour_auc": naive})]
    sd = [v for v in sd if v is not None]
    if sd:
        se = max(sd) / folds**0.5
        reasons.append(
            f"with {folds} folds the fold-to-fold sd of tumour AUC is up to {max(sd):.2f}, "
            f"the standard error of a row's mean about {se:.2f}: differences between rows "
            f"below ~{2 * 2**0.5 * se:.2f} are noise"
        )
    return [
        "**Why not:** " + "; ".join(reasons) + ". What would show the pipeline's worth: "
        "the GPU settings (`--device cuda`: 64 px tiles at 1 µm/px, 500 SimCLR steps of 256 "
        "tiles), more patients (`--patients 60`) and local ImageNet weights for comparison."
    ]


def other_accuracy(name: str, r: dict[str, Any]) -> str | None:
    """One line for the smaller accuracy benchmarks."""
    if name == "pretrain_quality":
        return (
            f"- **pretrain_quality**: tile-level linear probe (tumour) on the hard cohort: "
            f"SimCLR {_f(r.get('auc_pretrained'))} vs random weights {_f(r.get('auc_random'))}"
            f" (BatchNorm recalibrated {_f(r.get('auc_random_bn_calibrated'))})."
        )
    if name == "synth_difficulty":
        e, h = r.get("easy", {}), r.get("hard", {})
        return (
            f"- **synth_difficulty**: naive baseline tumour AUC easy {_f(e.get('auc'))} ± "
            f"{_f(e.get('auc_sd'))}, hard {_f(h.get('auc'))} ± {_f(h.get('auc_sd'))} "
            "(goal: easy ≈ 1, hard ≲ 0.75)."
        )
    if name == "heatmap_localisation":
        return (
            f"- **heatmap_localisation** ({r.get('difficulty')}): attention vs tumour mask "
            f"AUROC {_f(r.get('attention_vs_tumour_mask'))}, lymphocyte genes vs lymphocyte "
            f"mask {_f(r.get('lymphocyte_genes_vs_lymphocyte_mask'))} (goal ≥ {r.get('goal')})."
        )
    return None


def _load_note(m: dict[str, Any]) -> str:
    loads = [*(m.get("load_average_at_start") or []), *(m.get("load_average") or [])]
    cores = m.get("cores") or 0
    if cores and loads and max(loads) > cores * 0.75:
        return (
            " — other jobs shared the cores: ratios of multi-process to one-process figures "
            "(loader workers, tile reading) are biased low"
        )
    return ""


def _mode(results: dict[str, dict[str, Any]]) -> str:
    sizes = {bool(e.get("quick")) for e in results.values() if e.get("status") == "ok"}
    if sizes == {True}:
        return "quick (small sizes)"
    if sizes == {False}:
        return "full"
    return "quick and full sizes mixed (see the Runs table)" if sizes else "nothing ran"


def render_markdown(report: dict[str, Any]) -> str:
    """``RESULTS.md`` from the runner's report (see :func:`main`)."""
    m = report.get("machine", {})
    results: dict[str, dict[str, Any]] = report.get("results", {})
    lines = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks.run` — do not edit by hand; rerun it. Speed figures "
        "are ratios measured in the same run on the same machine.",
        "",
        f"- date: {report.get('date')}",
        f"- command: `{report.get('command')}`",
        f"- git commit: {report.get('git_commit') or 'unknown'}",
        f"- machine: {m.get('cpu')}, {m.get('cores')} cores available "
        f"({m.get('cpu_count')} in all), {m.get('ram_gib')} GiB RAM, {m.get('platform')}",
        f"- python {m.get('python')}, torch {m.get('torch')}, GPU: {m.get('gpu')}",
        f"- load average (1, 5, 15 min) at start {m.get('load_average_at_start')}, at end "
        f"{m.get('load_average')}{_load_note(m)}",
        f"- mode: {_mode(results)}"
        f"{', GPU (bf16) where a stage uses a device' if report.get('gpu') else ', CPU'}",
    ]
    for src in report.get("reused_from", []):
        when = f" of {src['date']}" if src.get("date") else ""
        load = src.get("load_average")
        lines.append(
            f"- reused results from `{src['path']}`{when} (`{src.get('command')}`"
            + (f"; load average at start {load[0]}, at end {load[1]}" if load else "")
            + ")"
        )
    lines.append("")
    speed: list[Row] = []
    notes: list[str] = []
    for name, entry in results.items():
        if entry.get("status") == "ok":
            speed += speed_rows(name, entry["result"])
            notes += time_notes(name, entry["result"], m.get("cores"))
    if speed:
        lines += [
            "## Speed",
            "",
            "| stage | measured | limit / reference | ratio | goal | meets |",
            "|---|---|---|---|---|---|",
            *[f"| {' | '.join(row)} |" for row in speed],
            "",
        ]
    if notes:
        lines += [
            f"### Where the time goes (stages below {PURE_LIMIT_SHARE} of their limit)",
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
    if (acc := results.get("accuracy")) and acc.get("status") == "ok":
        lines += [
            "## Accuracy: encoder × aggregator vs the naive baseline",
            "",
            *accuracy_section(acc),
            "",
        ]
    if (ceil := results.get("ceiling")) and ceil.get("status") == "ok":
        lines += [
            "## Ceiling: what the tile features can separate (labels MIL never gets)",
            "",
            *ceiling_section(ceil),
            "",
        ]
    others = [
        line
        for name, entry in results.items()
        if entry.get("status") == "ok" and (line := other_accuracy(name, entry["result"]))
    ]
    if others:
        lines += ["## Other accuracy figures", "", *others, ""]
    lines += ["## Runs", "", "| benchmark | status | size | device | seconds | command |"]
    lines += ["|---|---|---|---|---|---|"]
    for name, entry in results.items():
        status = entry.get("status")
        size = "quick" if entry.get("quick") else "full"
        if status == "skipped":
            size = "–"
        elif entry.get("reused_from"):
            size += " (reused)"
        lines.append(
            f"| {name} | {status if status == 'ok' else f'**{status}**'} | {size} "
            f"| {entry.get('device', '–')} | {_f(entry.get('seconds'))} "
            f"| `{entry.get('command', '')}` |"
        )
    failed = [(n, e) for n, e in results.items() if e.get("status") in ("failed", "skipped")]
    if failed:
        lines += ["", "### Failed or skipped", ""]
        for name, entry in failed:
            why = entry.get("error") or entry.get("reason") or ""
            lines.append(f"- **{name}** ({entry['status']}): {' '.join(str(why).split())}")
    return "\n".join(lines).rstrip() + "\n"


def reuse_source(path: Path) -> dict[str, Any]:
    """Where reused results come from: a report's date, command and load, or a result line."""
    text = path.read_text()
    try:
        old = json.loads(text)
    except json.JSONDecodeError:
        old = last_json(text)
    m = old.get("machine", {})
    return {
        "path": str(path),
        "date": old.get("date"),
        "command": old.get("command") or f"python -m benchmarks.{old.get('benchmark')}",
        "load_average": [m.get("load_average_at_start"), m.get("load_average")] if m else None,
    }


def load_reuse(path: Path) -> dict[str, dict[str, Any]]:
    """Results to reuse: a runner report (``--json``), or one benchmark's JSON line."""
    text = path.read_text()
    try:
        old = json.loads(text)
    except json.JSONDecodeError:
        old = last_json(text)
    if "results" in old:
        return {k: {**v, "reused_from": str(path)} for k, v in old["results"].items()}
    if "benchmark" in old:
        entry = {
            "status": "ok",
            "result": old,
            "quick": bool(old.get("quick", False)),
            "device": old.get("device", "cpu"),
            "command": f"python -m benchmarks.{old['benchmark']} (from {path})",
            "seconds": old.get("seconds"),
            "reused_from": str(path),
        }
        return {old["benchmark"]: entry}
    raise ValueError(f"--reuse {path}: neither a benchmarks.run report nor a benchmark result")


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, minutes on 2 cores")
    parser.add_argument("--gpu", action="store_true", help="device stages on CUDA with bf16")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help=", ".join(NAMES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "out" / "results.json",
        help="where the JSON report is also written (for --reuse)",
    )  # fmt: skip
    parser.add_argument(
        "--reuse",
        type=Path,
        nargs="+",
        default=[],
        help="earlier --json reports or benchmark JSON lines: results of benchmarks not run",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing; render the --reuse results"
    )
    parser.add_argument(
        "--imagenet-weights", type=Path, help="local ResNet-18 ImageNet weights (accuracy)"
    )
    args = parser.parse_args(argv)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print(
                "benchmarks.run: --gpu asked for, but torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run without "
                "--gpu for the CPU figures, or on a machine with a GPU.",
                file=sys.stderr,
            )
            return 2
    if args.imagenet_weights is not None and not args.imagenet_weights.is_file():
        print(f"benchmarks.run: --imagenet-weights {args.imagenet_weights}: no such file")
        return 2
    extra: dict[str, list[str]] = {}
    if args.imagenet_weights is not None:
        extra["accuracy"] = ["--imagenet-weights", str(args.imagenet_weights.resolve())]

    reused: dict[str, dict[str, Any]] = {}
    for path in args.reuse:  # later files win
        reused.update(load_reuse(path))
    sources = [reuse_source(path) for path in args.reuse]
    load_before = _load()

    selected = [b for b in BENCHMARKS if args.only is None or b.name in args.only]
    if args.report_only:
        selected = []
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for bench in BENCHMARKS:
        if bench not in selected:
            if bench.name in reused:
                results[bench.name] = reused[bench.name]
            continue
        if args.quick and bench.quick is None:
            results[bench.name] = {"status": "skipped", "reason": "left out of --quick runs"}
            if bench.name in reused and reused[bench.name].get("status") == "ok":
                results[bench.name] = reused[bench.name]
            continue
        print(f"benchmarks.run: {bench.name} …", file=sys.stderr, flush=True)
        results[bench.name] = run_one(bench, args.quick, args.gpu, extra)
        entry = results[bench.name]
        print(
            f"benchmarks.run: {bench.name} {entry['status']} in {entry.get('seconds')} s"
            + (f": {entry['error'][-300:]}" if entry["status"] == "failed" else ""),
            file=sys.stderr,
            flush=True,
        )
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m benchmarks.run", *(argv or sys.argv[1:])]),
        "git_commit": git_commit(),
        "machine": {**machine(), "load_average_at_start": load_before},
        "quick": args.quick,
        "gpu": args.gpu,
        "seconds": round(time.perf_counter() - start, 1),
        "reused_from": sources,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_markdown(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report), flush=True)
    return 1 if any(e.get("status") == "failed" for e in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
