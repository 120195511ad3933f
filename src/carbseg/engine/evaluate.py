"""Evaluate a folder of predictions (or pseudo-masks) against a dataset's ground truth.

Predictions are ``PRED_DIR/IMAGE_ID.png``, 8-bit train ids; 255 (ignore, e.g. where a pseudo-mask
abstains) counts as a miss on every evaluated pixel (see ``carbseg.metrics``). Pseudo-masks from
``carbseg pseudo-masks`` are evaluated exactly like segmenter predictions.

PNG decoding dominates the cost, so images are read in a thread pool (PIL releases the GIL while it
decodes) and counted with one ``bincount`` each.

``evaluation_batches`` is the loader of a model's evaluation (``evaluate_checkpoint``: ``carbseg
evaluate --checkpoint`` and the trainer's validation): DataLoader workers decode each image and its
ground truth while the model predicts the previous ones, and ship them as uint8 (a quarter of the
bytes of float32), in pinned memory when they go to a GPU, where they become float.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from carbseg.console import ProgressLog, progress_lines, show_progress
from carbseg.data.base import SegmentationDataset
from carbseg.data.classes import IGNORE_INDEX
from carbseg.engine.report import QualitativeSample
from carbseg.errors import UserError
from carbseg.io import read_label_png
from carbseg.metrics import ConfusionMatrix, confusion_counts, iou_from_counts

log = logging.getLogger(__name__)


@dataclass
class ImageStats:
    """Per-image scores, used to pick the best and worst images for the qualitative grids."""

    index: int  # position in the dataset
    id: str
    miou: float  # percent, over the classes present in this image's GT or prediction; NaN if none
    pixel_acc: float  # percent; NaN when the image has no evaluated pixel


def prediction_path(pred_dir: str | os.PathLike, image_id: str) -> Path:
    return Path(pred_dir) / f"{image_id}.png"


def check_predictions_exist(dataset: SegmentationDataset, pred_dir: str | os.PathLike) -> None:
    """Fail before any heavy work if a prediction is missing: name the first one and the count."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"{pred_dir}: prediction folder not found; pass the folder holding IMAGE_ID.png files")
    missing = [i for i in dataset.ids if not prediction_path(pred_dir, i).is_file()]
    if missing:
        raise UserError(
            f"{prediction_path(pred_dir, missing[0])}: prediction missing ({len(missing)} of {len(dataset.ids)} "
            "images have none); predict every image of the split (file names IMAGE_ID.png, in train ids)"
        )


def read_prediction(path: Path, num_classes: int, expected_shape: tuple[int, int]) -> np.ndarray:
    """Read a train-id prediction PNG and check its size and values (0..C-1 or 255)."""
    pred = read_label_png(path)
    if pred.shape != tuple(expected_shape):
        raise UserError(
            f"{path}: prediction size {pred.shape[1]}x{pred.shape[0]} differs from its ground truth "
            f"{expected_shape[1]}x{expected_shape[0]}; predict at the image's full resolution"
        )
    # A value like 26 here usually means Cityscapes label ids instead of train ids: refuse it rather
    # than count it as a miss, since the whole file is then in the wrong encoding.
    low, high = int(pred.min()), int(pred.max())
    if low < 0 or high > 255:  # 16-bit files
        bad = [low if low < 0 else high]
    else:
        pred = pred.astype(np.uint8)  # 8-bit maps take the fast counting path
        counts = np.bincount(pred.reshape(-1), minlength=256)
        bad = [v for v in np.flatnonzero(counts[num_classes:]) + num_classes if v != IGNORE_INDEX]
    if bad:
        value = int(bad[0])
        raise UserError(
            f"{path}: prediction value {value} is outside the {num_classes}-class set (valid 0..{num_classes - 1} "
            f"and {IGNORE_INDEX} = ignore); write train ids, not label ids or colours"
        )
    return pred


