"""WildDash2: conversion of the public panoptic release to train ids, and the converted dataset.

The public release (``wd_public_v2p0.zip``) holds ``images/*.jpg``, ``panoptic/*.png`` and
``panoptic.json`` in COCO-panoptic form: each panoptic PNG encodes a segment id per pixel as
``R + 256 * G + 256**2 * B``, and the JSON's ``annotations[].segments_info`` give each segment's
``category_id``, named in ``categories``. The release has ~80 fine categories; WildDash2's own
benchmark merges them into an evaluation set (its "unified label policy", published with the
dataset's scripts). The paper's 25 classes are that evaluation set without ``on rails``, so this
module maps every release category onto the 25 classes the same way, and everything else to 255.

Converted layout (what :class:`WildDash2Dataset` reads)::

    OUT/images/<split>/<IMAGE_ID>.<ext>      the release image, copied unchanged
    OUT/labels/<split>/<IMAGE_ID>.png        8-bit train ids of carbseg.data.classes.WILDDASH2
    OUT/splits.json                          {"train": [ids], "val": [ids]}: the split used

The release has no official train/val split of its public images. Unless a split file is given,
the images, sorted by IMAGE_ID, are shuffled by ``numpy.random.default_rng(seed).permutation`` and the
first ``round(val_fraction * N)`` form ``val``, the rest ``train``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from carbseg.console import show_progress
from carbseg.data.base import FileListDataset, images_with_optional_masks, require_folder
from carbseg.data.classes import IGNORE_INDEX, WILDDASH2
from carbseg.errors import UserError
from carbseg.io import atomic_path, write_json_atomic, write_png_atomic

log = logging.getLogger(__name__)

RELEASE_LAYOUT = "the WildDash2 public release: SRC/images/*.jpg, SRC/panoptic/*.png and SRC/panoptic.json"
CONVERTED_LAYOUT = ("ROOT/images/<split>/* and ROOT/labels/<split>/*.png written by "
                    "`carbseg convert-wilddash2 --src RELEASE --out ROOT`")

# Release categories that the WildDash2 evaluation policy merges into another class. Categories whose
# name equals one of the 25 class names (ignoring case, spaces and punctuation: "trafficlight" is
# "traffic light") map to that class directly; all others (void, static, parking, bridge, caravan,
# trailer, on rails, animals, street furniture, ...) are ignored (255).
MERGED_CATEGORIES: dict[str, str] = {
    "dashcammount": "ego vehicle",
    "manhole": "road", "pothole": "road", "tramtrack": "road", "bikelane": "road", "pedestrianarea": "road",
    "catchbasin": "road", "crosswalkplain": "road", "crosswalkzebra": "road", "servicelane": "road",
    "curb": "sidewalk", "curbcut": "sidewalk", "curbterrain": "sidewalk", "bikelanesidewalk": "sidewalk",
    "manholesidewalk": "sidewalk",
    "otherbarrier": "wall",
    "polegroup": "pole", "trafficsignframe": "pole", "utilitypole": "pole",
    "motorcyclist": "rider", "bicyclist": "rider", "otherrider": "rider",
    "autorickshaw": "motorcycle",
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def category_train_id(category_name: str) -> int:
    """Train id (in the paper's 25-class set) of a WildDash2 release category name; 255 if not evaluated."""
    key = _key(category_name)
    target = MERGED_CATEGORIES.get(key)
    if target is not None:
        return WILDDASH2.index(target)
    for index, name in enumerate(WILDDASH2.names):
        if _key(name) == key:
            return index
    return IGNORE_INDEX


def panoptic_to_train_ids(rgb: np.ndarray, segment_train_ids: dict[int, int]) -> np.ndarray:
    """Decode a COCO-panoptic RGB map (H, W, 3) into train ids via ``segment id -> train id``.

    Pixels of segments absent from ``segment_train_ids`` (including id 0, "no segment") become 255.
    """
    rgb = rgb.astype(np.int64)
    segment_ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    unique, inverse = np.unique(segment_ids, return_inverse=True)
    train_of_unique = np.array([segment_train_ids.get(int(s), IGNORE_INDEX) for s in unique], dtype=np.uint8)
    return train_of_unique[inverse.reshape(segment_ids.shape)]


def _read_release(src: Path) -> list[tuple[str, Path, Path, dict[int, int]]]:
    """(IMAGE_ID, image file, panoptic PNG, segment id -> train id) for every annotated release image."""
    json_path = src / "panoptic.json"
    if not json_path.is_file():
        raise UserError(f"{json_path}: not found; expected {RELEASE_LAYOUT}")
    image_dir = require_folder(src / "images", RELEASE_LAYOUT)
    panoptic_dir = require_folder(src / "panoptic", RELEASE_LAYOUT)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        category_train = {int(c["id"]): category_train_id(str(c["name"])) for c in meta["categories"]}
        image_files = {img["id"]: str(img["file_name"]) for img in meta["images"]}
        annotations = meta["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{json_path}: not a COCO-panoptic file ({type(err).__name__}: {err}); "
                        f"expected {RELEASE_LAYOUT}") from None
    if all(t == IGNORE_INDEX for t in category_train.values()):
        raise UserError(f"{json_path}: none of its categories is a WildDash2 class; is this the WildDash2 release?")
    records = []
    for ann in annotations:
        try:
            image_name = image_files[ann["image_id"]]
            segments = {int(s["id"]): category_train.get(int(s["category_id"]), IGNORE_INDEX)
                        for s in ann["segments_info"]}
            png_name = str(ann["file_name"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{json_path}: malformed annotation {str(ann)[:80]} ({err})") from None
        records.append((Path(image_name).stem, image_dir / Path(image_name).name,
                        panoptic_dir / Path(png_name).name, segments))
    if len(records) < len(image_files):
        log.warning("%s: %d images have no panoptic annotation and are skipped",
                    json_path, len(image_files) - len(records))
    records.sort(key=lambda r: r[0])
    ids = [r[0] for r in records]
    if len(set(ids)) != len(ids):
        raise UserError(f"{json_path}: several annotations share an image name; the release looks damaged")
    if not records:
        raise UserError(f"{json_path}: no annotations; expected {RELEASE_LAYOUT}")
    return records


def split_ids(ids: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """The documented split rule: seeded permutation of the sorted ids, first round(F * N) are val."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    ordered = sorted(ids)
    order = np.random.default_rng(seed).permutation(len(ordered))
    num_val = int(round(val_fraction * len(ordered)))
    val = sorted(ordered[i] for i in order[:num_val])
    train = sorted(ordered[i] for i in order[num_val:])
    return {"train": train, "val": val}


def _read_split_file(path: Path, release_ids: set[str]) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: split file not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); expected {{\"train\": [ids], \"val\": [ids]}}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise UserError(f"{path}: expected {{\"<split>\": [IMAGE_ID, ...], ...}}")
    splits = {str(k): sorted(str(i) for i in v) for k, v in data.items()}
    seen: set[str] = set()
    for name, ids in splits.items():
        unknown = [i for i in ids if i not in release_ids]
        if unknown:
            raise UserError(f"{path}: split {name!r} names {unknown[0]!r}, which is not an annotated release image")
        twice = seen.intersection(ids)
        if twice:
            raise UserError(f"{path}: image {sorted(twice)[0]!r} is listed in more than one split")
        seen.update(ids)
    return splits


def convert_wilddash2(src: str | Path, out: str | Path, split_file: str | Path | None = None,
                      val_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> dict[str, int]:
    """Convert the public WildDash2 release at ``src`` into the train-id layout at ``out``.

    Resumable: images whose two outputs already exist are skipped (outputs are written atomically).
    Returns the number of images per split.
    """
    src, out = Path(src), Path(out)
    records = _read_release(src)
    ids = [r[0] for r in records]
    if split_file is not None:
        splits = _read_split_file(Path(split_file), set(ids))
    else:
        splits = split_ids(ids, val_fraction, seed)
    splits_path = out / "splits.json"
    if splits_path.is_file():
        previous = json.loads(splits_path.read_text(encoding="utf-8"))
        if previous != splits:
            raise UserError(f"{splits_path}: this folder was converted with a different split; "
                            "use the same --val-fraction/--seed (or split file), or a new --out folder")
    else:
        write_json_atomic(splits_path, splits)
    split_of = {i: name for name, members in splits.items() for i in members}
    todo = [r for r in records if r[0] in split_of]
    for image_id, image_path, png_path, segments in tqdm(todo, desc="convert WildDash2", unit="img",
                                                          disable=not show_progress(progress)):
        split = split_of[image_id]
        image_out = out / "images" / split / f"{image_id}{image_path.suffix.lower()}"
        label_out = out / "labels" / split / f"{image_id}.png"
        if image_out.is_file() and label_out.is_file():
            continue
        if not image_path.is_file():
            raise UserError(f"{image_path}: image listed in panoptic.json is missing; re-extract the release")
        label = panoptic_to_train_ids(_read_panoptic_png(png_path), segments)
        with Image.open(image_path) as img:
            width, height = img.size
        if label.shape != (height, width):
            raise UserError(f"{png_path}: size {label.shape[1]}x{label.shape[0]} differs from its image "
                            f"{image_path} ({width}x{height}); re-extract the release")
        write_png_atomic(label_out, label)
        with atomic_path(image_out) as tmp:
            shutil.copyfile(image_path, tmp)
    return {name: len(members) for name, members in splits.items()}


def _read_panoptic_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path}: panoptic PNG listed in panoptic.json is missing; re-extract the release") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read panoptic PNG ({err}); re-extract the release") from None


class WildDash2Dataset(FileListDataset):
    """The converted layout; labels already hold train ids of the 25-class set."""

    def __init__(self, root: str | Path, split: str):
        root = Path(root)
        images_root = require_folder(root / "images", CONVERTED_LAYOUT)
        image_dir = root / "images" / split
        if not image_dir.is_dir():
            available = sorted(p.name for p in images_root.iterdir() if p.is_dir())
            raise UserError(f"{image_dir}: no WildDash2 split {split!r}; available: {', '.join(available) or 'none'} "
                            f"(expected {CONVERTED_LAYOUT})")
        ids, image_paths, mask_paths = images_with_optional_masks(image_dir, root / "labels" / split, "*.jpg")
        super().__init__(WILDDASH2, ids, image_paths, mask_paths, root)
