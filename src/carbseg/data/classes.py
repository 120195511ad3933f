"""Class sets of the supported datasets: display names, CLIP text names, and palettes.

All label maps in carbseg are in *train ids* 0..C-1 with 255 as ignore. ``text_names`` are the
names fed to the CLIP prompt ensemble; the paper renames three Cityscapes classes so that CLIP
recognises them (vegetation -> "tree", terrain -> "grass", person -> "pedestrian").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from carbseg.errors import UserError

IGNORE_INDEX = 255


@dataclass(frozen=True)
class ClassSet:
    name: str
    names: tuple[str, ...]
    text_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    # Classes that the method calls "small objects" (the ones GLV is meant to recover); used by reports.
    small_classes: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not (len(self.names) == len(self.text_names) == len(self.palette)):
            raise ValueError(f"class set {self.name}: names, text_names and palette differ in length")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"class set {self.name}: duplicate class names")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def palette_array(self) -> np.ndarray:
        """(256, 3) uint8 lookup table: class colours, ignore (and any unused id) in black."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return lut

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UserError(f"unknown class {name!r} for {self.name}; valid: {', '.join(self.names)}") from None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "names": list(self.names),
            "text_names": list(self.text_names),
            "palette": [list(c) for c in self.palette],
            "small_classes": list(self.small_classes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClassSet:
        return cls(
            name=d["name"],
            names=tuple(d["names"]),
            text_names=tuple(d.get("text_names", d["names"])),
            palette=tuple(tuple(int(v) for v in c) for c in d["palette"]),
            small_classes=tuple(d.get("small_classes", ())),
        )


CITYSCAPES = ClassSet(
    name="cityscapes",
    names=(
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle",
    ),
    text_names=(
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "tree", "grass", "sky", "pedestrian", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle",
    ),
    palette=(
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ),
    small_classes=("pole", "traffic light", "traffic sign", "person", "rider", "motorcycle", "bicycle"),
)

# SegNet release of CamVid (11 classes, value 11 = void -> ignore).
CAMVID = ClassSet(
    name="camvid",
    names=(
        "sky", "building", "pole", "road", "sidewalk", "tree", "signsymbol", "fence", "car",
        "pedestrian", "bicyclist",
    ),
    text_names=(
        "sky", "building", "pole", "road", "sidewalk", "tree", "signsymbol", "fence", "car",
        "pedestrian", "bicyclist",
    ),
    palette=(
        (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
        (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
    ),
    small_classes=("pole", "signsymbol", "pedestrian", "bicyclist"),
)

# The paper's 25-class WildDash2 set (text names as used for CLIP).
WILDDASH2 = ClassSet(
    name="wilddash2",
    names=(
        "ego vehicle", "road", "sidewalk", "building", "wall", "fence", "guard rail", "pole",
        "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
        "truck", "bus", "motorcycle", "bicycle", "pickup", "van", "billboard", "streetlight",
        "road marking",
    ),
    text_names=(
        "ego vehicle", "road", "sidewalk", "building", "wall", "fence", "guard rail", "pole",
        "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
        "truck", "bus", "motorcycle", "bicycle", "pickup", "van", "billboard", "streetlight",
        "road marking",
    ),
    palette=(
        (120, 0, 120), (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (180, 165, 180), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
        (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
        (0, 60, 100), (0, 0, 230), (119, 11, 32), (0, 0, 110), (0, 40, 120), (174, 64, 67),
        (210, 170, 100), (255, 255, 255),
    ),
    small_classes=("pole", "traffic light", "traffic sign", "person", "rider", "motorcycle", "bicycle",
                   "streetlight"),
)

# Procedurally generated scenes use the Cityscapes class set (classes the generator never draws
# are simply absent, so their IoU is null and they are excluded from the mean).
SYNTHETIC = ClassSet(
    name="synthetic",
    names=CITYSCAPES.names,
    text_names=CITYSCAPES.text_names,
    palette=CITYSCAPES.palette,
    small_classes=CITYSCAPES.small_classes,
)

CLASS_SETS: dict[str, ClassSet] = {c.name: c for c in (CITYSCAPES, CAMVID, WILDDASH2, SYNTHETIC)}


def get_class_set(name: str) -> ClassSet:
    try:
        return CLASS_SETS[name]
    except KeyError:
        raise UserError(
            f"unknown class set {name!r}; valid: {', '.join(CLASS_SETS)} (or 'folder' with a classes file)"
        ) from None
