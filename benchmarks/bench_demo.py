"""Time `carbseg demo` stage by stage (wall and CPU seconds) and print a table.

    python benchmarks/bench_demo.py --out /tmp/demo_bench [--threads 1] [--quick] [--seed 1]
    python benchmarks/bench_demo.py --out /tmp/demo_bench --report-only   # table of an existing demo folder
    python benchmarks/bench_demo.py --out /tmp/demo_cmp --against-baseline --seeds 0,1

CPU seconds are this process's (all threads): on a machine shared with other jobs the wall clock is
inflated, while the CPU time is what the demo itself needed. Run on an idle machine for the target
(<= 10 minutes on 2 cores, held-out mIoU >= 40).

``--seed S`` is the training seed (the override ``seed=S``: model initialisation, data order, augmentation,
simulated-teacher noise) on the same generated scenes. ``--against-baseline`` runs, per seed and one after
another in fresh processes, the demo as it ran before issue 12's speed work (fp32 forced with
``CARBSEG_CPU_PRECISION=fp32``, glibc's own allocator thresholds with ``CARBSEG_ALLOCATOR=default``) and the
demo as ``carbseg demo`` runs it now, in ``OUT/baseline_seedS`` and ``OUT/current_seedS``, and prints one table
with each seed's ratio: the item-3 measurement in one command (about 3 + 2.5 minutes per seed on 2 AMX cores).
``--baseline-src CLONE/src`` runs the baseline from another checkout instead (e.g. a clone pinned to the commit
before issue 12's speed work: its own code, fp32, glibc's thresholds), so that the speed-ups that have no
switch (channels-last, the logits' upsampling, the batched teacher, the decoded-frame cache) count as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BASELINE_ENV = {"CARBSEG_CPU_PRECISION": "fp32", "CARBSEG_ALLOCATOR": "default"}
BASELINE_DEMO = """
import dataclasses, sys
from carbseg.demo import QUICK, DemoSettings, run_demo
settings = QUICK if sys.argv[3] == "quick" else DemoSettings()
settings = dataclasses.replace(settings, overrides=(*settings.overrides, f"seed={sys.argv[2]}"))
run_demo(sys.argv[1], settings, progress=False)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="demo folder (must be new, or a finished demo with --report-only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="the minuscule smoke-test size")
    parser.add_argument("--seed", type=int, default=None, help="training seed (override seed=S; same scenes)")
    parser.add_argument("--report-only", action="store_true", help="only print the table of an existing demo")
    parser.add_argument("--against-baseline", action="store_true",
                        help="baseline (fp32, glibc's allocator defaults) and current demo per seed, one table")
    parser.add_argument("--seeds", default="0", help="with --against-baseline: comma-separated training seeds")
    parser.add_argument("--baseline-src", default=None,
                        help="with --against-baseline: the src folder of another checkout to run the baseline from")
    args = parser.parse_args()

    if args.against_baseline:
        compare(args)
        return
    if not args.report_only:
        import torch

        from carbseg.allocator import keep_freed_memory
        from carbseg.demo import QUICK, DemoSettings, run_demo
        from carbseg.precision import machine_summary

        keep_freed_memory()  # as `carbseg demo` does (CARBSEG_ALLOCATOR=default: glibc's own thresholds)
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"at the start: {machine_summary('cpu')}")
        settings = QUICK if args.quick else DemoSettings()
        if args.seed is not None:
            settings = dataclasses.replace(settings, overrides=(*settings.overrides, f"seed={args.seed}"))
        started = time.perf_counter()
        run_demo(args.out, settings, progress=False)
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


def compare(args) -> None:
    """Baseline and current demo per seed, each in a fresh process (the allocator is set once per process)."""
    out = Path(args.out)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        reports = {}
        for kind in ("baseline", "current"):
            folder = out / f"{kind}_seed{seed}"
            env = {k: v for k, v in os.environ.items() if k not in BASELINE_ENV}
            if kind == "baseline":
                env.update(BASELINE_ENV)
            cmd = [sys.executable, __file__, "--out", str(folder), "--seed", str(seed)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            if kind == "baseline" and args.baseline_src:
                # That checkout's own demo (it may predate this script's helpers): run_demo with the seed.
                env["PYTHONPATH"] = str(Path(args.baseline_src).resolve())
                cmd = [sys.executable, "-c", BASELINE_DEMO, str(folder), str(seed), "quick" if args.quick else ""]
            if not (folder / "report.json").exists():
                print(f"seed {seed}, {kind}: {' '.join(f'{k}={v}' for k, v in env.items() if k in BASELINE_ENV)} "
                      f"{' '.join(cmd[1:])}", flush=True)
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            reports[kind] = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        rows.append((seed, reports))
    print(f"measured on: {rows[0][1]['current'].get('machine', 'not recorded')}")
    if args.baseline_src:
        print(f"baseline: the demo of the checkout at {args.baseline_src}")
    print("| seed | demo | precision | test mIoU | val mIoU | train (s) | total (s) | vs baseline |")
    print("|--:|---|---|--:|--:|--:|--:|--:|")
    for seed, reports in rows:
        base = reports["baseline"]["first_run_timings_s"]
        for kind, report in reports.items():
            stages = report["first_run_timings_s"]
            total = sum(stages.values())
            precision = (report.get("training_precision") or {}).get("model", "not recorded")
            print(f"| {seed} | {kind} | {precision} | {report['miou']:.1f} | {report['val_miou']:.1f} | "
                  f"{stages['train']:.1f} | {total:.1f} | {sum(base.values()) / total:.2f}x |")


if __name__ == "__main__":
    main()
