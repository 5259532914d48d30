"""Embedding memory stays flat with slide size: peak RSS on a ~145,000-tile slide vs a small one.

Tiles the large synthetic 40x slide of ``benchmarks/tiling.py`` (100,000 × 80,000 px) at
0.5 µm/px with 64 px tiles (about 145,000 tiles) and a small slide the same way, embeds each
in a fresh child process with the tiny encoder, and prints one JSON line with each child's
peak RSS. Flat memory means the large slide's peak is close to the small one's.

    python -m benchmarks.embedding_memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.spec import Benchmark, Row, fmt, meets

#: peak RSS of the ~145,000-tile slide over the small one's: flat means at most this
GOAL_RSS_RATIO = 1.25


def _child(tiles: Path, out: Path) -> dict:
    from histcode.embedding import embed_store

    start = time.perf_counter()
    report = embed_store(
        tiles, out, "tiny", batch_size=256, workers=1, overwrite=True, progress=False
    )
    return {
        "tiles": report.tiles_embedded,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mib": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return

    from histcode.synth import write_test_slide
    from histcode.tiling import TilingParams, tile_slides

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    big = work / "bench-100000x80000-0.25.svs"
    if not big.exists():
        write_test_slide(big, width_um=25_000, height_um=20_000, mpp=0.25, seed=0)
    small = work / "bench-small.svs"
    if not small.exists():
        write_test_slide(small, width_um=3_000, height_um=2_500, mpp=0.25, seed=0)
    result = {"benchmark": "embedding_memory"}
    for name, slide in (("small", small), ("large", big)):
        tiles = work / f"mem-{name}-tiles.zarr"
        tile_slides(
            [slide], tiles, TilingParams(mpp=0.5, tile_size=64), overwrite=True, progress=False
        )
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.embedding_memory",
                "--child",
                str(tiles),
                str(work / f"mem-{name}-features.zarr"),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        result[name] = json.loads(out.stdout.strip().splitlines()[-1])
    result["rss_ratio_large_to_small"] = round(
        result["large"]["peak_rss_mib"] / result["small"]["peak_rss_mib"], 2
    )
    print(json.dumps(result))


# -- report --------------------------------------------------------------------------------


def speed_rows(r: dict[str, Any]) -> list[Row]:
    """Peak RSS of the large slide against the small one."""
    large, small = r.get("large", {}), r.get("small", {})
    return [
        (
            f"embedding memory ({fmt(large.get('tiles'))} tiles)",
            f"peak RSS {fmt(large.get('peak_rss_mib'))} MiB",
            f"{fmt(small.get('tiles'))}-tile slide {fmt(small.get('peak_rss_mib'))} MiB",
            fmt(r.get("rss_ratio_large_to_small")),
            "≈ 1 (flat)",
            meets(r.get("rss_ratio_large_to_small"), GOAL_RSS_RATIO, higher=False),
        )
    ]


SPEC = Benchmark(
    name="embedding_memory",
    what="peak RSS embedding a ~145,000-tile slide vs a small one",
    quick=None,
    order=40,
    goals=(f"peak RSS flat in the slide's size: large / small ≤ {GOAL_RSS_RATIO}",),
    speed_rows=speed_rows,
)


if __name__ == "__main__":
    main()
