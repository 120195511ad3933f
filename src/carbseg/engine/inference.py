"""Inference and the evaluation of a model: whole image, sliding window, test-time augmentation
(scales x horizontal flip), and ``evaluate_checkpoint``.

The ``predict*`` functions take images as float tensors (B, 3, H, W) in 0..255 (the segmenter applies
its own normalisation) and return float32 logits (B, C, H, W) at the input size. They run under
``torch.inference_mode`` and the autocast that ``carbseg.precision.inference_autocast_dtype`` chooses:
by default bf16 on GPUs from Ampere on, fp16 on older ones, and on a CPU bf16 only where a short timed
probe measured it faster than fp32 (``carbseg.precision.segmenter_precision``), else none.

``evaluate_checkpoint`` is the one evaluation of a model against ground truth: ``carbseg evaluate
--checkpoint`` and the trainer's validation both call it, with the model's ``eval`` config section.

The release tests Cityscapes on the whole 2048x1024 image at a single scale; the sliding window
(mmsegmentation's ``slide`` mode: overlapping crops, logits summed and divided by how many crops
covered each pixel) and the multi-scale / flip TTA are provided for memory-bound GPUs and studies.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from carbseg.class_argmax import class_argmax
from carbseg.console import ProgressLog, progress_lines, show_progress
from carbseg.data.base import SegmentationDataset
from carbseg.data.classes import IGNORE_INDEX
from carbseg.devices import parse_device
from carbseg.engine.checkpoint import LoadedModel, load_model
from carbseg.engine.evaluate import ImageHook, ImageStats, evaluation_batches, image_stats, rank_images
from carbseg.errors import UserError
from carbseg.metrics import ConfusionMatrix, confusion_counts
from carbseg.precision import autocast, inference_autocast_dtype

log = logging.getLogger(__name__)


def _device_of(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        param = next(model.buffers(), None)
    return param.device if param is not None else torch.device("cpu")


def resize_logits(logits: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, as the segmenter's own upsampling); identity if equal."""
    if tuple(logits.shape[-2:]) == tuple(size_hw):
        return logits
    return F.interpolate(logits, size=tuple(size_hw), mode="bilinear", align_corners=False)


def _forward(model: torch.nn.Module, images: torch.Tensor, amp: bool | torch.dtype | None) -> torch.Tensor:
    with autocast(images.device, inference_autocast_dtype(images.device, amp)):
        logits = model(images)
    return resize_logits(logits.float(), images.shape[-2:])


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in 0..255, got shape {tuple(images.shape)}")


@torch.inference_mode()
def predict_whole(model: torch.nn.Module, images: torch.Tensor, amp: bool | torch.dtype | None = None) -> torch.Tensor:
    """One forward pass over the whole image; logits (B, C, H, W) float32 at the input size."""
    _check_images(images)
    images = images.to(_device_of(model), dtype=torch.float32)
    return _forward(model, images, amp)


def slide_windows(height: int, width: int, crop_hw: Sequence[int], stride_hw: Sequence[int]) -> list[tuple]:
    """Crop boxes ``(y1, y2, x1, x2)`` covering the image; the last row/column is shifted back inside.

    Crops are ``min(crop, image)`` in each dimension, so every window has the same size and windows
    can be batched. The grid count follows mmsegmentation: ``ceil((H - crop) / stride) + 1``.
    """
    crop_h, crop_w = (int(v) for v in crop_hw)
    stride_h, stride_w = (int(v) for v in stride_hw)
    if min(crop_h, crop_w, stride_h, stride_w) <= 0:
        raise ValueError(f"crop {crop_hw} and stride {stride_hw} must be positive")
    rows = max(math.ceil((height - crop_h) / stride_h), 0) + 1
    cols = max(math.ceil((width - crop_w) / stride_w), 0) + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2 = min(r * stride_h + crop_h, height)
            x2 = min(c * stride_w + crop_w, width)
            boxes.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return boxes


