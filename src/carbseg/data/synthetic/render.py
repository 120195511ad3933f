"""Rendering one synthetic scene: layout, background and objects painted on the canvas, then
texture (grain and blotches of a per-class strength), vignette and exposure. Scene seeds give
each (split, dataset seed, index) its own scene.
"""

from __future__ import annotations

import numpy as np

from carbseg.data.classes import SYNTHETIC
from carbseg.data.synthetic.camera import (
    BICYCLE,
    BUILDING,
    BUS,
    CAR,
    FENCE,
    LIGHT,
    MOTORCYCLE,
    PERSON,
    POLE,
    RIDER,
    ROAD,
    SIDEWALK,
    SIGN,
    SKY,
    TERRAIN,
    TRUCK,
    VEGETATION,
    WALL,
    Canvas,
    upsampled_noise,
)
from carbseg.data.synthetic.scene import (
    make_layout,
    paint_facades,
    paint_ground,
    paint_sky,
    paint_skyline,
    place_objects,
)
from carbseg.errors import UserError

#: Classes the generator draws (every class of the set except ``train``).
DRAWN_CLASSES: tuple[str, ...] = tuple(n for n in SYNTHETIC.names if n != "train")


SPLITS = ("train", "val", "test")
# Scene seeds are (split, dataset seed, index) packed into disjoint bit fields, so train, val and
# test never share a scene, whatever the dataset seed.
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
_FIELD_BITS = 24


# Texture strength per class (relative noise amplitude): fine grain, blotches.
_GRAIN = np.zeros(256, np.float32)
_BLOTCH = np.zeros(256, np.float32)
for _cls, _grain, _blotch in (
    (ROAD, 0.07, 0.10), (SIDEWALK, 0.06, 0.08), (BUILDING, 0.05, 0.10), (WALL, 0.06, 0.10),
    (FENCE, 0.05, 0.06), (POLE, 0.04, 0.05), (LIGHT, 0.04, 0.03), (SIGN, 0.03, 0.03),
    (VEGETATION, 0.12, 0.30), (TERRAIN, 0.10, 0.22), (SKY, 0.01, 0.04), (PERSON, 0.05, 0.05),
    (RIDER, 0.05, 0.05), (CAR, 0.03, 0.05), (TRUCK, 0.04, 0.06), (BUS, 0.03, 0.05),
    (MOTORCYCLE, 0.04, 0.04), (BICYCLE, 0.04, 0.04),
):
    _GRAIN[_cls], _BLOTCH[_cls] = _grain, _blotch



def scene_seed(split: str, seed: int, index: int) -> int:
    """The generator seed of scene ``index`` of ``split`` in a dataset made with ``seed``."""
    if split not in _SPLIT_CODE:
        raise UserError(f"unknown synthetic split {split!r}; valid: {', '.join(SPLITS)}")
    limit = 1 << _FIELD_BITS
    if not (0 <= seed < limit and 0 <= index < limit):
        raise UserError(f"synthetic seed and index must be in 0..{limit - 1} (got seed={seed}, index={index})")
    return (_SPLIT_CODE[split] << (2 * _FIELD_BITS)) | (seed << _FIELD_BITS) | index



def render_scene(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One driving scene: (image uint8 (H, W, 3) RGB, mask uint8 (H, W) SYNTHETIC train ids).

    Deterministic in ``seed``; the layout is in metres, so one seed gives the same scene at every size.
    """
    if height < 8 or width < 8:
        raise UserError(f"synthetic scenes need at least 8x8 pixels, got {width}x{height}")
    rng = np.random.default_rng(seed)
    cv = Canvas(rng, height, width)
    lay = make_layout(rng)
    blotch = upsampled_noise(rng, height, width, 12)
    sun_left = rng.random() < 0.5
    light_l = rng.uniform(0.95, 1.1) if sun_left else rng.uniform(0.6, 0.8)
    light_r = rng.uniform(0.6, 0.8) if sun_left else rng.uniform(0.95, 1.1)

    paint_sky(cv, rng, blotch)
    paint_skyline(cv, rng)
    xg, zg = paint_ground(cv, rng, lay)
    # Building shadows across the ground on the shaded side (colour only: labels are unaffected).
    r0 = int(np.ceil(cv.yh))
    # The buildings on the shaded side cast their shadows over the near part of the ground.
    shade = (xg > lay.road_right - rng.uniform(0, 5)) if sun_left else (xg < lay.road_left + rng.uniform(0, 5))
    shade &= blotch[r0:] > rng.uniform(-0.8, 0.3)  # gaps between buildings let the sun through
    cv.image[r0:][shade] *= rng.uniform(0.55, 0.75)
    paint_facades(cv, rng, lay, sun_left)
    place_objects(cv, rng, lay, blotch, light_l, light_r)

    # Texture: fine grain plus smooth blotches, with a per-class strength (vegetation strongest).
    grain = rng.standard_normal((height, width), dtype=np.float32)
    blotch2 = upsampled_noise(rng, height, width, 40)
    grain *= _GRAIN[cv.mask]
    blotch2 *= _BLOTCH[cv.mask]
    grain += blotch2
    grain += 1.0
    # A gentle vignette, folded into the same per-pixel factor.
    vy = (cv.ys[:, None] / height - 0.5) ** 2
    vx = (cv.xs[None, :] / width - 0.5) ** 2
    grain *= 1.0 - 0.35 * (vx + vy)
    image = cv.image
    image *= grain[..., None]
    # Per-scene exposure and white balance.
    image *= (rng.uniform(0.8, 1.15) * rng.uniform(0.92, 1.08, 3)).astype(np.float32)
    np.clip(image, 0, 255, out=image)
    image = image.astype(np.uint8)
    return image, cv.mask


