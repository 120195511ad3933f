"""The synthetic scenes as datasets: rendered in memory (``SyntheticScenes``), or written to disk
by ``generate_synthetic_dataset`` (``carbseg synthesize``) and read back as a folder dataset
(``SyntheticFolder``, ``open_synthetic``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from carbseg.console import show_progress
from carbseg.data.base import SegmentationDataset
from carbseg.data.classes import SYNTHETIC, ClassSet
from carbseg.data.folder import FolderDataset
from carbseg.data.synthetic.render import render_scene, scene_seed
from carbseg.errors import UserError
from carbseg.io import list_images, write_json_atomic, write_png_atomic


def scene_id(split: str, index: int) -> str:
    return f"synth_{split}_{index:06d}"


class SyntheticScenes(SegmentationDataset):
    """Scenes rendered on demand in memory (no files); ids ``synth_<split>_<index:06d>``."""

    def __init__(self, num_images: int, height: int, width: int, seed: int = 0, split: str = "train"):
        if num_images < 0:
            raise UserError(f"number of synthetic images must be >= 0, got {num_images}")
        scene_seed(split, seed, max(num_images - 1, 0))  # validates split, seed and index range
        self.classes = SYNTHETIC
        self.split, self.seed, self.height, self.width = split, seed, height, width
        self.ids = [scene_id(split, i) for i in range(num_images)]
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        # __getitem__ asks for the image and then the mask: render once, serve both.
        if self._cached is None or self._cached[0] != index:
            image, mask = render_scene(scene_seed(self.split, self.seed, index), self.height, self.width)
            self._cached = (index, image, mask)
        return self._cached[1], self._cached[2]

    def load_image(self, index: int) -> np.ndarray:
        return self.render(index)[0].copy()

    def _load_raw_mask(self, index: int) -> np.ndarray:
        return self.render(index)[1].copy()


class SyntheticFolder(FolderDataset):
    """Scenes written by ``generate_synthetic_dataset``: ROOT/images/SPLIT/ID.png, ROOT/masks/SPLIT/ID.png,
    and the class set in ROOT/classes.json (SYNTHETIC when absent): a folder dataset of that layout."""

    def __init__(self, root: str | os.PathLike, split: str):
        root = Path(root)
        image_dir = root / "images" / split
        how = f"with `carbseg synthesize --out {root} --split {split}`"
        if not image_dir.is_dir():
            raise UserError(f"{image_dir}: synthetic split not found; generate it {how}")
        if not list_images(image_dir):
            raise UserError(f"{image_dir}: no images; generate them {how}")
        classes_file = root / "classes.json"
        classes = _read_classes(classes_file) if classes_file.is_file() else SYNTHETIC
        super().__init__(root, split, classes)
        self.split = split


def _read_classes(path: Path) -> ClassSet:
    import json

    try:
        return ClassSet.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: cannot read the class set ({err}); delete it and rerun carbseg synthesize") from None


def open_synthetic(root: str | os.PathLike, split: str) -> SegmentationDataset:
    """The synthetic scenes of ``split`` written under ``root`` by ``carbseg synthesize``."""
    return SyntheticFolder(root, split)


def generate_synthetic_dataset(out: str | os.PathLike, split: str, num_images: int, height: int, width: int,
                               seed: int = 0, progress: bool = True) -> int:
    """Render ``num_images`` scenes of ``split`` into ``out`` and return how many were newly written.

    Writes ``out/images/<split>/<id>.png``, ``out/masks/<split>/<id>.png`` (train ids) and
    ``out/classes.json``. Each file is written atomically and scenes whose two files already exist
    are skipped, so an interrupted run resumes where it stopped.
    """
    dataset = SyntheticScenes(num_images, height, width, seed=seed, split=split)
    out = Path(out)
    write_json_atomic(out / "classes.json", SYNTHETIC.to_dict())
    written = 0
    for index in tqdm(range(num_images), desc=f"synthesize {split}", unit="scene", disable=not show_progress(progress)):
        image_path = out / "images" / split / f"{dataset.ids[index]}.png"
        mask_path = out / "masks" / split / f"{dataset.ids[index]}.png"
        if image_path.is_file() and mask_path.is_file():
            continue
        image, mask = dataset.render(index)
        # Mask first: a scene counts as finished only once its image exists too.
        write_png_atomic(mask_path, mask)
        write_png_atomic(image_path, image)
        written += 1
    return written
