"""Tiling speed and memory on a large synthetic 40x slide; prints one JSON line.

With ``--clam DIR`` (a checkout of mahmoodlab/CLAM, run with ``--clam_python``, an
interpreter with its PyPI dependencies: opencv-python-headless, h5py, pandas, matplotlib,
openslide-python, openslide-bin), also the whole ``histcode tile`` CLI process side by side
with CLAM's ``create_patches_fp.py --seg --patch`` on the same slide, interleaved,
``--repeats`` times: wall time and peak RSS of each process (``os.wait4``). Goal: histcode
≤ 0.5 × CLAM's wall time and ≤ 1 GiB. Nothing of CLAM is committed.

Goal of the tiling alone: ≤ 2 s per slide and ≤ 1 GiB peak RSS on a 100,000 × 80,000 px 40x
slide.
The slide is generated once into ``--workdir`` (kept for reruns; generated data is never
committed). Tiling runs in a fresh child process so that its peak RSS is its own. The floor
it is compared with is reading the segmentation thumbnail alone (JPEG decoding of that
pyramid level), measured in the same child.

    python -m benchmarks.tiling [--width 100000] [--height 80000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.spec import Benchmark, Row, fmt

GOAL_S_PER_SLIDE = 2.0
GOAL_PEAK_RSS_MIB = 1024
#: the `histcode tile` process against CLAM's create_patches_fp (wall time, median)
GOAL_RATIO_TO_CLAM = 0.5


def timed_process(cmd: list[str], cwd: Path | None = None) -> tuple[float, float]:
    """Run a command; its wall seconds and peak RSS in MiB (its own, via ``os.wait4``)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def versus_clam(slide: Path, clam: Path, clam_python: str, repeats: int) -> dict:
    """``histcode tile`` and CLAM's ``create_patches_fp.py`` as whole processes, interleaved."""
    work = Path(tempfile.mkdtemp(prefix="histcode-bench-clam-"))
    src = work / "slides"
    src.mkdir()
    (src / slide.name).symlink_to(slide.resolve())
    histcode_cli = [sys.executable, "-m", "histcode.cli", "tile", "--slides", str(src)]
    ours, theirs, ours_rss, theirs_rss = [], [], [], []
    try:
        for i in range(repeats):
            out = work / f"tiles-{i}.zarr"
            wall, rss = timed_process([*histcode_cli, "--out", str(out)])
            ours.append(wall)
            ours_rss.append(rss)
            clam_out = work / f"clam-{i}"
            wall, rss = timed_process(
                [
                    clam_python,
                    "create_patches_fp.py",
                    "--source",
                    str(src),
                    "--save_dir",
                    str(clam_out),
                    "--patch_size",
                    "256",
                    "--seg",
                    "--patch",
                ],
                cwd=clam,
            )
            theirs.append(wall)
            theirs_rss.append(rss)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {
        "histcode_tile_s": [round(v, 2) for v in ours],
        "clam_create_patches_fp_s": [round(v, 2) for v in theirs],
        "histcode_peak_rss_mib": round(max(ours_rss), 1),
        "clam_peak_rss_mib": round(max(theirs_rss), 1),
        "ratio_to_clam": round(statistics.median(ratios), 3),
        "ratio_to_clam_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "goal_ratio_to_clam": GOAL_RATIO_TO_CLAM,
        "meets_clam_goal": statistics.median(ratios) <= GOAL_RATIO_TO_CLAM
        and max(ours_rss) <= GOAL_PEAK_RSS_MIB,
        "histcode_command": "histcode tile --slides DIR --out DIR (defaults: 0.5 µm/px, 256 px)",
        "clam_command": "create_patches_fp.py --source DIR --save_dir DIR --patch_size 256 "
        "--seg --patch (level 0 of the 40x slide, CLAM's defaults otherwise)",
    }


