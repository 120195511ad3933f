"""CamVid, 11 classes, in either of the two common layouts (detected from the folders present).

SegNet tutorial release:   ROOT/<split>/*.png        masks ROOT/<split>annot/*.png
authors' layout:           ROOT/img/<split>/*.png    masks ROOT/mask/<split>/*.png

Masks hold values 0..10 (sky ... bicyclist, the order of ``carbseg.data.classes.CAMVID``) and 11 for
void, which becomes 255 (ignore). A split without its mask folder is opened without ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carbseg.data.base import (
    CAMVID_RAW_VOID,
    FileListDataset,
    images_with_optional_masks,
    require_folder,
    require_split,
)
from carbseg.data.classes import CAMVID, IGNORE_INDEX
from carbseg.errors import UserError

SPLITS = ("train", "val", "test")
VOID = CAMVID_RAW_VOID
SEGNET_LAYOUT = "SegNet layout ROOT/<split>/*.png with masks in ROOT/<split>annot/*.png"
AUTHORS_LAYOUT = "authors' layout ROOT/img/<split>/*.png with masks in ROOT/mask/<split>/*.png"


def detect_layout(root: Path) -> str:
    """'authors' or 'segnet'; UserError listing both layouts when neither is recognised."""
    if (root / "img").is_dir():
        return "authors"
    if any((root / s).is_dir() for s in SPLITS):
        return "segnet"
    raise UserError(
        f"{root}: not a recognised CamVid layout; expected either the {SEGNET_LAYOUT}, or the {AUTHORS_LAYOUT}"
    )


class CamVidDataset(FileListDataset):
    def __init__(self, root: str | Path, split: str):
        root = Path(root)
        require_split(split, SPLITS, root, "CamVid")
        self.layout = detect_layout(root)
        if self.layout == "segnet":
            image_dir = require_folder(root / split, SEGNET_LAYOUT)
            mask_dir = root / f"{split}annot"
        else:
            image_dir = require_folder(root / "img" / split, AUTHORS_LAYOUT)
            mask_dir = root / "mask" / split
        ids, image_paths, mask_paths = images_with_optional_masks(image_dir, mask_dir, "*.png")
        super().__init__(CAMVID, ids, image_paths, mask_paths, root)

    def to_train_ids(self, raw: np.ndarray, path: Path) -> np.ndarray:
        mask = raw.copy()
        mask[raw == VOID] = IGNORE_INDEX
        return mask
