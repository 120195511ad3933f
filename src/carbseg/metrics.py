"""Confusion matrix, per-class IoU and pixel accuracy, with a reduction across processes.

Conventions (the same as the official Cityscapes pixel-level evaluator, so numbers compare):

- rows are ground truth, columns are prediction; pixels whose GT is ``ignore_index`` are skipped;
- IoU_c = TP / (TP + FP + FN); a class absent from both GT and prediction has no IoU (``None``,
  the evaluator's NaN) and is left out of the mean; a class predicted but absent from GT has IoU 0;
- mIoU is the plain mean over the classes that have an IoU; pixel accuracy is correct / evaluated.

A prediction outside ``0..C-1`` on a valid GT pixel (a pseudo-mask's ignore value 255, where the
teacher abstained, or any stray value) is a *miss*: it is wrong for pixel accuracy and a false
negative of the GT class, but nobody's false positive. A (C, C) matrix has no column for it, so
``confusion_counts`` returns these misses beside the matrix, and ``confusion_matrix`` refuses them
(ValueError) rather than silently dropping them. The Cityscapes evaluator behaves the same way when
a prediction holds a label id that is ignored in evaluation.
"""

from __future__ import annotations

import numpy as np
import torch

from carbseg.data.classes import IGNORE_INDEX
from carbseg.distributed import all_reduce_sum_, collective_device, is_distributed

ArrayLike = np.ndarray | torch.Tensor