def _child(path: Path, repeats: int) -> dict:
    from histcode.slide import SlideReader
    from histcode.tiling import TilingParams, tile_slide

    params = TilingParams()
    times, thumb_times, tiles = [], [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        with SlideReader(path) as reader:
            reader.thumbnail(params.seg_mpp, params.seg_coarsen)
        thumb_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = tile_slide(path, params)
        times.append(time.perf_counter() - start)
        if result.status != "ok":
            raise RuntimeError(result.attrs["error"])
        tiles = len(result.coords)
    return {
        "tile_s_per_slide": round(statistics.median(times), 3),
        "tile_s_all": [round(t, 3) for t in times],
        "thumbnail_read_s": round(statistics.median(thumb_times), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tiles": tiles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=100_000)
    parser.add_argument("--height", type=int, default=80_000)
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--clam", type=Path, help="a CLAM checkout: compare with it")
    parser.add_argument("--clam_python", default="python", help="interpreter for CLAM")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.repeats)))
        return

    from histcode.synth import write_test_slide

    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"bench-{args.width}x{args.height}-{args.mpp}.svs"
    write_s = None
    if not path.exists():
        start = time.perf_counter()
        write_test_slide(
            path,
            width_um=args.width * args.mpp,
            height_um=args.height * args.mpp,
            mpp=args.mpp,
            seed=0,
        )
        write_s = round(time.perf_counter() - start, 1)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.tiling",
            "--child",
            str(path),
            "--repeats",
            str(args.repeats),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    child = json.loads(out.stdout.strip().splitlines()[-1])
    result = {
        "benchmark": "tiling",
        "slide_px": [args.width, args.height],
        "slide_mpp": args.mpp,
        **child,
        "ratio_to_thumbnail_read": round(child["tile_s_per_slide"] / child["thumbnail_read_s"], 2),
        "goal_s_per_slide": GOAL_S_PER_SLIDE,
        "goal_peak_rss_mib": GOAL_PEAK_RSS_MIB,
        "meets_goal": child["tile_s_per_slide"] <= GOAL_S_PER_SLIDE
        and child["peak_rss_mib"] <= GOAL_PEAK_RSS_MIB,
        "slide_write_s": write_s,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    if args.clam:
        result.update(versus_clam(path, args.clam, args.clam_python, args.repeats))
    print(json.dumps(result))


# -- report --------------------------------------------------------------------------------


def speed_rows(r: dict[str, Any]) -> list[Row]:
    """Seconds and peak RSS a slide against reading the thumbnail; the CLI against CLAM."""
    s, rss = r.get("tile_s_per_slide"), r.get("peak_rss_mib")
    px = "×".join(f"{v:,}" for v in r.get("slide_px", []))
    rows: list[Row] = [
        (
            f"tiling ({px} px slide)",
            f"{fmt(s)} s/slide, peak RSS {fmt(rss)} MiB",
            f"thumbnail read {fmt(r.get('thumbnail_read_s'))} s",
            fmt(r.get("ratio_to_thumbnail_read")),
            f"≤ {r.get('goal_s_per_slide')} s, ≤ {r.get('goal_peak_rss_mib')} MiB",
            "yes" if r.get("meets_goal") else "**no**",
        )
    ]
    if r.get("ratio_to_clam") is not None:
        lo, hi = r.get("ratio_to_clam_range", [None, None])
        rows.append(
            (
                f"`histcode tile` CLI process vs CLAM ({px} px slide)",
                f"{fmt(min(r['histcode_tile_s']))}–{fmt(max(r['histcode_tile_s']))} s, "
                f"peak RSS {fmt(r.get('histcode_peak_rss_mib'))} MiB",
                f"CLAM create_patches_fp {fmt(min(r['clam_create_patches_fp_s']))}–"
                f"{fmt(max(r['clam_create_patches_fp_s']))} s, "
                f"{fmt(r.get('clam_peak_rss_mib'))} MiB",
                f"{fmt(r.get('ratio_to_clam'))} ({fmt(lo)}–{fmt(hi)})",
                f"≤ {r.get('goal_ratio_to_clam')}, ≤ {GOAL_PEAK_RSS_MIB} MiB",
                "yes" if r.get("meets_clam_goal") else "**no**",
            )
        )
    return rows


SPEC = Benchmark(
    name="tiling",
    what="tiling a 100,000 × 80,000 px 40x slide: s/slide and peak RSS",
    quick=["--width", "12000", "--height", "10000", "--repeats", "1"],
    order=10,
    goals=(
        f"≤ {GOAL_S_PER_SLIDE} s a slide and ≤ {GOAL_PEAK_RSS_MIB} MiB peak RSS on a "
        "100,000 × 80,000 px 40x slide",
        f"with --clam: the `histcode tile` process ≤ {GOAL_RATIO_TO_CLAM} × CLAM's "
        "create_patches_fp on the same slide",
    ),
    speed_rows=speed_rows,
)


if __name__ == "__main__":
    main()
