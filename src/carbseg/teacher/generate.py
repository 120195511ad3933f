"""Offline pseudo-masks for a whole split (``carbseg pseudo-masks``): batched, resumable, shardable.

- One ``OUT/IMAGE_ID.png`` (8-bit train ids, 255 = ignore) per image, written atomically; an
  existing file counts as done, so a killed run resumes where it stopped.
- Under ``torchrun`` each rank takes ``carbseg.distributed.shard(ids)`` of the whole split (disjoint,
  strided slices) and skips the finished files of its own slice, so no image is processed twice.
- Images stream through a DataLoader; memory depends on the batch size, not the dataset size.
- Consecutive images of equal size are batched together; others run in smaller batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from carbseg import distributed
from carbseg.console import ProgressLog, progress_lines, show_progress
from carbseg.data.base import SegmentationDataset, WithoutIds
from carbseg.data.frames import FrameMaps
from carbseg.data.labels import labels_to_multi_hot
from carbseg.errors import UserError
from carbseg.io import remove_stale_temporaries, safe_child, write_png_atomic
from carbseg.teacher.base import Teacher

log = logging.getLogger(__name__)


@dataclass
class GenerateReport:
    total: int  # images in the split (less the proxy teacher's fit set)
    skipped: int  # already written (resume)
    written: int  # written by this process
    assigned: int  # pending images this process owned


def mask_path(out_dir: Path, image_id: str) -> Path:
    return safe_child(out_dir, image_id + ".png")


def pending_ids(ids: list[str], out_dir: Path) -> list[str]:
    """Ids whose mask file does not exist yet (complete files only: writes are atomic)."""
    return [i for i in ids if not mask_path(out_dir, i).is_file()]


class _Views(Dataset):
    """(index, image (3, H, W) uint8, gt (H, W) uint8 or None) of selected dataset indices."""

    def __init__(self, dataset: SegmentationDataset, indices: list[int], with_gt: bool):
        self.dataset, self.indices, self.with_gt = dataset, indices, with_gt

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        index = self.indices[k]
        image = self.dataset.load_image(index)
        gt = self.dataset.load_mask(index, image.shape[:2]) if self.with_gt else None
        return index, torch.from_numpy(image).permute(2, 0, 1).contiguous(), None if gt is None else torch.from_numpy(gt)


def _as_list(batch):
    return batch


def _same_size_groups(items: list) -> list[list]:
    groups: dict[tuple[int, int], list] = {}
    for item in items:
        groups.setdefault(tuple(item[1].shape[-2:]), []).append(item)
    return list(groups.values())


def generate_pseudo_masks(dataset: SegmentationDataset, labels: dict[str, list[int]], teacher: Teacher,
                          out_dir: str | Path, device="cpu", batch_size: int = 4, num_workers: int = 0,
                          refine: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                          shard_rank: int | None = None, num_shards: int | None = None,
                          progress: bool = True) -> GenerateReport:
    """Write the teacher's pseudo-mask of every image of ``dataset`` to ``out_dir/IMAGE_ID.png``.

    ``labels`` maps IMAGE_ID -> present class indices. ``refine(image, mask)`` (e.g. the dense
    CRF) post-processes each mask. Returns counts of what was done.
    """
    out_dir = Path(out_dir)
    missing = [i for i in dataset.ids if i not in labels]
    if missing:
        raise UserError(f"labels file has no entry for {len(missing)} image(s) of the split, e.g. {missing[0]!r}; "
                        "regenerate it with `carbseg labels` for this split")
    fit_ids = set(getattr(teacher, "fit_ids", ()))
    if fit_ids & set(dataset.ids):
        # The proxy teacher was fitted on these images' ground truth: its labels of them would be
        # near-copies of it, so they get no pseudo-mask (and the trainer leaves them out).
        dataset = WithoutIds(dataset, fit_ids)
        log.warning("proxy teacher: %d images of its fit set get no pseudo-mask", len(dataset.excluded))
    if teacher.reads_ground_truth and not dataset.has_masks:
        raise UserError("the simulated teacher reads ground truth, but this split has no masks; use --teacher clip")
    # Shard the whole split first, then skip finished files inside the shard: the split into shards
    # then never depends on what other ranks have written meanwhile.
    owned = distributed.shard(list(dataset.ids), shard_rank, num_shards)
    mine = pending_ids(owned, out_dir)
    position = {image_id: k for k, image_id in enumerate(dataset.ids)}
    indices = [position[i] for i in mine]
    report = GenerateReport(total=len(dataset.ids), skipped=len(owned) - len(mine), written=0,
                            assigned=len(mine))
    if report.skipped:
        log.info("resuming: %d of this process's %d masks already exist in %s", report.skipped, len(owned), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A run killed mid-write (kill -9) leaves a temporary next to the mask it was writing; the
    # mask itself is absent, so it is redone below and only its stale temporary is cleared here.
    remove_stale_temporaries(out_dir, [mask_path(out_dir, i).name for i in mine])
    loader = DataLoader(_Views(dataset, indices, teacher.reads_ground_truth), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    bar = tqdm(total=len(indices), unit="img", desc="pseudo-masks", disable=not show_progress(progress), dynamic_ncols=True)
    lines = ProgressLog(log, "pseudo-masks", len(indices), enabled=progress_lines(progress))  # without a terminal
    with torch.inference_mode():
        for batch in loader:
            for group in _same_size_groups(batch):
                ids = [dataset.ids[index] for index, _, _ in group]
                images = torch.stack([img for _, img, _ in group]).to(device).float()
                image_labels = labels_to_multi_hot([labels[i] for i in ids], teacher.num_classes).to(device)
                gt = torch.stack([g for _, _, g in group]).to(device).long() if group[0][2] is not None else None
                # The views are the frames themselves; the simulated teacher keys its noise on them.
                masks = teacher(images, image_labels, gt=gt, frames=FrameMaps.whole_frames(ids))
                masks = masks.to("cpu", torch.uint8).numpy()
                for (_, img, _), image_id, mask in zip(group, ids, masks):
                    if refine is not None:
                        mask = refine(img.permute(1, 2, 0).numpy(), mask)
                    write_png_atomic(mask_path(out_dir, image_id), mask)
                    report.written += 1
                bar.update(len(group))
                lines.update(len(group))
    bar.close()
    return report
