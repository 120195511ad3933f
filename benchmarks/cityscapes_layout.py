"""A generated folder in Cityscapes' official layout, for checks at the release's image size.

    ROOT/leftImg8bit/<split>/synthcity/synthcity_000000_<index>_leftImg8bit.png   2048x1024 RGB
    ROOT/gtFine/<split>/synthcity/synthcity_000000_<index>_gtFine_labelIds.png    Cityscapes label ids

The scenes are carbseg's procedural driving scenes (``carbseg.data.synthetic``) rendered at full
Cityscapes resolution; their train-id masks are written as the official label ids, so the folder is
read by ``--dataset cityscapes`` exactly as the real release (the label-id -> train-id table included).
Resumable: existing files are kept.

    python benchmarks/cityscapes_layout.py OUT --train 16 --val 4
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from carbseg.data.cityscapes import IMAGE_SUFFIX, MASK_SUFFIX, label_id_to_train_id
from carbseg.data.synthetic import render_scene, scene_seed

HEIGHT, WIDTH = 1024, 2048  # Cityscapes frames
CITY = "synthcity"


def train_id_to_label_id() -> np.ndarray:
    """(256,) uint8: train id -> the Cityscapes label id that maps back to it; 255 (ignore) -> 0 (unlabeled)."""
    forward = label_id_to_train_id()
    inverse = np.zeros(256, dtype=np.uint8)
    for label_id in range(len(forward) - 1, -1, -1):  # the lowest label id wins a shared train id
        if forward[label_id] != 255:
            inverse[forward[label_id]] = label_id
    return inverse


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write atomically (temporary name, then rename), so an interrupted run leaves no torn file."""
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG", compress_level=1)
    tmp.replace(path)


def _write_frame(job: tuple[int, int, int, Path, Path]) -> None:
    scene, height, width, image_path, mask_path = job
    image, train_ids = render_scene(scene, height, width)
    _save_png(train_id_to_label_id()[train_ids], mask_path)
    _save_png(image, image_path)


def write_cityscapes_layout(root: str | Path, splits: dict[str, int], height: int = HEIGHT,
                            width: int = WIDTH, seed: int = 0, workers: int = 1) -> Path:
    """Write ``splits`` ({split: number of frames}) under ``root`` with ``workers`` processes; returns ``root``."""
    root = Path(root)
    jobs = []
    for split, count in splits.items():
        image_dir = root / "leftImg8bit" / split / CITY
        mask_dir = root / "gtFine" / split / CITY
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            frame = f"{CITY}_000000_{index:06d}"
            image_path, mask_path = image_dir / f"{frame}{IMAGE_SUFFIX}", mask_dir / f"{frame}{MASK_SUFFIX}"
            if not (image_path.is_file() and mask_path.is_file()):
                jobs.append((scene_seed(split, seed, index), height, width, image_path, mask_path))
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            list(pool.map(_write_frame, jobs))
    else:
        for job in jobs:
            _write_frame(job)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="dataset root to write")
    p.add_argument("--train", type=int, default=16, help="frames in the train split")
    p.add_argument("--val", type=int, default=4, help="frames in the val split")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="rendering processes")
    args = p.parse_args()
    print(write_cityscapes_layout(args.out, {"train": args.train, "val": args.val}, workers=args.workers))


if __name__ == "__main__":
    main()
