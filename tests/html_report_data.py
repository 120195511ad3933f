"""A tiny folder dataset with hand-made ground truth and predictions for the HTML report's tests.

Frames are 64 x 32 in flat colour blocks: road on the left half, car in columns 32..47, and in
even-numbered images pole in columns 48..63 (car there otherwise). Image k's prediction is the
ground truth with its top k rows of road predicted as car and, in pole images, the first 2k pole
columns predicted as car, so per-image scores differ and are known in closed form; images 1, 5, 9,
... have one spurious pole pixel (top right) in their prediction only; image 2 one pixel of
car predicted as 255 (ignore), which counts as a miss.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = {"names": ["road", "car", "pole"], "palette": [[128, 64, 128], [0, 0, 142], [153, 153, 153]]}
ROAD, CAR, POLE = 0, 1, 2
WIDTH, HEIGHT = 64, 32
PHOTO_COLOURS = {ROAD: (90, 90, 90), CAR: (200, 40, 40), POLE: (240, 240, 60)}


def ground_truth(k: int) -> np.ndarray:
    gt = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    gt[:, 32:] = CAR
    if k % 2 == 0:
        gt[:, 48:] = POLE
    gt[-2:, :4] = 255  # a few pixels without ground truth
    return gt


def prediction(k: int) -> np.ndarray:
    pred = ground_truth(k)
    pred[:k, :32] = CAR
    if k % 2 == 0:
        pred[:, 48:48 + 2 * k] = CAR
    elif k % 4 == 1:
        pred[0, 63] = POLE
    pred[pred == 255] = ROAD
    if k == 2:
        pred[31, 40] = 255  # a car pixel where the teacher abstained: a miss
    return pred


def photo(gt: np.ndarray) -> np.ndarray:
    picture = np.zeros(gt.shape + (3,), dtype=np.uint8)
    for c, colour in PHOTO_COLOURS.items():
        picture[gt == c] = colour
    return picture


def make_dataset(root: Path, count: int, names=None) -> tuple[Path, Path, list[str]]:
    """Writes ROOT/images/val, ROOT/masks/val, ROOT/classes.json and predictions ROOT/pred;
    returns the classes file, the prediction folder and the image ids."""
    names = names or [f"frame {k:03d}" for k in range(count)]
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    (root / "pred").mkdir()
    for k, name in enumerate(names):
        gt = ground_truth(k)
        Image.fromarray(photo(gt)).save(root / "images" / "val" / f"{name}.png")
        Image.fromarray(gt).save(root / "masks" / "val" / f"{name}.png")
        Image.fromarray(prediction(k)).save(root / "pred" / f"{name}.png")
    classes = root / "classes.json"
    classes.write_text(json.dumps(CLASSES), encoding="utf-8")
    return classes, root / "pred", names


def page_data(report_dir: Path) -> dict:
    """The JSON the page inlines (between its page-data script tags)."""
    html = (report_dir / "index.html").read_text(encoding="utf-8")
    start = html.index('<script id="page-data" type="application/json">') + len(
        '<script id="page-data" type="application/json">')
    return json.loads(html[start:html.index("</script>", start)])