@torch.inference_mode()
def predict_slide(
    model: torch.nn.Module,
    images: torch.Tensor,
    crop_hw: Sequence[int],
    stride_hw: Sequence[int],
    num_classes: int,
    windows_per_batch: int = 4,
    amp: bool | torch.dtype | None = None,
) -> torch.Tensor:
    """Sliding-window logits: each pixel gets the mean of the logits of the crops covering it."""
    _check_images(images)
    device = _device_of(model)
    images = images.to(device, dtype=torch.float32)
    batch, _, height, width = images.shape
    boxes = slide_windows(height, width, crop_hw, stride_hw)
    summed = images.new_zeros((batch, num_classes, height, width))
    count = images.new_zeros((1, 1, height, width))
    # Windows of all images go through the network together, `windows_per_batch` crops of each
    # image at a time, so a batch of B images costs B * windows_per_batch crops of memory.
    for start in range(0, len(boxes), windows_per_batch):
        group = boxes[start : start + windows_per_batch]
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for (y1, y2, x1, x2) in group], dim=0)
        logits = _forward(model, crops, amp)
        if logits.shape[1] != num_classes:
            raise ValueError(f"model gives {logits.shape[1]} classes, expected num_classes={num_classes}")
        for i, (y1, y2, x1, x2) in enumerate(group):
            summed[:, :, y1:y2, x1:x2] += logits[i * batch : (i + 1) * batch]
            count[:, :, y1:y2, x1:x2] += 1
    return summed / count


@torch.inference_mode()
def predict_tta(
    model: torch.nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "whole",
    crop_hw: Sequence[int] | None = None,
    stride_hw: Sequence[int] | None = None,
    num_classes: int | None = None,
    average: str = "softmax",
    amp: bool | torch.dtype | None = None,
) -> torch.Tensor:
    """Multi-scale and horizontal-flip test-time augmentation, averaged at the input size.

    ``average="softmax"`` averages class probabilities (as mmsegmentation's aug_test) and returns
    their log, so the result still behaves as logits (same argmax; softmax gives the mean
    probabilities back). ``average="logits"`` averages the raw logits.
    """
    _check_images(images)
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if average not in ("softmax", "logits"):
        raise ValueError(f"average must be 'softmax' or 'logits', got {average!r}")
    if mode == "slide" and (crop_hw is None or stride_hw is None or num_classes is None):
        raise ValueError("slide mode needs crop_hw, stride_hw and num_classes")
    images = images.to(_device_of(model), dtype=torch.float32)
    size = images.shape[-2:]

    def run(view: torch.Tensor) -> torch.Tensor:
        if mode == "whole":
            return predict_whole(model, view, amp=amp)
        return predict_slide(model, view, crop_hw, stride_hw, num_classes, amp=amp)

    total = None
    views = 0
    for scale in scales:
        scaled_hw = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        scaled = resize_logits(images, scaled_hw)  # bilinear image resize, as the training pipeline
        for flipped in (False, True) if flip else (False,):
            view = scaled.flip(-1) if flipped else scaled
            logits = run(view)
            if flipped:
                logits = logits.flip(-1)
            logits = resize_logits(logits, size)
            term = logits.softmax(dim=1) if average == "softmax" else logits
            total = term if total is None else total + term
            views += 1
    mean = total / views
    return mean.clamp_min(torch.finfo(mean.dtype).tiny).log() if average == "softmax" else mean


def predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    mode: str = "whole",
    crop_hw: Sequence[int] | None = None,
    stride_hw: Sequence[int] | None = None,
    num_classes: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp: bool | torch.dtype | None = None,
) -> torch.Tensor:
    """Dispatch: plain whole/slide for a single unflipped scale of 1, TTA otherwise."""
    if list(scales) == [1.0] and not flip:
        if mode == "whole":
            return predict_whole(model, images, amp=amp)
        if mode == "slide":
            if crop_hw is None or stride_hw is None or num_classes is None:
                raise ValueError("slide mode needs crop_hw, stride_hw and num_classes")
            return predict_slide(model, images, crop_hw, stride_hw, num_classes, amp=amp)
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    return predict_tta(model, images, scales, flip, mode, crop_hw, stride_hw, num_classes, amp=amp)


def images_to_tensor(images: Sequence) -> torch.Tensor:
    """uint8 (H, W, 3) RGB arrays of one size -> float (B, 3, H, W) in 0..255."""
    return torch.stack([torch.as_tensor(img).permute(2, 0, 1) for img in images]).float()


# ---------------------------------------------------------------- evaluation of a checkpoint
@dataclass
class PredictionSample:
    """One evaluated image kept for the qualitative grids (among the worst and best by mIoU)."""

    index: int
    id: str
    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # uint8 (H, W) ground truth, train ids
    pred: np.ndarray  # uint8 (H, W) prediction, train ids


