"""Cityscapes in its official layout, with ground truth read from ``_gtFine_labelIds.png``.

    ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Label ids (0..33) become the 19 train ids through the official table of ``cityscapesscripts``,
so the ``labelTrainIds`` files that its preparation script writes are not needed. The test split's
public masks are placeholders, so that split is opened without ground truth.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from carbseg.data.base import (
    FileListDataset,
    pair_masks,
    require_folder,
    require_not_empty,
    require_split,
)
from carbseg.data.classes import CITYSCAPES, IGNORE_INDEX
from carbseg.errors import UserError
from carbseg.io import IMAGE_EXTENSIONS

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"
MAX_LABEL_ID = 33  # 'bicycle'; the 34 official label ids are 0..33 (license plate, -1, is never stored)
LAYOUT = ("leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine/<split>/<city>/*_gtFine_labelIds.png "
          "(unzip leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into the root)")


@lru_cache(maxsize=1)
def label_id_to_train_id() -> np.ndarray:
    """(256,) uint8 lookup table: Cityscapes label id -> train id; ids without a train id -> 255."""
    from cityscapesscripts.helpers.labels import labels

    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in labels:
        if 0 <= label.id < 256 and label.trainId not in (255, -1):
            lut[label.id] = label.trainId
    lut.flags.writeable = False
    return lut


def normalize_image_id(raw_id: str) -> str:
    """IMAGE_ID of any spelling used for Cityscapes frames (and harmless for other datasets).

    The authors' label files key frames as ``city/frame`` (e.g. ``krefeld/krefeld_000000_003707``);
    carbseg's IMAGE_ID is the bare frame name: no folder, extension or ``_leftImg8bit`` suffix.
    """
    name = raw_id.replace("\\", "/").rsplit("/", 1)[-1]
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    if name.endswith("_leftImg8bit"):
        name = name[: -len("_leftImg8bit")]
    return name


class CityscapesDataset(FileListDataset):
    def __init__(self, root: str | Path, split: str):
        root = Path(root)
        require_split(split, SPLITS, root, "Cityscapes")
        image_dir = require_folder(root / "leftImg8bit" / split, LAYOUT)
        image_paths = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        ids = [p.name[: -len(IMAGE_SUFFIX)] for p in image_paths]
        require_not_empty(ids, image_dir, f"<city>/*{IMAGE_SUFFIX}")
        mask_paths = None
        if split != "test":
            mask_dir = require_folder(root / "gtFine" / split, LAYOUT)
            mask_paths = pair_masks(ids, image_paths, lambda i, p: mask_dir / p.parent.name / f"{i}{MASK_SUFFIX}")
        super().__init__(CITYSCAPES, ids, image_paths, mask_paths, root)

    def to_train_ids(self, raw: np.ndarray, path: Path) -> np.ndarray:
        # A labelTrainIds or colour file given by mistake would map silently to nonsense: refuse it.
        bad = raw[(raw < 0) | (raw > MAX_LABEL_ID)]
        if bad.size:
            raise UserError(
                f"{path}: value {int(bad[0])} is not a Cityscapes label id (0..{MAX_LABEL_ID}); "
                f"expected the *{MASK_SUFFIX} files of gtFine_trainvaltest.zip"
            )
        return label_id_to_train_id()[raw]
