"""Inference throughput: whole image vs sliding window vs multi-scale + flip TTA.

A randomly initialised segmenter (weights do not change the speed) runs on random images of the
given size; the table gives images/s and milliseconds per image for each mode. The sliding window
uses the Cityscapes eval geometry scaled to the image (crop = half the height and width, stride =
2/3 of the crop: 9 windows), TTA the given scales with horizontal flip.

    python benchmarks/bench_inference.py                      # ResNet-50, 1024x512, CPU
    python benchmarks/bench_inference.py --backbone tiny --height 128 --width 256 --iters 2   # smoke
    python benchmarks/bench_inference.py --full --device cuda  # 2048x1024 on a GPU (bf16 autocast)
"""

from __future__ import annotations

import argparse
import time

import torch

from carbseg.config import ModelConfig
from carbseg.engine.inference import predict_slide, predict_tta, predict_whole
from carbseg.models.segmenter import build_segmenter

NUM_CLASSES = 19


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_mode(run, images: torch.Tensor, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``run(images)``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run(images)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        run(images)
    _sync(device)
    return (time.perf_counter() - start) / iters


def main() -> None:
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
    runs = {
        "whole": lambda x: predict_whole(model, x),
        "slide": lambda x: predict_slide(model, x, crop, stride, NUM_CLASSES),
        "tta": lambda x: predict_tta(model, x, scales=scales, flip=True),
    }
    details = {"whole": "1 pass", "slide": f"crop {crop[0]}x{crop[1]}, stride {stride[0]}x{stride[1]}",
               "tta": f"scales {','.join(str(s) for s in scales)} x flip"}

    print(f"backbone={args.backbone} image={width}x{height} batch={args.batch} device={device} "
          f"threads={torch.get_num_threads()} iters={args.iters} warmup={args.warmup}")
    print(f"| {'mode':<6} | {'images/s':>9} | {'ms/image':>9} | details")
    print(f"|{'-' * 8}|{'-' * 11}|{'-' * 11}|{'-' * 40}")
    for mode in args.modes.split(","):
        seconds = time_mode(runs[mode], images, args.iters, args.warmup, device)
        per_image = seconds / args.batch
        print(f"| {mode:<6} | {1.0 / per_image:>9.3f} | {1000 * per_image:>9.1f} | {details[mode]}")


if __name__ == "__main__":
    main()