# What evaluate_predictions / evaluate_checkpoint hand to ``on_image`` for every image, from the same pass
# that counts it (e.g. the HTML report's per-image layers and scores):
# on_image(index, image or None, pred, gt, matrix, missed); image is the photo when the caller has it.
ImageHook = Callable[[int, "np.ndarray | None", np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


def _evaluate_one(dataset: SegmentationDataset, pred_dir: Path, on_image: ImageHook | None, index: int):
    gt = dataset.load_mask(index)
    if gt is None:
        raise UserError(f"{dataset.ids[index]}: this split has no ground truth; evaluate on a split with masks")
    pred = read_prediction(prediction_path(pred_dir, dataset.ids[index]), dataset.classes.num_classes, gt.shape)
    matrix, missed = confusion_counts(pred, gt, dataset.classes.num_classes, IGNORE_INDEX)
    if on_image is not None:  # in the worker thread: its work overlaps the other images' decoding
        on_image(index, None, pred, gt, matrix, missed)
    return matrix, missed


def image_stats(index: int, image_id: str, matrix: np.ndarray, missed: np.ndarray) -> ImageStats:
    iou = iou_from_counts(matrix, missed)
    total = int(matrix.sum() + missed.sum())
    return ImageStats(
        index=index,
        id=image_id,
        miou=100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        pixel_acc=100.0 * float(np.trace(matrix)) / total if total else float("nan"),
    )


def evaluate_predictions(dataset: SegmentationDataset, pred_dir: str | os.PathLike, progress: bool = True,
                         workers: int = 2, on_image: ImageHook | None = None
                         ) -> tuple[ConfusionMatrix, list[ImageStats]]:
    """Confusion counts of ``pred_dir/IMAGE_ID.png`` against every image of ``dataset``.

    ``on_image`` (see ``ImageHook``) sees every image's prediction, ground truth and counts, in
    the worker threads. Returns the accumulated ``ConfusionMatrix`` and per-image scores (in dataset order).
    Raises UserError naming the file for a missing, unreadable, mis-sized or mis-encoded prediction.
    """
    pred_dir = Path(pred_dir)
    if not dataset.has_masks:
        raise UserError(f"{dataset.ids[0] if len(dataset) else 'dataset'}: this split has no ground truth; "
                        "evaluate on a split with masks")
    check_predictions_exist(dataset, pred_dir)
    confusion = ConfusionMatrix(dataset.classes.num_classes, IGNORE_INDEX)
    stats: list[ImageStats] = []
    indices = range(len(dataset))
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    bar = tqdm(total=len(dataset), desc="evaluate", unit="img", disable=not show_progress(progress), leave=False)
    lines = ProgressLog(log, "evaluate", len(dataset), enabled=progress_lines(progress))  # without a terminal
    try:
        # map() keeps dataset order and re-raises a worker's UserError here.
        evaluate_one = partial(_evaluate_one, dataset, pred_dir, on_image)
        results = pool.map(evaluate_one, indices) if pool else map(evaluate_one, indices)
        for i, (matrix, missed) in zip(indices, results):
            confusion.add_counts(matrix, missed)
            stats.append(image_stats(i, dataset.ids[i], matrix, missed))
            bar.update()
            lines.update()
    finally:
        bar.close()
        if pool:
            # On the first bad file, drop the queued images instead of decoding them all first.
            pool.shutdown(wait=True, cancel_futures=True)
    return confusion, stats


def rank_images(stats: list[ImageStats], count: int) -> tuple[list[ImageStats], list[ImageStats]]:
    """The ``count`` worst and best images by per-image mIoU (images without a score are skipped)."""
    scored = sorted((s for s in stats if not np.isnan(s.miou)), key=lambda s: (s.miou, s.id))
    count = min(count, len(scored))
    worst = scored[:count]
    best = scored[::-1][:count]
    return worst, best


def load_qualitative_samples(dataset: SegmentationDataset, pred_dir: str | os.PathLike, stats: list[ImageStats],
                             count: int = 4) -> dict[str, list[QualitativeSample]]:
    """The ``count`` worst and best images with their GT and prediction, for the report's grids."""
    worst, best = rank_images(stats, count)

    def load(s: ImageStats) -> QualitativeSample:
        gt = dataset.load_mask(s.index)
        pred = read_prediction(prediction_path(pred_dir, s.id), dataset.classes.num_classes, gt.shape)
        return QualitativeSample(id=s.id, image=dataset.load_image(s.index), gt=gt, pred=pred.astype(np.uint8),
                                 miou=s.miou)

    return {"worst": [load(s) for s in worst], "best": [load(s) for s in best]}


def qualitative_from_predictions(stats: list[ImageStats], kept, count: int = 4) -> dict[str, list[QualitativeSample]]:
    """Grid rows from predictions kept in memory (``evaluate_checkpoint``'s samples: objects with
    ``index``, ``id``, ``image``, ``mask`` and ``pred``), ranked like ``load_qualitative_samples``."""
    by_index = {k.index: k for k in kept}
    worst, best = rank_images([s for s in stats if s.index in by_index], count)

    def row(s: ImageStats) -> QualitativeSample:
        k = by_index[s.index]
        return QualitativeSample(id=k.id, image=k.image, gt=k.mask, pred=k.pred, miou=s.miou)

    return {"worst": [row(s) for s in worst], "best": [row(s) for s in best]}


# ---------------------------------------------------------------- the loader of a model's evaluation
@dataclass
class DecodedSample:
    """One image of the dataset as a worker decoded it."""

    index: int  # position in the dataset
    id: str
    image: torch.Tensor  # uint8 (3, H, W)
    mask: torch.Tensor  # uint8 (H, W) train ids, 255 = ignore


class _Decoding(torch.utils.data.Dataset):
    """Image ``index`` of ``dataset`` and its validated ground truth as uint8 tensors (built in a worker:
    tensors travel back through shared memory; a PNG decoded in the main process stalls the model)."""

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, str, torch.Tensor, torch.Tensor]:
        sample = self.dataset[index]
        # (3, H, W) contiguous, as images_to_tensor lays out the images it makes float: the model sees the
        # same values in the same layout whichever loader decoded them.
        image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1).contiguous()
        return index, sample.id, image, torch.from_numpy(np.ascontiguousarray(sample.mask))


