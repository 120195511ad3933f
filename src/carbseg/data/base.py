"""The dataset interface every stage reads: samples in train ids with 255 as ignore.

A dataset is a list of image ids plus two loaders. ``load_mask`` validates what it reads
(size equal to the image's, values within the class set or ignore) and raises ``UserError``
naming the file and the offending value, so bad data fails early and clearly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carbseg.data.classes import IGNORE_INDEX, ClassSet
from carbseg.errors import UserError


@dataclass
class Sample:
    id: str
    image: np.ndarray  # uint8 (H, W, 3) RGB
    mask: np.ndarray | None  # uint8 (H, W) train ids, 255 = ignore; None when the split has no GT


class SegmentationDataset:
    """Base class: subclasses fill ``ids`` and implement ``load_image`` / ``_load_raw_mask``."""

    classes: ClassSet
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_masks(self) -> bool:
        return True

    def image_path(self, index: int) -> Path | None:
        """Path of the image file (None for in-memory data)."""
        return None

    def mask_path(self, index: int) -> Path | None:
        return None

    def load_image(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def _load_raw_mask(self, index: int) -> np.ndarray:
        """The mask already mapped to train ids (values 0..C-1 or 255), before validation."""
        raise NotImplementedError

    def load_mask(self, index: int, image_shape: tuple[int, int] | None = None) -> np.ndarray | None:
        if not self.has_masks:
            return None
        mask = self._load_raw_mask(index)
        where = self.mask_path(index) or f"mask of {self.ids[index]}"
        if image_shape is not None and tuple(mask.shape[:2]) != tuple(image_shape[:2]):
            raise UserError(
                f"{where}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                f"{image_shape[1]}x{image_shape[0]}; regenerate or resize the mask with nearest neighbour"
            )
        validate_train_ids(mask, self.classes.num_classes, where)
        return mask.astype(np.uint8)

    def __getitem__(self, index: int) -> Sample:
        image = self.load_image(index)
        mask = self.load_mask(index, image.shape[:2])
        return Sample(id=self.ids[index], image=image, mask=mask)


def validate_train_ids(mask: np.ndarray, num_classes: int, where) -> None:
    """Raise UserError naming ``where`` and the first bad value if ``mask`` has values outside 0..C-1/255."""
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size or (values < 0).any():
        value = int(bad[0]) if bad.size else int(values[values < 0][0])
        raise UserError(
            f"{where}: label value {value} is outside the {num_classes}-class set (valid 0..{num_classes - 1} "
            f"and {IGNORE_INDEX} = ignore); check the dataset name or convert the masks to train ids"
        )


def check_unique_ids(ids: list[str], root) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise UserError(f"{root}: duplicate image id {i!r}; image ids (file names) must be unique")
        seen.add(i)


class Subset(SegmentationDataset):
    """The images of ``dataset`` at ``indices``, in that order (same loaders, same validation)."""

    def __init__(self, dataset: SegmentationDataset, indices: list[int]):
        self.dataset = dataset
        self.classes = dataset.classes
        self._indices = list(indices)
        self.ids = [dataset.ids[k] for k in self._indices]

    @property
    def has_masks(self) -> bool:
        return self.dataset.has_masks

    def image_path(self, index: int) -> Path | None:
        return self.dataset.image_path(self._indices[index])

    def mask_path(self, index: int) -> Path | None:
        return self.dataset.mask_path(self._indices[index])

    def load_image(self, index: int) -> np.ndarray:
        return self.dataset.load_image(self._indices[index])

    def load_mask(self, index: int, image_shape: tuple[int, int] | None = None) -> np.ndarray | None:
        return self.dataset.load_mask(self._indices[index], image_shape)


class WithoutIds(Subset):
    """A dataset with some of its images left out, e.g. the fit set of the proxy teacher, which was
    fitted on those images' ground truth and must neither label them for training nor be scored on them."""

    def __init__(self, dataset: SegmentationDataset, excluded: list[str] | set[str]):
        excluded = set(excluded)
        super().__init__(dataset, [k for k, i in enumerate(dataset.ids) if i not in excluded])
        self.excluded = [i for i in dataset.ids if i in excluded]
