"""GPU readiness in one command: the ``gpu`` tests and the GPU benchmarks, one table at the end.

    python benchmarks/gpu_check.py            # about 5-10 minutes on one modern GPU, unattended
    python benchmarks/gpu_check.py --quick    # smaller benchmark sizes (a smoke run)

Runs, each with its own time limit so the whole stays under 10 minutes:
1. ``pytest -m gpu`` (autocast bf16 / fp16 + GradScaler, channels_last, resume, the teacher's bf16
   path, online = offline teacher, inference and export on CUDA, NCCL + SyncBN with two GPUs);
2. benchmarks/bench_teacher.py at 2048x1024 (target: batched bf16 >= 4x the fp32 one-image baseline);
3. benchmarks/bench_train_step.py, ResNet-50 V1c, 512x1024, batch 4, CLIP teacher (targets: teacher
   at most 35% of the optimised step, optimised step >= 1.5x a straightforward fp32 step).
Weights are random (no downloads); the speed is that of the real networks. Exit status 0 when every
check meets its target. Paste the printed table into benchmarks/RESULTS.md with the card's name.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], timeout: int) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        out, code = out + f"\n(timed out after {timeout} s)", 124
    print(out, flush=True)
    return code, out, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller benchmark sizes")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; nothing to check", file=sys.stderr)
        return 2
    card = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"
    rows: list[tuple[str, str, str, bool]] = []

    code, out, secs = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           "tests/test_gpu.py", "tests/test_cuda_paths.py"], timeout=240)
    summary = re.findall(r"(\d+) (passed|failed|skipped|error)", out)
    counts = ", ".join(f"{n} {what}" for n, what in summary) or "no summary"
    rows.append(("gpu tests", f"{counts} ({secs:.0f} s)", "all pass", code == 0))

    size, images = ("1024x512", "4") if args.quick else ("2048x1024", "8")
    code, out, secs = run([sys.executable, "benchmarks/bench_teacher.py", "--size", size, "--images", images,
                           "--batch", "4", "--device", "cuda"], timeout=180)
    match = re.search(r"\| carbseg \| maskclip \| \d+ \| (\w+) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+)% \| (\d+) \|", out)
    if match:
        prec, ips, speed, same, mib = match.groups()
        rows.append((f"teacher {size} ({prec}, batch 4)",
                     f"{float(ips):.2f} img/s, {speed}x baseline, {same}% identical, {mib} MiB", ">= 4x",
                     float(speed) >= 4.0))
    else:
        rows.append((f"teacher {size}", f"failed (exit {code})", ">= 4x", False))

    height, width = ("256", "512") if args.quick else ("512", "1024")
    code, out, secs = run([sys.executable, "benchmarks/bench_train_step.py", "--device", "cuda", "--backbone",
                           "resnet50_v1c", "--height", height, "--width", width, "--batch", "4", "--patch",
                           height, str(int(width) // 4), "--scale", "1", "1", "--teacher", "clip", "--classifier",
                           "text", "--steps", "5", "--warmup", "2"], timeout=240)
    row = re.search(r"\| optimised +\|[^\n]*\|\s*([\d.]+)x \|\s*([\d.]+)% \|\s*(\d+) \|", out)
    if row:
        ratio, share, mib = row.groups()
        rows.append((f"train step R50-V1c {height}x{width} b4: teacher share", f"{share}%", "<= 35%",
                     float(share) <= 35.0))
        rows.append(("train step: optimised / fp32", f"{ratio}x ({mib} MiB peak)", ">= 1.5x",
                     float(ratio) >= 1.5))
    else:
        rows.append(("train step", f"failed (exit {code})", "runs", False))

    print(f"\nGPU check on {card}")
    print("| check | result | target | met |")
    print("|---|---|---|---|")
    for name, result, target, ok in rows:
        print(f"| {name} | {result} | {target} | {'yes' if ok else 'NO'} |")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
