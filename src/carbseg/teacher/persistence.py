"""Error persistence of a teacher: are its mistakes a function of the image, or of the view?

CLIP's pseudo-mask errors come from the image, so they come back in every crop and flip of it;
that is what CARB (consistency between teacher and model over training) is built for. A teacher
whose errors are redrawn per view is averaged out by plain cross-entropy and cannot judge CARB.

``error_persistence`` labels a frame and a second view of it (the horizontal flip, or a crop
shifted by half a grid cell), brings the second labels back onto the frame, and counts the pixels
the first labelling got wrong and how many of them the second got wrong *with the same label*.
Independent noise repeats only by chance (about 10% here); a pixel-driven teacher repeats most.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from carbseg.data.classes import IGNORE_INDEX
from carbseg.data.frames import FrameMaps

VIEWS = ("flip", "shift")


@dataclass
class PersistenceCount:
    wrong: int = 0  # labelled pixels the teacher got wrong on the frame (within the compared region)
    repeated: int = 0  # of those, wrong again with the same label in the second view

    def add(self, other: PersistenceCount) -> PersistenceCount:
        return PersistenceCount(self.wrong + other.wrong, self.repeated + other.repeated)

    @property
    def share(self) -> float:
        """Percent of the wrong pixels repeated (NaN when nothing was wrong)."""
        return 100.0 * self.repeated / self.wrong if self.wrong else float("nan")


def error_persistence(teacher, image: torch.Tensor, gt: torch.Tensor, image_labels: torch.Tensor, image_id: str,
                      view: str, shift: int = 8) -> PersistenceCount:
    """Persistence of one frame's errors in a second ``view``: ``flip`` or ``shift`` (by ``shift`` px
    down and right, half a 16-px cell by default).

    image: float (3, H, W) in 0..255; gt: long (H, W) train ids; image_labels: bool (C,).
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}")
    images, labels, gts = image[None].float(), image_labels[None].bool(), gt[None].long()
    frame = FrameMaps.whole_frames([image_id])
    reads_gt = teacher.reads_ground_truth
    first = teacher(images, labels, gt=gts if reads_gt else None, frames=frame)[0]
    if view == "flip":
        second_view, second_gt = images.flip(-1), gts.flip(-1)
        second = teacher(second_view, labels, gt=second_gt if reads_gt else None,
                         frames=frame.flipped(image.shape[-1]))[0].flip(-1)
        region = (slice(None), slice(None))
    else:
        second_view, second_gt = images[..., shift:, shift:], gts[..., shift:, shift:]
        second = teacher(second_view, labels, gt=second_gt if reads_gt else None,
                         frames=frame.cropped(shift, shift))[0]
        region = (slice(shift, None), slice(shift, None))
    first, truth = first[region], gt[region]
    wrong = (first != truth) & (truth != IGNORE_INDEX)
    repeated = wrong & (second == first)
    return PersistenceCount(int(wrong.sum()), int(repeated.sum()))