def evaluate_checkpoint(
    dataset: SegmentationDataset,
    checkpoint: str | os.PathLike | LoadedModel,
    device: str | torch.device = "cpu",
    mode: str | None = None,
    scales: Sequence[float] | None = None,
    flip: bool | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    keep_samples: int = 8,
    num_workers: int | None = None,
    on_image: ImageHook | None = None,
) -> tuple[ConfusionMatrix, list[ImageStats], list[PredictionSample]]:
    """Predict every image of ``dataset`` with a checkpoint and count it against the ground truth.

    ``checkpoint`` is a ``model.safetensors`` path or an already loaded model (the trainer's
    validation passes its own, so its mIoU is the one ``carbseg evaluate --checkpoint`` reports).
    ``mode``, ``scales``, ``flip``, ``batch_size`` and ``num_workers`` (the processes decoding images,
    ``carbseg.engine.evaluate.evaluation_batches``) default to the checkpoint's ``eval`` config, as do
    the sliding window's crop and stride. Returns the accumulated
    ``ConfusionMatrix``, per-image ``ImageStats`` in dataset order (as ``evaluate_predictions``),
    and the ``keep_samples`` worst and best images (by ``rank_images``) with their predictions.
    ``on_image`` (``carbseg.engine.evaluate.ImageHook``) sees every image with its counts.
    """
    device = parse_device(device)
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint, device=device)
    model = loaded.model.to(device).eval()
    eval_cfg = loaded.config.eval
    num_classes = loaded.classes.num_classes
    where = checkpoint if not isinstance(checkpoint, LoadedModel) else "model"
    if dataset.classes.num_classes != num_classes:
        raise UserError(
            f"{where}: the model predicts {num_classes} classes ({loaded.classes.name}) but the dataset has "
            f"{dataset.classes.num_classes} ({dataset.classes.name}); evaluate on the dataset it was trained for"
        )
    if not dataset.has_masks:
        raise UserError(f"{dataset.ids[0] if len(dataset) else 'dataset'}: this split has no ground truth; "
                        "evaluate on a split with masks")
    batch_size = eval_cfg.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    mode = eval_cfg.mode if mode is None else mode
    scales = list(eval_cfg.scales if scales is None else scales)
    flip = eval_cfg.flip if flip is None else flip
    num_workers = eval_cfg.num_workers if num_workers is None else num_workers
    pin_memory = device.type == "cuda"
    if mode not in ("whole", "slide"):
        raise UserError(f"inference mode {mode!r} is not valid; choose whole or slide")

    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
    stats: list[ImageStats] = []
    kept: dict[int, PredictionSample] = {}
    bar = tqdm(total=len(dataset), desc="evaluate", unit="img", disable=not show_progress(progress), leave=False)
    lines = ProgressLog(log, "evaluate", len(dataset), enabled=progress_lines(progress))  # without a terminal
    try:
        for batch, images in evaluation_batches(dataset, batch_size, num_workers, pin_memory):
            # uint8 to the device (asynchronously from pinned memory); predict makes it float there.
            images = images.to(device, non_blocking=pin_memory)
            logits = predict(model, images, mode=mode, crop_hw=eval_cfg.crop_size, stride_hw=eval_cfg.stride,
                             num_classes=num_classes, scales=scales, flip=flip)
            preds = class_argmax(logits).to(torch.uint8).cpu().numpy()
            for sample, pred in zip(batch, preds):
                mask = sample.mask.numpy()
                matrix, missed = confusion_counts(pred, mask, num_classes, IGNORE_INDEX)
                confusion.add_counts(matrix, missed)
                stats.append(image_stats(sample.index, sample.id, matrix, missed))
                image = sample.image.permute(1, 2, 0).numpy()  # (H, W, 3) view of the decoded uint8 photo
                if on_image is not None:
                    on_image(sample.index, np.ascontiguousarray(image), pred, mask, matrix, missed)
                if keep_samples > 0:
                    kept[sample.index] = PredictionSample(sample.index, sample.id, image, mask, pred)
                    worst, best = rank_images(stats, keep_samples)
                    wanted = {s.index for s in worst} | {s.index for s in best}
                    kept = {i: s for i, s in kept.items() if i in wanted}
                bar.update()
                lines.update()
    finally:
        bar.close()
    samples = [kept[i] for i in sorted(kept)]
    for sample in samples:
        sample.image = np.ascontiguousarray(sample.image)  # (H, W, 3), as the report's pictures read it
    return confusion, stats, samples
