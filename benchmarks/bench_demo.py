"""Time `carbseg demo` stage by stage (wall and CPU seconds) and print a table.

    python benchmarks/bench_demo.py --out /tmp/demo_bench [--threads 1] [--quick]
    python benchmarks/bench_demo.py --out /tmp/demo_bench --report-only   # table of an existing demo folder

CPU seconds are this process's (all threads): on a machine shared with other jobs the wall clock is
inflated, while the CPU time is what the demo itself needed. Run on an idle machine for the target
(<= 10 minutes on 2 cores, held-out mIoU >= 40).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="demo folder (must be new, or a finished demo with --report-only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="the minuscule smoke-test size")
    parser.add_argument("--report-only", action="store_true", help="only print the table of an existing demo")
    args = parser.parse_args()

    if not args.report_only:
        import torch

        from carbseg.allocator import keep_freed_memory
        from carbseg.demo import QUICK, DemoSettings, run_demo
        from carbseg.precision import machine_summary

        keep_freed_memory()  # as `carbseg demo` does (CARBSEG_ALLOCATOR=default: glibc's own thresholds)
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"at the start: {machine_summary('cpu')}")
        started = time.perf_counter()
        run_demo(args.out, QUICK if args.quick else DemoSettings(), progress=False)
        print(f"wall clock including imports: {time.perf_counter() - started:.1f} s")
    report = json.loads((Path(args.out) / "report.json").read_text(encoding="utf-8"))
    stages = report["first_run_timings_s"]
    print(f"load average now: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; threads: {report['settings']['threads']}")
    # The machine line is the demo's own, written when its report was (older demo folders lack it).
    print(f"measured on: {report.get('machine', 'not recorded')}")
    print(f"training precision: {report.get('training_precision') or 'not recorded'}")
    print("| stage | wall s (first run) |")
    print("|---|--:|")
    for name, seconds in stages.items():
        print(f"| {name} | {seconds:.1f} |")
    print(f"| **sum** | {sum(stages.values()):.1f} |")
    if not report["reused_stages"]:
        print(f"CPU seconds of the run: {report['timings_s']['cpu_total']:.1f}")
    print(f"held-out mIoU {report['miou']:.2f}; pseudo-mask mIoU {report['pseudo_mask_miou']:.2f}")


if __name__ == "__main__":
    main()
