"""Opening a dataset by name, and the file-list dataset that every on-disk layout builds on.

Each layout module (cityscapes, camvid, wilddash2, folder) only finds its files and says how a raw
mask becomes train ids; pairing images with masks and the checks that make bad data fail early
(duplicate ids, masks missing for some images, empty splits) live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from carbseg.data.base import SegmentationDataset, check_unique_ids
from carbseg.data.classes import CAMVID, CITYSCAPES, SYNTHETIC, WILDDASH2, ClassSet
from carbseg.errors import UserError
from carbseg.io import list_images, read_image, read_label_png


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


# ---------------------------------------------------------------- by name
def class_set_for(name: str, classes_file: str | Path | None = None) -> ClassSet:
    """The class set of a dataset name (``folder`` needs its classes file)."""
    if name == "cityscapes":
        return CITYSCAPES
    elif name == "camvid":
        return CAMVID
    elif name == "wilddash2":
        return WILDDASH2
    elif name == "synthetic":
        return SYNTHETIC
    elif name == "folder":
        if classes_file is None:
            raise UserError("--dataset folder needs --classes FILE (JSON or YAML with names, optional "
                            "text_names and palette)")
        from carbseg.data.folder import load_class_set

        return load_class_set(classes_file)
    raise UserError(f"unknown dataset {name!r}; valid: cityscapes, camvid, wilddash2, synthetic, folder")


def build_dataset(name: str, root: str | Path, split: str, classes_file: str | Path | None = None
                  ) -> SegmentationDataset:
    """Open split ``split`` of dataset ``name`` stored under ``root`` (see docs/datasets.md for layouts)."""
    if classes_file is not None and name != "folder":
        raise UserError(f"{classes_file}: --classes is only for --dataset folder ({name} has a fixed class set)")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset root folder not found; see docs/datasets.md for the {name} layout")
    if name == "cityscapes":
        from carbseg.data.cityscapes import CityscapesDataset

        return CityscapesDataset(root, split)
    elif name == "camvid":
        from carbseg.data.camvid import CamVidDataset

        return CamVidDataset(root, split)
    elif name == "wilddash2":
        from carbseg.data.wilddash2 import WildDash2Dataset

        return WildDash2Dataset(root, split)
    elif name == "synthetic":
        from carbseg.data.synthetic import open_synthetic

        return open_synthetic(root, split)
    elif name == "folder":
        from carbseg.data.folder import FolderDataset

        return FolderDataset(root, split, class_set_for("folder", classes_file))
    raise UserError(f"unknown dataset {name!r}; valid: cityscapes, camvid, wilddash2, synthetic, folder")
