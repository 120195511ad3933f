"""Throughput of a model's evaluation (``evaluate_checkpoint``: `carbseg evaluate --checkpoint` and the
trainer's validation) with its images decoded in the main process (``--workers 0``) or in DataLoader
workers, over generated Cityscapes-size scenes (PNG files, 2048x1024 by default).

Each setting is timed over the whole folder after one untimed pass (the file cache warm, the model's
kernels chosen); the confusion matrices of all settings must be identical, and the script says so.
The model has random weights (``model.pretrained=none``): the figure is the loader and the forward
pass, not a score.

GPU, the release's evaluation (R50-V1c at output stride 8, whole 2048x1024 image, batch 1):
    python benchmarks/bench_evaluate_loader.py --device cuda --images 16 --workers 0 2 4
CPU smoke run (small frames, tiny backbone):
    python benchmarks/bench_evaluate_loader.py --device cpu --backbone tiny --size 256x512 --images 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from carbseg.config import Config, ModelConfig
from carbseg.data.datasets import build_dataset
from carbseg.data.synthetic import generate_synthetic_dataset
from carbseg.devices import parse_device
from carbseg.engine.checkpoint import save_model
from carbseg.engine.inference import evaluate_checkpoint
from carbseg.models.segmenter import build_segmenter
from carbseg.precision import machine_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default="resnet50_v1c", choices=("resnet50_v1c", "efficientnet_lite0", "tiny"))
    parser.add_argument("--size", default="1024x2048", metavar="HxW", help="frame size (default 1024x2048)")
    parser.add_argument("--images", type=int, default=16, help="generated frames (default 16)")
    parser.add_argument("--batch", type=int, default=1, help="eval.batch_size (default 1, as the release)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="settings to time (default 0 2)")
    parser.add_argument("--data", default=None, help="keep the generated frames in this folder (default: temporary)")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))
    device = parse_device(args.device)
    print(machine_summary(device))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        generate_synthetic_dataset(root, "val", args.images, height, width, seed=0, progress=False)
        dataset = build_dataset("synthetic", root, "val")
        cfg = Config(name="bench-evaluate-loader")
        cfg.model = ModelConfig(backbone=args.backbone, pretrained="none", classifier="learned")
        if args.backbone == "tiny":
            cfg.model.head_channels, cfg.model.aspp_dilations = 64, [1, 2, 3, 4]
        torch.manual_seed(0)
        model = build_segmenter(cfg.model, dataset.classes.num_classes, load_pretrained=False)
        path = save_model(Path(tmp) / "model.safetensors", model, cfg, dataset.classes)
        rows, matrices = [], []
        for workers in args.workers:
            run = dict(device=device, batch_size=args.batch, progress=False, keep_samples=0, num_workers=workers)
            evaluate_checkpoint(dataset, path, **run)  # untimed: file cache, cuDNN's choices, worker start-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            confusion, _, _ = evaluate_checkpoint(dataset, path, **run)
            seconds = time.perf_counter() - start
            rows.append((workers, seconds, len(dataset) / seconds))
            matrices.append(confusion.matrix)
    print(f"\nevaluate_checkpoint on {device}: {args.backbone}, {len(dataset)} frames of {height}x{width}, "
          f"batch {args.batch}, whole image, one scale")
    print(f"| workers | seconds | images/s | vs {args.workers[0]} workers |")
    print("|---|---|---|---|")
    for workers, seconds, rate in rows:
        print(f"| {workers} | {seconds:.2f} | {rate:.2f} | {rate / rows[0][2]:.2f}x |")
    same = all(np.array_equal(m, matrices[0]) for m in matrices)
    print("confusion matrices identical across settings" if same else "CONFUSION MATRICES DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
