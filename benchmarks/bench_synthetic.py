"""Throughput of the procedural scene generator (the demo trains on it, so it must be fast).

Usage: python benchmarks/bench_synthetic.py [--num 20] [--sizes 256x128,512x256,1024x512]
Prints one row per size: milliseconds per scene (median, best) and scenes per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

from carbseg.data.synthetic import render_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=20, help="scenes per size")
    parser.add_argument("--sizes", default="256x128,512x256,1024x512", help="comma-separated WIDTHxHEIGHT")
    args = parser.parse_args()
    render_scene(0, 64, 128)  # warm-up (imports, allocator)
    print(f"{'size':>10} | {'median ms':>9} | {'best ms':>7} | {'scenes/s':>8}")
    print(f"{'-' * 10}-+-{'-' * 9}-+-{'-' * 7}-+-{'-' * 8}")
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        times = []
        for seed in range(args.num):
            start = time.perf_counter()
            render_scene(seed, height, width)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(f"{size:>10} | {median * 1e3:9.1f} | {min(times) * 1e3:7.1f} | {1 / median:8.1f}")


if __name__ == "__main__":
    main()
