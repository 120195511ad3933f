"""The table of datasets: each name with how to open it and its class set.

The by-name entry point of the data stage (``--dataset NAME`` and ``data.dataset``). The layout
modules are imported only when their dataset is opened; they build on ``carbseg.data.base`` and
never import this module, so there is no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from carbseg.data.base import SegmentationDataset
from carbseg.data.classes import CAMVID, CITYSCAPES, SYNTHETIC, WILDDASH2, ClassSet
from carbseg.errors import UserError


def _open_cityscapes(root: Path, split: str, classes: ClassSet) -> SegmentationDataset:
    from carbseg.data.cityscapes import CityscapesDataset

    return CityscapesDataset(root, split)


def _open_camvid(root: Path, split: str, classes: ClassSet) -> SegmentationDataset:
    from carbseg.data.camvid import CamVidDataset

    return CamVidDataset(root, split)


def _open_wilddash2(root: Path, split: str, classes: ClassSet) -> SegmentationDataset:
    from carbseg.data.wilddash2 import WildDash2Dataset

    return WildDash2Dataset(root, split)


def _open_synthetic(root: Path, split: str, classes: ClassSet) -> SegmentationDataset:
    from carbseg.data.synthetic import open_synthetic

    return open_synthetic(root, split)


def _open_folder(root: Path, split: str, classes: ClassSet) -> SegmentationDataset:
    from carbseg.data.folder import FolderDataset

    return FolderDataset(root, split, classes)


@dataclass(frozen=True)
class DatasetKind:
    """How to open a dataset (``open(root, split, classes)``) and its class set (None: read from the
    classes file the user gives, as ``folder`` does)."""

    open: Callable[[Path, str, ClassSet], SegmentationDataset]
    classes: ClassSet | None


DATASETS: dict[str, DatasetKind] = {
    "cityscapes": DatasetKind(_open_cityscapes, CITYSCAPES),
    "camvid": DatasetKind(_open_camvid, CAMVID),
    "wilddash2": DatasetKind(_open_wilddash2, WILDDASH2),
    "synthetic": DatasetKind(_open_synthetic, SYNTHETIC),
    "folder": DatasetKind(_open_folder, None),
}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)


def _kind(name: str) -> DatasetKind:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")
    return DATASETS[name]


def class_set_for(name: str, classes_file: str | Path | None = None) -> ClassSet:
    """The class set of a dataset name (``folder`` needs its classes file)."""
    kind = _kind(name)
    if kind.classes is not None:
        return kind.classes
    if classes_file is None:
        raise UserError(f"--dataset {name} needs --classes FILE (JSON or YAML with names, optional "
                        "text_names and palette)")
    from carbseg.data.folder import load_class_set

    return load_class_set(classes_file)


def build_dataset(name: str, root: str | Path, split: str, classes_file: str | Path | None = None
                  ) -> SegmentationDataset:
    """Open split ``split`` of dataset ``name`` stored under ``root`` (see docs/datasets.md for layouts)."""
    kind = _kind(name)
    if classes_file is not None and kind.classes is not None:
        raise UserError(f"{classes_file}: --classes is only for --dataset folder ({name} has a fixed class set)")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset root folder not found; see docs/datasets.md for the {name} layout")
    return kind.open(root, split, class_set_for(name, classes_file))
