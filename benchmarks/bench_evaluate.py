"""Throughput of `evaluate --pred` on CamVid val, PNG decoding included.

Predictions are the ground truth shifted by a few pixels, written to a temporary folder first (not
timed). Each run reads every prediction and GT PNG, checks them and accumulates the confusion matrix,
exactly as `carbseg evaluate --pred` does. Target: >= 100 images/s with 2 workers on 2 cores.

    python benchmarks/bench_evaluate.py [--images N] [--repeats R] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from carbseg.data.datasets import build_dataset
from carbseg.engine.evaluate import evaluate_predictions
from carbseg.io import write_png_atomic

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


class Subset:
    """The first ``n`` images of a dataset (same interface as far as evaluation needs)."""

    def __init__(self, dataset, n: int):
        self._dataset = dataset
        self.classes = dataset.classes
        self.ids = dataset.ids[:n]
        self.has_masks = dataset.has_masks

    def __len__(self) -> int:
        return len(self.ids)

    def load_mask(self, index: int, image_shape=None):
        return self._dataset.load_mask(index, image_shape)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=0, help="first N val images (default: all 101)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best is reported")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if not (CAMVID / "val").is_dir():
        print(f"skipped: CamVid not found at {CAMVID} (../shared/data/camvid relative to the project root)")
        return 0
    dataset = build_dataset("camvid", CAMVID, "val")
    if args.images:
        dataset = Subset(dataset, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        pred_dir = Path(tmp)
        for i, image_id in enumerate(dataset.ids):
            gt = dataset.load_mask(i)
            pred = np.roll(np.where(gt == 255, 0, gt), shift=(2, 5), axis=(0, 1)).astype(np.uint8)
            write_png_atomic(pred_dir / f"{image_id}.png", pred)
        evaluate_predictions(dataset, pred_dir, progress=False, workers=1)  # warm the file cache
        rows = []
        for workers in args.workers:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                confusion, _ = evaluate_predictions(dataset, pred_dir, progress=False, workers=workers)
                times.append(time.perf_counter() - start)
            best = min(times)
            rows.append((workers, len(dataset), best, len(dataset) / best, 100 * confusion.miou()))
    print(f"evaluate --pred on CamVid val (480x360), best of {args.repeats}")
    print(f"{'workers':>7}  {'images':>6}  {'seconds':>8}  {'images/s':>8}  {'mIoU':>6}")
    for workers, n, seconds, rate, miou in rows:
        print(f"{workers:>7}  {n:>6}  {seconds:>8.3f}  {rate:>8.1f}  {miou:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