def _is_uint8_array(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype == np.uint8


def _joint_counts_uint8(pred: np.ndarray, gt: np.ndarray, c: int, ignore_index: int) -> np.ndarray:
    """Fast path for 8-bit label maps (what PNG files hold): two 256-entry lookups and one bincount,
    with no boolean indexing. Ignored GT pixels land in a spill row that is cut off afterwards."""
    spill = c * (c + 1)
    gt_code = np.full(256, spill, dtype=np.int32)
    gt_code[:c] = np.arange(c, dtype=np.int32) * (c + 1)
    if 0 <= ignore_index < 256:
        gt_code[ignore_index] = spill
    pred_code = np.full(256, c, dtype=np.int32)  # anything outside 0..C-1 -> the misses column C
    pred_code[:c] = np.arange(c, dtype=np.int32)
    index = gt_code[gt.reshape(-1)] + pred_code[pred.reshape(-1)]
    return np.bincount(index, minlength=(c + 1) * (c + 1))[:spill].reshape(c, c + 1).astype(np.int64)


def confusion_counts(pred: ArrayLike, gt: ArrayLike, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Joint counts of (GT class, predicted class) over valid GT pixels, plus per-class misses.

    ``pred`` and ``gt`` are integer label maps of the same shape (numpy arrays or torch tensors, any
    device; a batch works too). Returns ``matrix`` int64 (C, C) and ``missed`` int64 (C,): the GT
    pixels of each class whose prediction is outside 0..C-1.
    """
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground truth {tuple(gt.shape)}")
    c = num_classes
    if _is_uint8_array(pred) and _is_uint8_array(gt) and c < 256:
        joint = _joint_counts_uint8(pred, gt, c, ignore_index)
    elif isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        pred_t = torch.as_tensor(pred).long().reshape(-1)
        gt_t = torch.as_tensor(gt, device=pred_t.device).long().reshape(-1)
        valid = (gt_t != ignore_index) & (gt_t >= 0) & (gt_t < c)
        pred_t, gt_t = pred_t[valid], gt_t[valid]
        # Column C collects the misses: one bincount gives the matrix and the misses together.
        pred_t = torch.where((pred_t >= 0) & (pred_t < c), pred_t, torch.full_like(pred_t, c))
        joint = torch.bincount(gt_t * (c + 1) + pred_t, minlength=c * (c + 1))
        joint = joint.reshape(c, c + 1).cpu().numpy().astype(np.int64)
    else:
        pred_a = np.asarray(pred).reshape(-1).astype(np.int64, copy=False)
        gt_a = np.asarray(gt).reshape(-1).astype(np.int64, copy=False)
        valid = (gt_a != ignore_index) & (gt_a >= 0) & (gt_a < c)
        pred_a, gt_a = pred_a[valid], gt_a[valid]
        pred_a = np.where((pred_a >= 0) & (pred_a < c), pred_a, c)
        joint = np.bincount(gt_a * (c + 1) + pred_a, minlength=c * (c + 1)).reshape(c, c + 1)
        joint = joint.astype(np.int64, copy=False)
    return np.ascontiguousarray(joint[:, :c]), np.ascontiguousarray(joint[:, c])


def confusion_matrix(pred: ArrayLike, gt: ArrayLike, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(C, C) int64 confusion matrix, rows = GT, columns = prediction, GT ``ignore_index`` skipped.

    Raises ValueError when a valid GT pixel has a prediction outside 0..C-1, since the matrix cannot
    hold it; use ``confusion_counts`` (or ``ConfusionMatrix``) to count such pixels as misses.
    """
    matrix, missed = confusion_counts(pred, gt, num_classes, ignore_index)
    if missed.any():
        raise ValueError(
            f"{int(missed.sum())} evaluated pixels have a prediction outside 0..{num_classes - 1}; "
            "use confusion_counts() to count them as misses"
        )
    return matrix


def iou_from_counts(matrix: np.ndarray, missed: np.ndarray | None = None) -> np.ndarray:
    """Per-class IoU as fractions (float64, NaN where the class is absent from GT and prediction)."""
    matrix = np.asarray(matrix, dtype=np.int64)
    tp = np.diag(matrix)
    gt_total = matrix.sum(axis=1) + (0 if missed is None else np.asarray(missed, dtype=np.int64))
    pred_total = matrix.sum(axis=0)
    union = gt_total + pred_total - tp  # = TP + FN + FP
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


class ConfusionMatrix:
    """Accumulates confusion counts over images (and processes) and turns them into a report."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.missed = np.zeros(num_classes, dtype=np.int64)
        self.num_images = 0

    def update(self, pred: ArrayLike, gt: ArrayLike, num_images: int | None = None) -> None:
        """Add one image (H, W) or a batch (B, H, W); ``num_images`` defaults to 1 or B."""
        matrix, missed = confusion_counts(pred, gt, self.num_classes, self.ignore_index)
        self.add_counts(matrix, missed, num_images if num_images is not None else
                        (1 if len(gt.shape) <= 2 else int(gt.shape[0])))

    def add_counts(self, matrix: np.ndarray, missed: np.ndarray | None = None, num_images: int = 1) -> None:
        """Add counts computed elsewhere (e.g. by ``confusion_counts`` in a worker thread)."""
        self.matrix += matrix
        if missed is not None:
            self.missed += missed
        self.num_images += num_images

    def reduce_(self, device: torch.device | str | None = None) -> ConfusionMatrix:
        """Sum the counts of all processes in place (a no-op in a single process); ``device`` is
        this process's GPU under NCCL (default: torchrun's ``cuda:LOCAL_RANK``)."""
        if not is_distributed():
            return self
        device = collective_device(device)
        packed = torch.from_numpy(
            np.concatenate([self.matrix.reshape(-1), self.missed, [self.num_images]]).astype(np.int64)
        ).to(device)
        all_reduce_sum_(packed)
        packed = packed.cpu().numpy()
        c = self.num_classes
        self.matrix = packed[: c * c].reshape(c, c).copy()
        self.missed = packed[c * c: c * c + c].copy()
        self.num_images = int(packed[-1])
        return self

    def iou(self) -> np.ndarray:
        """Per-class IoU as fractions, NaN for classes absent from both GT and prediction."""
        return iou_from_counts(self.matrix, self.missed)

    def miou(self) -> float:
        """Mean IoU (fraction) over classes that have an IoU; NaN when no class has one."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum() + self.missed.sum())
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def report(self, class_names) -> dict:
        """The evaluation contract: percents, ``None`` where a class has no IoU."""
        names = list(class_names)
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for a {self.num_classes}-class confusion matrix")
        iou = self.iou()
        miou, acc = self.miou(), self.pixel_accuracy()
        return {
            "miou": None if np.isnan(miou) else 100.0 * miou,
            "pixel_acc": None if np.isnan(acc) else 100.0 * acc,
            "iou": {n: (None if np.isnan(v) else 100.0 * float(v)) for n, v in zip(names, iou)},
            "num_images": int(self.num_images),
        }
