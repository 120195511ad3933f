"""Inference throughput: whole image vs sliding window vs multi-scale + flip TTA.

A randomly initialised segmenter (weights do not change the speed) runs on random images of the
given size; the table gives images/s and milliseconds per image for each mode. The sliding window
uses the Cityscapes eval geometry scaled to the image (crop = half the height and width, stride =
2/3 of the crop: 9 windows), TTA the given scales with horizontal flip.

    python benchmarks/bench_inference.py                      # ResNet-50, 1024x512, CPU
    python benchmarks/bench_inference.py --backbone tiny --height 128 --width 256 --iters 2   # smoke
    python benchmarks/bench_inference.py --full --device cuda  # 2048x1024 on a GPU (bf16 autocast)

Each mode runs at the precision ``auto`` chooses (``carbseg.precision.segmenter_precision``: native
bf16 on GPUs, fp16 on older ones; on a CPU bf16 only where a timed probe measured it faster) and in
fp32, interleaved (auto, fp32, auto, fp32, ...), medians: the ratio says whether ``auto`` pays on this
machine, measured under the same load (where auto is fp32 both rows are the same computation and the
ratio is noise). The header names the machine (CPU model, the CPU's bf16 flag, torch, threads, load
average) and what ``auto`` chose and why.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from carbseg.allocator import keep_freed_memory
from carbseg.config import ModelConfig
from carbseg.engine.inference import predict_slide, predict_tta, predict_whole
from carbseg.models.segmenter import build_segmenter
from carbseg.precision import machine_summary, segmenter_precision

NUM_CLASSES = 19


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_modes(runs: dict, images: torch.Tensor, iters: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per call of each ``runs[name](images)``, timed in turn, after ``warmup`` rounds."""
    for _ in range(warmup):
        for run in runs.values():
            run(images)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            run(images)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    keep_freed_memory()  # as the carbseg command does (CARBSEG_ALLOCATOR=default: glibc's own thresholds)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50", choices=("resnet50_v1c", "resnet101_v1c", "resnet50", "resnet101", "efficientnet_lite0", "small", "tiny"))
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--full", action="store_true", help="2048x1024 (Cityscapes full resolution), meant for a GPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tta-scales", default="0.75,1.0,1.25", help="comma-separated TTA scales (with flip)")
    parser.add_argument("--modes", default="whole,slide,tta")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = (1024, 2048) if args.full else (args.height, args.width)
    device = torch.device(args.device)
    cfg = ModelConfig(backbone=args.backbone, pretrained="none", classifier="learned")
    model = build_segmenter(cfg, NUM_CLASSES, load_pretrained=False).to(device).eval()
    images = torch.rand(args.batch, 3, height, width, device=device) * 255
    crop = (height // 2, width // 2)
    stride = (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
    scales = tuple(float(s) for s in args.tta_scales.split(","))
    runs = {  # amp None: the precision auto chooses; False: fp32
        "whole": lambda x, amp: predict_whole(model, x, amp=amp),
        "slide": lambda x, amp: predict_slide(model, x, crop, stride, NUM_CLASSES, amp=amp),
        "tta": lambda x, amp: predict_tta(model, x, scales=scales, flip=True, amp=amp),
    }
    details = {"whole": "1 pass", "slide": f"crop {crop[0]}x{crop[1]}, stride {stride[0]}x{stride[1]}",
               "tta": f"scales {','.join(str(s) for s in scales)} x flip"}

    auto = segmenter_precision(device)
    print(machine_summary(device))
    print(f"precision auto on {device}: {auto.name} ({auto.reason})")
    print(f"backbone={args.backbone} image={width}x{height} batch={args.batch} device={device} "
          f"threads={torch.get_num_threads()} iters={args.iters} warmup={args.warmup}; auto and fp32 timed in turn")
    print(f"| {'mode':<6} | {'images/s auto':>13} | {'ms/image auto':>13} | {'ms/image fp32':>13} | "
          f"{'auto vs fp32':>12} | details")
    print(f"|{'-' * 8}|{'-' * 15}|{'-' * 15}|{'-' * 15}|{'-' * 14}|{'-' * 40}")
    for mode in args.modes.split(","):
        run = runs[mode]
        seconds = time_modes({"auto": lambda x, r=run: r(x, None), "fp32": lambda x, r=run: r(x, False)},
                             images, args.iters, args.warmup, device)
        per_image = {k: v / args.batch for k, v in seconds.items()}
        print(f"| {mode:<6} | {1.0 / per_image['auto']:>13.3f} | {1000 * per_image['auto']:>13.1f} | "
              f"{1000 * per_image['fp32']:>13.1f} | {per_image['fp32'] / per_image['auto']:>11.2f}x | {details[mode]}")


if __name__ == "__main__":
    main()
