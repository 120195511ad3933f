"""A user's own dataset: a folder of images, a folder of train-id masks, and a classes file.

    ROOT/images/<split>/<name>.<ext>     (any common image format)
    ROOT/masks/<split>/<name>.png        (8-bit train ids 0..C-1, 255 = ignore; same stem as the image)

The classes file (JSON or YAML) gives ``names``, optionally ``text_names`` (what CLIP is prompted
with, default: the names) and ``palette`` (one [R, G, B] per class, default: a fixed generated one).
A split without ``masks/<split>`` is opened without ground truth (e.g. images to segment only).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from carbseg.data.base import FileListDataset, images_with_optional_masks, require_folder
from carbseg.data.classes import ClassSet
from carbseg.errors import UserError

LAYOUT = "ROOT/images/<split>/* with optional masks ROOT/masks/<split>/<same name>.png"


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct, reproducible colours (a fixed-seed draw) for class sets that give no palette."""
    rng = np.random.default_rng(0)
    return [tuple(int(v) for v in rng.integers(0, 256, size=3)) for _ in range(num_classes)]


def load_class_set(path: str | Path) -> ClassSet:
    """Read a classes file (JSON, or YAML via ``yaml.safe_load``) into a ClassSet; UserError when malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: classes file not found") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot parse classes file ({reason})") from None  # one line: YAML errors span several
    fix = "write e.g. {\"names\": [\"road\", \"car\"], \"palette\": [[128, 64, 128], [0, 0, 142]]}"
    if not isinstance(data, dict) or not isinstance(data.get("names"), list) or not data["names"]:
        raise UserError(f"{path}: classes file needs a non-empty list 'names'; {fix}")
    names = [str(n) for n in data["names"]]
    if len(names) > 255:
        raise UserError(f"{path}: {len(names)} classes; at most 255 fit 8-bit masks with 255 = ignore")
    text_names = data.get("text_names", names)
    palette = data.get("palette", default_palette(len(names)))
    for key, value in (("text_names", text_names), ("palette", palette)):
        if not isinstance(value, list) or len(value) != len(names):
            raise UserError(f"{path}: '{key}' must list one entry per class ({len(names)}); {fix}")
    try:
        colours = tuple(tuple(int(v) for v in c) for c in palette)
    except (TypeError, ValueError):
        raise UserError(f"{path}: 'palette' entries must be [R, G, B] integers; {fix}") from None
    if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colours):
        raise UserError(f"{path}: 'palette' entries must be [R, G, B] with values 0..255; {fix}")
    try:
        return ClassSet(name=str(data.get("name", "folder")), names=tuple(names),
                        text_names=tuple(str(n) for n in text_names), palette=colours)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None


class FolderDataset(FileListDataset):
    def __init__(self, root: str | Path, split: str, classes: ClassSet):
        root = Path(root)
        image_dir = require_folder(root / "images" / split, LAYOUT)
        ids, image_paths, mask_paths = images_with_optional_masks(image_dir, root / "masks" / split,
                                                                  "*.<image extension>")
        super().__init__(classes, ids, image_paths, mask_paths, root)
