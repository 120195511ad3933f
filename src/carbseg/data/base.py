"""The dataset interface every stage reads, and the file-list dataset every on-disk layout builds on.

A dataset is a list of image ids plus two loaders, giving samples in train ids with 255
(``IGNORE_INDEX``) as ignore. ``load_mask`` validates what it reads (size equal to the image's,
values within the class set or ignore) and raises ``UserError`` naming the file and the offending
value, so bad data fails early and clearly. Each layout module (cityscapes, camvid, wilddash2,
folder, synthetic) only finds its files and says how a raw mask becomes train ids; pairing images
with masks and the checks (duplicate ids, masks missing for some images, empty splits) live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carbseg.data.classes import CAMVID, IGNORE_INDEX, ClassSet
from carbseg.errors import UserError
from carbseg.io import list_images, read_image, read_label_png


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
        validate_train_ids(mask, self.classes.num_classes, where, self.classes.name)
        return mask.astype(np.uint8)

    def __getitem__(self, index: int) -> Sample:
        image = self.load_image(index)
        mask = self.load_mask(index, image.shape[:2])
        return Sample(id=self.ids[index], image=image, mask=mask)


# The void value of CamVid's released masks (0..10 are its classes); ``carbseg.data.camvid`` maps it to ignore.
CAMVID_RAW_VOID = 11


def validate_train_ids(mask: np.ndarray, num_classes: int, where, class_set: str | None = None) -> None:
    """Raise UserError naming ``where`` and the first bad value if ``mask`` has values outside 0..C-1/255.

    ``class_set`` (the class set's name) adds the fix for a known raw format: CamVid's released masks
    use 11 for void, which ``--dataset camvid`` maps to 255 but a folder of raw masks does not."""
    if mask.dtype == np.uint8:
        # Every sample of a training run is checked: a histogram of the 256 byte values is ~30x
        # cheaper than np.unique's sort and names the same values.
        values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    else:
        values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size or (values < 0).any():
        value = int(bad[0]) if bad.size else int(values[values < 0][0])
        raise UserError(
            f"{where}: label value {value} is outside the {num_classes}-class set (valid 0..{num_classes - 1} "
            f"and {IGNORE_INDEX} = ignore); check the dataset name or convert the masks to train ids"
            + (f" (raw CamVid masks use {CAMVID_RAW_VOID} for void: read them with --dataset camvid, which maps it "
               f"to {IGNORE_INDEX}, or map {CAMVID_RAW_VOID} to {IGNORE_INDEX} yourself)"
               if class_set == CAMVID.name else "")
        )


def check_unique_ids(ids: list[str], root) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise UserError(f"{root}: duplicate image id {i!r}; image ids (file names) must be unique")
        seen.add(i)


class FileListDataset(SegmentationDataset):
    """Images and (optionally) masks given as two parallel lists of files.

    ``mask_paths`` is None for a split without ground truth (e.g. the Cityscapes test split).
    Subclasses override :meth:`to_train_ids` when the stored mask values are not train ids yet.
    """

    def __init__(
        self,
        classes: ClassSet,
        ids: Sequence[str],
        image_paths: Sequence[Path],
        mask_paths: Sequence[Path] | None,
        root: str | Path,
    ):
        self.classes = classes
        self.ids = list(ids)
        self.image_paths = [Path(p) for p in image_paths]
        self.mask_paths = None if mask_paths is None else [Path(p) for p in mask_paths]
        self.root = Path(root)
        if len(self.image_paths) != len(self.ids):
            raise ValueError("ids and image_paths differ in length")
        if self.mask_paths is not None and len(self.mask_paths) != len(self.ids):
            raise ValueError("ids and mask_paths differ in length")
        check_unique_ids(self.ids, self.root)

    @property
    def has_masks(self) -> bool:
        return self.mask_paths is not None

    def image_path(self, index: int) -> Path:
        return self.image_paths[index]

    def mask_path(self, index: int) -> Path | None:
        return None if self.mask_paths is None else self.mask_paths[index]

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.image_paths[index])

    def _load_raw_mask(self, index: int) -> np.ndarray:
        if self.mask_paths is None:
            raise UserError(f"{self.root}: this split has no ground-truth masks")
        path = self.mask_paths[index]
        return self.to_train_ids(read_label_png(path), path)

    def to_train_ids(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Map the values stored in mask file ``path`` to train ids (identity: files hold train ids)."""
        return raw

    def __repr__(self) -> str:
        gt = "with masks" if self.has_masks else "without masks"
        return f"{type(self).__name__}({self.root}, {len(self)} images, {gt})"


# ---------------------------------------------------------------- layout helpers
def require_folder(folder: Path, expected: str) -> Path:
    """Return ``folder`` if it is a directory, else raise UserError saying which layout was expected."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found; expected {expected}")
    return folder


def require_split(split: str, valid: Sequence[str], root: Path, dataset: str) -> None:
    if split not in valid:
        raise UserError(
            f"{root}: unknown {dataset} split {split!r}; valid splits: {', '.join(valid)}"
        )


def require_not_empty(ids: Sequence[str], folder: Path, pattern: str) -> None:
    if not ids:
        raise UserError(f"{folder}: no images matching {pattern}; check --root and --split")


def pair_masks(
    ids: Sequence[str], image_paths: Sequence[Path], mask_for: Callable[[str, Path], Path]
) -> list[Path]:
    """The mask path of every image; UserError naming the first image whose mask file is missing."""
    masks = [mask_for(i, p) for i, p in zip(ids, image_paths)]
    missing = [(p, m) for p, m in zip(image_paths, masks) if not m.is_file()]
    if missing:
        image, mask = missing[0]
        raise UserError(
            f"{mask}: mask missing for image {image} ({len(missing)} of {len(masks)} images have no mask); "
            "restore the missing masks or remove those images"
        )
    return masks


def images_with_optional_masks(
    image_dir: Path, mask_dir: Path, pattern: str
) -> tuple[list[str], list[Path], list[Path] | None]:
    """Ids (file stems), image paths and ``mask_dir/<id>.png`` paths of a flat split folder.

    Without ``mask_dir`` the split has no ground truth (masks None); with it, every image needs its mask.
    """
    image_paths = list_images(image_dir)
    ids = [p.stem for p in image_paths]
    require_not_empty(ids, image_dir, pattern)
    mask_paths = None
    if mask_dir.is_dir():
        mask_paths = pair_masks(ids, image_paths, lambda i, p: mask_dir / f"{i}.png")
    return ids, image_paths, mask_paths


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