def _as_is(item):
    return item


def evaluation_batches(dataset: SegmentationDataset, batch_size: int, num_workers: int = 0,
                       pin_memory: bool = False) -> Iterator[tuple[list[DecodedSample], torch.Tensor]]:
    """Consecutive images of ``dataset`` in dataset order, grouped into batches of one size (at most
    ``batch_size``; sizes may vary in a dataset): the samples and their images as one uint8 (B, 3, H, W)
    tensor, to be moved to the device and made float there.

    ``num_workers`` DataLoader processes decode ahead (0: in this process). ``pin_memory`` (for a GPU)
    puts the images in page-locked memory, so the copy to the device can run asynchronously.
    """
    loader = torch.utils.data.DataLoader(
        _Decoding(dataset), batch_size=None, shuffle=False, num_workers=min(num_workers, len(dataset)),
        collate_fn=_as_is, pin_memory=pin_memory,
    )
    group: list[DecodedSample] = []
    for index, image_id, image, mask in loader:
        if group and (len(group) == batch_size or group[0].image.shape != image.shape):
            yield group, _stacked(group, pin_memory)
            group = []
        group.append(DecodedSample(index, image_id, image, mask))
    if group:
        yield group, _stacked(group, pin_memory)


def _stacked(group: list[DecodedSample], pin_memory: bool) -> torch.Tensor:
    if len(group) == 1:
        return group[0].image[None]  # a view: still in the loader's pinned memory
    images = torch.stack([s.image for s in group])
    return images.pin_memory() if pin_memory else images
