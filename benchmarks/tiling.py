"""Tiling speed and memory on a large synthetic 40x slide; prints one JSON line.

Goal (issue 2): ≤ 2 s per slide and ≤ 1 GiB peak RSS on a 100,000 × 80,000 px 40x slide.
The slide is generated once into ``--workdir`` (kept for reruns; generated data is never
committed). Tiling runs in a fresh child process so that its peak RSS is its own. The floor
it is compared with is reading the segmentation thumbnail alone (JPEG decoding of that
pyramid level), measured in the same child.

    python -m benchmarks.tiling [--width 100000] [--height 80000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


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
        "goal_s_per_slide": 2.0,
        "goal_peak_rss_mib": 1024,
        "meets_goal": child["tile_s_per_slide"] <= 2.0 and child["peak_rss_mib"] <= 1024,
        "slide_write_s": write_s,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
