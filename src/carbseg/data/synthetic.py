"""Procedurally generated driving scenes: the offline stand-in for Cityscapes.

A scene is a small 3D world seen by a pinhole camera 1.5 m above a flat ground plane: a road
running away to a vanishing point, sidewalks, terrain, building facades with windows, walls and
fences, trees, and objects placed on the ground (poles carrying traffic lights and signs, cars,
trucks, buses, pedestrians, riders on bicycles or motorcycles, parked bicycles). Everything is
defined in metres, so the same seed gives the same scene at any image size, and perspective comes
for free: far objects are small and close to the horizon, near ones are painted over far ones.

The classes are Cityscapes' 19 (``SYNTHETIC``); ``train`` is never drawn. Poles, traffic lights,
signs and pedestrians are frequent but thin (a few pixels at 512x256), so a 16-pixel teacher grid
misses them unless the view is zoomed -- exactly the situation Global-Local View training (GLV)
addresses. Colours are per-scene and per-object jittered, shaded and textured, and several classes
share hues (grey road / wall / building, green vegetation / terrain), so a segmenter must use shape
and context, not a colour lookup.

Rendering is numpy-vectorised per primitive (each works on its bounding box only); a 512x256 scene
takes a few milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from carbseg.console import show_progress
from carbseg.data.base import SegmentationDataset, check_unique_ids
from carbseg.data.classes import SYNTHETIC, ClassSet
from carbseg.errors import UserError
from carbseg.io import read_image, read_label_png, write_json_atomic, write_png_atomic

C = {name: i for i, name in enumerate(SYNTHETIC.names)}
ROAD, SIDEWALK, BUILDING, WALL, FENCE = C["road"], C["sidewalk"], C["building"], C["wall"], C["fence"]
POLE, LIGHT, SIGN = C["pole"], C["traffic light"], C["traffic sign"]
VEGETATION, TERRAIN, SKY = C["vegetation"], C["terrain"], C["sky"]
PERSON, RIDER, CAR, TRUCK, BUS = C["person"], C["rider"], C["car"], C["truck"], C["bus"]
MOTORCYCLE, BICYCLE = C["motorcycle"], C["bicycle"]

#: Classes the generator draws (every class of the set except ``train``).
DRAWN_CLASSES: tuple[str, ...] = tuple(n for n in SYNTHETIC.names if n != "train")

SPLITS = ("train", "val", "test")
# Scene seeds are (split, dataset seed, index) packed into disjoint bit fields, so train, val and
# test never share a scene, whatever the dataset seed.
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
_FIELD_BITS = 24

CAMERA_HEIGHT = 1.5  # metres above the ground plane

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


# ----------------------------------------------------------------------------- canvas and camera
class _Canvas:
    """Image (float RGB 0..255) and label map being painted back to front, plus the camera."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.h, self.w = height, width
        self.image = np.zeros((height, width, 3), np.float32)
        self.mask = np.full((height, width), SKY, np.uint8)
        # Pinhole camera in relative terms: focal length and horizon scale with the image size.
        self.f = width * rng.uniform(0.8, 1.0)
        self.cx = width * rng.uniform(0.44, 0.56)
        self.yh = height * rng.uniform(0.40, 0.48)
        self.ys = np.arange(height, dtype=np.float32) + 0.5
        self.xs = np.arange(width, dtype=np.float32) + 0.5

    # -- projection: world (X right, Y up, Z forward), metres -> pixel coordinates
    def col(self, x: float, z: float) -> float:
        return self.cx + self.f * x / z

    def row(self, y: float, z: float) -> float:
        return self.yh + self.f * (CAMERA_HEIGHT - y) / z

    def box_bounds(self, a0: float, a1: float, b0: float, b1: float, size: int) -> tuple[int, int] | None:
        """Pixel index range [i0, i1) covering the span a0..a1 (at least one pixel), or None if off-canvas."""
        i0 = int(np.floor(min(a0, a1) + 0.5))
        i1 = max(i0 + 1, int(np.floor(max(a0, a1) + 0.5)))
        i0, i1 = max(i0, 0), min(i1, size)
        return (i0, i1) if i1 > i0 else None

    def paint(self, r0: int, c0: int, region: np.ndarray, cls: int, colour) -> None:
        """Set class and colour where ``region`` (a bool array anchored at (r0, c0)) is true."""
        h, w = region.shape
        m = self.mask[r0 : r0 + h, c0 : c0 + w]
        img = self.image[r0 : r0 + h, c0 : c0 + w]
        np.copyto(m, np.uint8(cls), where=region)
        # copyto with a mask is much faster than boolean indexing for large regions (facades).
        np.copyto(img, np.asarray(colour, np.float32), where=region[..., None])

    def tint(self, r0: int, c0: int, region: np.ndarray, factor) -> None:
        """Multiply the colour (not the class) inside ``region``: shadows, lighting."""
        h, w = region.shape
        img = self.image[r0 : r0 + h, c0 : c0 + w]
        img[region] *= np.asarray(factor, np.float32)

    # -- frontal rectangle at depth z: the back of a vehicle, a pole, a sign
    def frontal(self, x0, x1, y0, y1, z):
        """Pixel box of a rectangle facing the camera; returns (r0, c0, X, Y) local world coords or None."""
        cols = self.box_bounds(self.col(x0, z), self.col(x1, z), 0, 0, self.w)
        rows = self.box_bounds(self.row(y1, z), self.row(y0, z), 0, 0, self.h)
        if cols is None or rows is None:
            return None
        (c0, c1), (r0, r1) = cols, rows
        xw = (self.xs[c0:c1] - self.cx) * z / self.f
        yw = CAMERA_HEIGHT - (self.ys[r0:r1] - self.yh) * z / self.f
        return r0, c0, xw[None, :], yw[:, None]

    # -- side plane X = x at depths z0..z1: facades, walls, the sides of vehicles
    def side(self, x, z0, z1, y0, y1):
        """Pixels of a vertical plane parallel to the road; returns (r0, c0, region, Z, Y) or None."""
        if abs(x) < 1e-3:
            return None
        cols = self.box_bounds(self.col(x, z0), self.col(x, z1), 0, 0, self.w)
        if cols is None:
            return None
        c0, c1 = cols
        dx = self.xs[c0:c1] - self.cx
        with np.errstate(divide="ignore", invalid="ignore"):
            zcol = np.where(dx * x > 0, self.f * x / dx, np.inf)
        zmin = max(z0, float(np.min(zcol)))
        rows = self.box_bounds(self.row(y1, zmin), self.row(y0, zmin), 0, 0, self.h)
        if rows is None:
            return None
        r0, r1 = rows
        yw = CAMERA_HEIGHT - (self.ys[r0:r1, None] - self.yh) * zcol[None, :] / self.f
        region = (zcol[None, :] >= z0) & (zcol[None, :] <= z1) & (yw >= y0) & (yw <= y1)
        if not region.any():
            return None
        return r0, c0, region, np.broadcast_to(zcol[None, :], region.shape), yw

    def ellipse(self, xc, yc, z, rx, ry):
        """A world-space ellipse facing the camera: (r0, c0, region, u, v) with u, v in -1..1."""
        px, py, prx, pry = self.col(xc, z), self.row(yc, z), self.f * rx / z, self.f * ry / z
        prx, pry = max(prx, 0.5), max(pry, 0.5)
        cols = self.box_bounds(px - prx, px + prx, 0, 0, self.w)
        rows = self.box_bounds(py - pry, py + pry, 0, 0, self.h)
        if cols is None or rows is None:
            return None
        (c0, c1), (r0, r1) = cols, rows
        u = (self.xs[None, c0:c1] - px) / prx
        v = (self.ys[r0:r1, None] - py) / pry
        region = u * u + v * v <= 1.0
        if not region.any():
            # Sub-pixel ellipse: keep its centre pixel so small parts do not vanish at low resolution.
            pr, pc = int(py), int(px)
            if not (r0 <= pr < r1 and c0 <= pc < c1):
                return None
            region = np.zeros((r1 - r0, c1 - c0), bool)
            region[pr - r0, pc - c0] = True
        return r0, c0, region, u, v

    def segment(self, p, q, z, thickness):
        """A thick line between world points p=(x, y) and q at depth z (bicycle frames, arms)."""
        ax, ay, bx, by = self.col(p[0], z), self.row(p[1], z), self.col(q[0], z), self.row(q[1], z)
        half = max(self.f * thickness / z / 2.0, 0.5)
        cols = self.box_bounds(min(ax, bx) - half, max(ax, bx) + half, 0, 0, self.w)
        rows = self.box_bounds(min(ay, by) - half, max(ay, by) + half, 0, 0, self.h)
        if cols is None or rows is None:
            return None
        (c0, c1), (r0, r1) = cols, rows
        px, py = self.xs[None, c0:c1], self.ys[r0:r1, None]
        dx, dy = bx - ax, by - ay
        t = np.clip(((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
        dist2 = (px - ax - t * dx) ** 2 + (py - ay - t * dy) ** 2
        return r0, c0, dist2 <= half * half + 0.25


def _upsampled_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise (std about 1): a coarse Gaussian grid, bilinearly enlarged to the image size."""
    coarse = rng.standard_normal((cells, 2 * cells)).astype(np.float32)
    big = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    return np.array(big, dtype=np.float32)


def _jitter(rng: np.random.Generator, rgb, amount: float) -> np.ndarray:
    """A colour with each channel scaled independently by 1 +- amount, and overall brightness too."""
    rgb = np.asarray(rgb, np.float32)
    return np.clip(rgb * rng.uniform(1 - amount, 1 + amount, 3) * rng.uniform(1 - amount, 1 + amount), 0, 255)


# ----------------------------------------------------------------------------- scene layout
@dataclass
class _Layout:
    """Where the ground strips are, in metres from the camera's line of sight (X axis)."""

    road_left: float
    road_right: float
    lanes: list[float]  # X of lane boundaries inside the road (lane marks)
    walk_left: float  # outer edge of the left sidewalk
    walk_right: float
    verge_left: float  # grass between road and sidewalk (0 = none)
    verge_right: float
    urban_left: bool  # buildings (True) or greenery (False) beyond the sidewalk
    urban_right: bool


def _make_layout(rng: np.random.Generator) -> _Layout:
    lane_w = rng.uniform(2.9, 3.6)
    n_lanes = int(rng.integers(2, 5))
    own_lane = int(rng.integers(0, n_lanes))
    road_left = -(own_lane + rng.uniform(0.35, 0.65)) * lane_w
    road_right = road_left + n_lanes * lane_w
    lanes = [road_left + i * lane_w for i in range(1, n_lanes)]
    verge_left = rng.uniform(1.0, 3.0) if rng.random() < 0.3 else 0.0
    verge_right = rng.uniform(1.0, 3.0) if rng.random() < 0.3 else 0.0
    walk_left = road_left - verge_left - rng.uniform(2.0, 5.0)
    walk_right = road_right + verge_right + rng.uniform(2.0, 5.0)
    return _Layout(road_left, road_right, lanes, walk_left, walk_right, verge_left, verge_right,
                   urban_left=rng.random() < 0.75, urban_right=rng.random() < 0.75)


# ----------------------------------------------------------------------------- background
def _paint_sky(cv: _Canvas, rng: np.random.Generator, blotch: np.ndarray) -> None:
    overcast = rng.random() < 0.3
    top = _jitter(rng, (150, 155, 160) if overcast else (70, 120, 190), 0.12)
    bottom = _jitter(rng, (200, 202, 205) if overcast else (175, 200, 225), 0.08)
    rows = min(cv.h, int(cv.yh) + 2)  # the ground covers everything below the horizon
    t = np.clip(cv.ys[:rows] / max(cv.yh, 1.0), 0, 1)[:, None, None]
    sky = top * (1 - t) + bottom * t
    # Clouds: where the smooth noise is high, blend towards white-grey.
    cloud = np.clip((blotch[:rows] - rng.uniform(0.3, 1.2)) * 0.6, 0, 0.8)[..., None]
    cv.image[:rows] = sky + (_jitter(rng, (235, 235, 238), 0.05) - sky) * cloud
    cv.mask[:] = SKY


def _paint_skyline(cv: _Canvas, rng: np.random.Generator) -> None:
    """Distant buildings and tree lines along the horizon, so the sky rarely meets the road."""
    x = 0
    zfar = 250.0
    while x < cv.w:
        block_w = max(1, int(cv.w * rng.uniform(0.02, 0.12)))
        is_tree = rng.random() < 0.4
        height_m = rng.uniform(8, 25) if is_tree else rng.uniform(8, 60)
        top = cv.row(height_m, zfar)
        r0 = max(0, int(top))
        r1 = min(cv.h, int(cv.yh) + 2)
        if r1 > r0:
            cls = VEGETATION if is_tree else BUILDING
            colour = _jitter(rng, (70, 90, 60) if is_tree else (120, 125, 135), 0.15)
            region = np.ones((r1 - r0, min(block_w, cv.w - x)), bool)
            if is_tree:  # rounded crowns: drop the top corners
                u = np.linspace(-1, 1, region.shape[1])[None, :]
                v = np.linspace(0, 1, region.shape[0])[:, None]
                region &= v > 0.6 * u * u
            cv.paint(r0, x, region, cls, colour)
        x += block_w


def _paint_ground(cv: _Canvas, rng: np.random.Generator, lay: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Road, lane marks, verges, sidewalks and what lies beyond them; returns per-pixel ground X, Z."""
    r0 = int(np.ceil(cv.yh))
    zrow = cv.f * CAMERA_HEIGHT / (cv.ys[r0:, None] - cv.yh)  # depth of each ground row, (n, 1)
    xg = (cv.xs[None, :] - cv.cx) * (zrow / cv.f)  # lateral position of each ground pixel, (n, W)
    rows = np.arange(xg.shape[0])[:, None]

    # Strips from left to right, found by one binary search per pixel.
    edges = np.array([lay.walk_left, lay.road_left - lay.verge_left, lay.road_left, lay.road_right,
                      lay.road_right + lay.verge_right, lay.walk_right], np.float32)
    strip = np.searchsorted(edges, xg).astype(np.uint8)
    beyond_l = SIDEWALK if lay.urban_left else TERRAIN
    beyond_r = SIDEWALK if lay.urban_right else TERRAIN
    strip_class = np.array([beyond_l, SIDEWALK, TERRAIN, ROAD, TERRAIN, SIDEWALK, beyond_r], np.uint8)
    cls = strip_class[strip]

    # Colour table per row: (road, sidewalk, terrain, lane mark, sidewalk joint, curb), hazed with depth.
    table = np.stack([
        _jitter(rng, (85, 85, 90), 0.15), _jitter(rng, (150, 140, 135), 0.15), _jitter(rng, (120, 140, 70), 0.2),
        _jitter(rng, (215, 215, 205), 0.05),
    ])
    table = np.concatenate([table, table[1:2] * 0.85, np.minimum(table[1:2] * 1.2, 255)])
    haze = np.clip(zrow / 200.0, 0, 0.5)[..., None]  # the ground fades towards the horizon colour
    row_table = table[None] * (1 - haze) + np.float32(170) * haze  # (n, 6, 3)
    colour_of = {ROAD: 0, SIDEWALK: 1, TERRAIN: 2}
    kind = np.array([colour_of[c] for c in strip_class.tolist()], np.uint8)[strip]

    # Paving slabs on the sidewalk: thin darker joints every ~1.2 m in depth.
    joint_row = np.mod(zrow, 1.2) < 0.08 * np.maximum(zrow / 20, 1)
    kind[(cls == SIDEWALK) & joint_row] = 4
    # Curbs: a light band where the road meets the sidewalk.
    curb = (np.abs(xg - edges[1]) < 0.15) | (np.abs(xg - edges[4]) < 0.15)
    kind[curb & (cls == SIDEWALK)] = 5
    # Lane marks (class road): dashed between lanes, solid at the edges, about a pixel wide when far.
    half = 0.075 * np.maximum(1.0, zrow / 40.0)
    dash_row = np.mod(zrow + rng.uniform(0, 9), 9.0) < 3.0
    on_mark = np.zeros(xg.shape, bool)
    if lay.lanes:
        lane_w = lay.lanes[0] - lay.road_left
        to_boundary = np.abs(np.mod(xg - lay.road_left + lane_w / 2, lane_w) - lane_w / 2)
        inner = (xg > lay.road_left + lane_w / 2) & (xg < lay.road_right - lane_w / 2)
        on_mark |= (to_boundary < half) & dash_row & inner
    on_mark |= np.abs(xg - (lay.road_left + 0.3)) < half
    on_mark |= np.abs(xg - (lay.road_right - 0.3)) < half
    if rng.random() < 0.3:  # a crosswalk ahead
        zc = rng.uniform(10, 30)
        on_mark |= ((zrow > zc) & (zrow < zc + 3)) & (np.mod(xg, 1.0) < 0.5)
    kind[on_mark & (cls == ROAD)] = 3

    cv.mask[r0:] = cls
    cv.image[r0:] = row_table[rows, kind]
    return xg, np.broadcast_to(zrow, xg.shape)


def _paint_facades(cv: _Canvas, rng: np.random.Generator, lay: _Layout, sun_left: bool) -> None:
    """Rows of buildings along both sides, with windows, or walls / fences / hedges in green areas."""
    for side in (-1, 1):
        urban = lay.urban_left if side < 0 else lay.urban_right
        walk_edge = lay.walk_left if side < 0 else lay.walk_right
        lit = (side < 0) == sun_left
        light = rng.uniform(0.95, 1.1) if lit else rng.uniform(0.55, 0.75)
        z = rng.uniform(4, 12)
        while z < 220:
            length = rng.uniform(8, 35)
            if urban and rng.random() < 0.85:
                _building(cv, rng, walk_edge + side * rng.uniform(0, 1.5), z, z + length, light)
            elif rng.random() < 0.7:
                _low_boundary(cv, rng, walk_edge + side * rng.uniform(0, 1.0), z, z + length, light)
            z += length + (rng.uniform(3, 15) if rng.random() < 0.3 else 0.0)


def _building(cv: _Canvas, rng: np.random.Generator, x: float, z0: float, z1: float, light: float) -> None:
    height = rng.uniform(6, 28)
    got = cv.side(x, z0, z1, 0.0, height)
    if got is None:
        return
    r0, c0, region, zz, yy = got
    base = _jitter(rng, [(150, 140, 125), (120, 120, 125), (170, 160, 145), (140, 110, 95), (95, 95, 100)]
                   [int(rng.integers(0, 5))], 0.12) * light
    colour = np.empty(region.shape + (3,), np.float32)
    colour[:] = base
    # Darker near the ground (ambient occlusion) and a lighter cornice on top.
    colour *= (0.8 + 0.2 * np.clip(yy / 4.0, 0, 1))[..., None]
    colour[yy > height - 0.5] *= 1.15
    # Windows on a regular grid of floors and bays, reflecting the sky or dark rooms.
    floor_h, bay_w = rng.uniform(2.8, 3.6), rng.uniform(2.0, 4.0)
    fy, fz = np.mod(yy, floor_h) / floor_h, np.mod(zz - z0, bay_w) / bay_w
    win = (fy > 0.3) & (fy < 0.8) & (fz > 0.25) & (fz < 0.75) & (yy > floor_h) & (yy < height - 0.8)
    glass = _jitter(rng, (60, 75, 95) if rng.random() < 0.6 else (140, 160, 180), 0.15) * light
    colour[win] = glass * (0.85 + 0.3 * fy[win, None])
    # Shop front: a dark band at street level in city streets.
    if rng.random() < 0.5:
        colour[(yy < 2.6) & (yy > 0.3) & (np.mod(zz - z0, bay_w * 2) > 0.6)] *= 0.55
    cv.paint(r0, c0, region, BUILDING, colour)


def _low_boundary(cv: _Canvas, rng: np.random.Generator, x: float, z0: float, z1: float, light: float) -> None:
    """A wall, a fence or a hedge along the sidewalk's outer edge."""
    kind = rng.choice(["wall", "fence", "hedge"], p=[0.45, 0.4, 0.15])
    height = rng.uniform(1.0, 2.5)
    got = cv.side(x, z0, z1, 0.0, height)
    if got is None:
        return
    r0, c0, region, zz, yy = got
    if kind == "wall":
        colour = np.empty(region.shape + (3,), np.float32)
        colour[:] = _jitter(rng, (135, 130, 125), 0.15) * light
        colour[np.mod(yy, 0.6) < 0.05] *= 0.8  # block joints
        colour[yy > height - 0.15] *= 1.15  # capping
        cv.paint(r0, c0, region, WALL, colour)
    elif kind == "fence":
        # See-through mesh: bars in the fence colour, the background dimmed between them (still fence).
        fence_c = _jitter(rng, (150, 125, 105) if rng.random() < 0.5 else (110, 120, 110), 0.15) * light
        bars = (np.mod(zz - z0, 2.5) < 0.12) | (np.mod(zz, 0.25) < 0.05) | (yy > height - 0.1) | (np.abs(yy - height / 2) < 0.05)
        behind = cv.image[r0 : r0 + region.shape[0], c0 : c0 + region.shape[1]]
        colour = np.where(bars[..., None], fence_c, 0.55 * behind + 0.45 * fence_c)
        cv.paint(r0, c0, region, FENCE, colour)
    else:
        colour = np.empty(region.shape + (3,), np.float32)
        colour[:] = _jitter(rng, (60, 95, 45), 0.15) * light
        cv.paint(r0, c0, region, VEGETATION, colour)


# ----------------------------------------------------------------------------- objects
def _shadow(cv: _Canvas, x0: float, x1: float, z0: float, z1: float, strength: float) -> None:
    """Darken the ground under an object (contact shadow), without touching the labels."""
    cols = cv.box_bounds(cv.col(x0 - 0.2, z0), cv.col(x1 + 0.2, z0), 0, 0, cv.w)
    rows = cv.box_bounds(cv.row(0.0, z1), cv.row(0.0, z0) + 1, 0, 0, cv.h)
    if cols is None or rows is None:
        return
    (c0, c1), (r0, r1) = cols, rows
    ground = np.isin(cv.mask[r0:r1, c0:c1], (ROAD, SIDEWALK, TERRAIN))
    cv.tint(r0, c0, ground, strength)


def _box(cv: _Canvas, x0, x1, y0, y1, z0, z1, cls, front_c, side_c, windows=None) -> None:
    """An axis-aligned box: its camera-facing side plane, then its front face (nearer, painted last)."""
    side_x = x1 if x1 < 0 else (x0 if x0 > 0 else None)
    if side_x is not None and z1 > z0:
        got = cv.side(side_x, z0, z1, y0, y1)
        if got is not None:
            r0, c0, region, zz, yy = got
            colour = np.empty(region.shape + (3,), np.float32)
            colour[:] = side_c
            if windows is not None:
                w_lo, w_hi, w_c = windows
                colour[(yy > w_lo) & (yy < w_hi) & (np.mod(zz - z0, 1.6) > 0.25) & (zz > z0 + 0.6) & (zz < z1 - 0.4)] = w_c
            cv.paint(r0, c0, region, cls, colour)
    got = cv.frontal(x0, x1, y0, y1, z0)
    if got is not None:
        r0, c0, xw, yw = got
        region = np.ones((yw.shape[0], xw.shape[1]), bool)
        colour = np.empty(region.shape + (3,), np.float32)
        colour[:] = front_c
        # Soft vertical shading: lighter towards the top of the face.
        colour *= (0.85 + 0.15 * np.clip((yw - y0) / max(y1 - y0, 1e-3), 0, 1))[..., None]
        cv.paint(r0, c0, region, cls, colour)


_CAR_COLOURS = [(30, 30, 35), (200, 200, 205), (130, 130, 135), (150, 30, 30), (30, 50, 120), (230, 230, 230),
                (60, 70, 60), (170, 150, 110), (40, 90, 140), (120, 20, 20)]


def _vehicle(cv: _Canvas, rng: np.random.Generator, kind: int, xc: float, z: float, oncoming: bool) -> None:
    if kind == CAR:
        width, length, body_h, total_h = rng.uniform(1.65, 1.9), rng.uniform(3.8, 4.8), rng.uniform(0.85, 1.0), rng.uniform(1.4, 1.65)
        paint = _jitter(rng, _CAR_COLOURS[int(rng.integers(0, len(_CAR_COLOURS)))], 0.1)
    elif kind == TRUCK:
        width, length, body_h, total_h = rng.uniform(2.3, 2.55), rng.uniform(7, 11), rng.uniform(1.0, 1.3), rng.uniform(3.0, 3.8)
        paint = _jitter(rng, [(210, 210, 205), (180, 60, 40), (60, 90, 150), (200, 170, 60)][int(rng.integers(0, 4))], 0.1)
    else:
        width, length, body_h, total_h = 2.55, rng.uniform(10, 13), rng.uniform(0.9, 1.1), rng.uniform(3.0, 3.4)
        paint = _jitter(rng, [(220, 210, 60), (200, 40, 40), (230, 230, 230), (60, 120, 170)][int(rng.integers(0, 4))], 0.1)
    x0, x1 = xc - width / 2, xc + width / 2
    dark = np.float32(0.6)
    glass = _jitter(rng, (45, 55, 65), 0.2)
    _shadow(cv, x0, x1, z, z + length, 0.45)
    if kind == CAR:
        # Body, then the narrower cabin set back from the rear, then wheels, lights and window.
        _box(cv, x0 + 0.12, x1 - 0.12, body_h, total_h, z + 0.8, z + length - 1.0, CAR, paint, paint * dark,
             windows=(body_h + 0.05, total_h - 0.08, glass))
        _box(cv, x0, x1, 0.25, body_h, z, z + length, CAR, paint, paint * dark)
        got = cv.frontal(x0 + 0.2, x1 - 0.2, body_h + 0.05, total_h - 0.1, z + 0.8)
        if got is not None:
            r0, c0, xw, yw = got
            region = (np.abs(xw - xc) < (width / 2 - 0.2) - (yw - body_h) * 0.25) & np.ones_like(yw, bool)
            cv.paint(r0, c0, region, CAR, glass)
        for lx in (x0 + 0.1, x1 - 0.35):
            got = cv.frontal(lx, lx + 0.25, body_h - 0.25, body_h - 0.1, z)
            if got is not None:
                r0, c0, xw, yw = got
                lamp = (235, 235, 210) if oncoming else (200, 20, 20)
                cv.paint(r0, c0, np.ones((yw.shape[0], xw.shape[1]), bool), CAR, lamp)
    else:
        cab_len = 2.2
        body_z0, cab_z0 = (z + cab_len, z) if oncoming else (z, z + length - cab_len)
        cab_h = total_h * (0.85 if kind == TRUCK else 1.0)
        if kind == TRUCK:
            cargo_c = _jitter(rng, (200, 200, 195), 0.15) if rng.random() < 0.6 else paint
            parts = [(cab_z0, cab_z0 + cab_len, 0.4, cab_h, paint, None),
                     (body_z0, body_z0 + length - cab_len, 0.5, total_h, cargo_c, None)]
        else:
            parts = [(z, z + length, 0.35, total_h, paint, (1.4, total_h - 0.6, glass))]
        for pz0, pz1, py0, py1, pc, win in sorted(parts, key=lambda p: -p[0]):
            _box(cv, x0, x1, py0, py1, pz0, pz1, kind, pc, pc * dark, windows=win)
        # Windscreen / rear window on the face towards the camera.
        got = cv.frontal(x0 + 0.2, x1 - 0.2, total_h * 0.6, total_h - 0.25, z)
        if got is not None and (kind == BUS or oncoming):
            r0, c0, xw, yw = got
            cv.paint(r0, c0, np.ones((yw.shape[0], xw.shape[1]), bool), kind, glass)
    # Wheels: dark blocks under the nearest face (they belong to the vehicle).
    for wx in (x0 + 0.05, x1 - 0.35):
        got = cv.frontal(wx, wx + 0.3, 0.0, 0.45, z + 0.3)
        if got is not None:
            r0, c0, xw, yw = got
            cv.paint(r0, c0, np.ones((yw.shape[0], xw.shape[1]), bool), kind, (25, 25, 28))


def _person_shape(cv: _Canvas, rng: np.random.Generator, xc: float, z: float, base_y: float, cls: int,
                  seated: bool, light: float) -> None:
    """A pedestrian (or a rider when ``seated``): legs, torso, arms, head; a few pixels wide when far."""
    height = rng.uniform(1.55, 1.9)
    s = height / 1.75
    skin = _jitter(rng, [(230, 190, 160), (190, 140, 110), (120, 85, 60)][int(rng.integers(0, 3))], 0.1) * light
    shirt = _jitter(rng, rng.uniform(30, 230, 3), 0.2) * light
    trousers = _jitter(rng, [(40, 40, 60), (60, 60, 65), (120, 110, 90), (30, 30, 30)][int(rng.integers(0, 4))], 0.2) * light
    hip = base_y + (0.45 if seated else 0.85) * s
    shoulder = hip + 0.55 * s
    # Legs: apart when walking, bent forwards when riding.
    stride = rng.uniform(0.0, 0.18) * s
    for dx in (-0.1 * s - stride / 2, 0.1 * s + stride / 2):
        foot = (xc + dx * (1.6 if seated else 1.0), base_y + (0.3 if seated else 0.0))
        got = cv.segment((xc + dx / 2, hip), foot, z, 0.13 * s)
        if got is not None:
            r0, c0, region = got
            cv.paint(r0, c0, region, cls, trousers)
    got = cv.frontal(xc - 0.2 * s, xc + 0.2 * s, hip, shoulder, z)
    if got is not None:
        r0, c0, xw, yw = got
        colour = np.broadcast_to(shirt * (0.8 + 0.2 * (xw - xc + 0.2 * s) / (0.4 * s))[..., None],
                                 (yw.shape[0], xw.shape[1], 3))
        cv.paint(r0, c0, np.ones(colour.shape[:2], bool), cls, colour)
    for dx in (-0.24 * s, 0.24 * s):  # arms
        reach = (xc + dx * (1.6 if seated else 1.1), shoulder - (0.2 if seated else 0.55) * s)
        got = cv.segment((xc + dx, shoulder - 0.05), reach, z, 0.08 * s)
        if got is not None:
            r0, c0, region = got
            cv.paint(r0, c0, region, cls, shirt * 0.9)
    got = cv.ellipse(xc, shoulder + 0.14 * s, z, 0.1 * s, 0.13 * s)
    if got is not None:
        r0, c0, region, u, v = got
        hair = _jitter(rng, (50, 35, 25), 0.3) * light
        colour = np.where((v < -0.1 + 0.2 * np.abs(u))[..., None], hair, skin)
        cv.paint(r0, c0, region, cls, np.broadcast_to(colour, region.shape + (3,)))


def _two_wheeler(cv: _Canvas, rng: np.random.Generator, xc: float, z: float, cls: int, light: float) -> None:
    """A bicycle or motorcycle in side view: two wheels, a frame, and for motorcycles a body and engine."""
    motor = cls == MOTORCYCLE
    radius = rng.uniform(0.3, 0.34)
    base = rng.uniform(0.5, 0.65) * (1.3 if motor else 1.0)
    direction = 1 if rng.random() < 0.5 else -1
    tyre = np.float32(30) * light
    frame_c = _jitter(rng, rng.uniform(40, 220, 3), 0.2) * light
    for wx in (xc - base, xc + base):
        got = cv.ellipse(wx, radius, z, radius, radius)
        if got is not None:
            r0, c0, region, u, v = got
            rr = u * u + v * v
            ring = region & (rr >= (0.55 if motor else 0.75) ** 2)
            if not ring.any():
                ring = region
            cv.paint(r0, c0, ring, cls, np.broadcast_to(tyre, (3,)))
            hub = region & (rr < 0.06)
            if hub.any():
                cv.paint(r0, c0, hub, cls, frame_c * 0.8)
    rear, front = (xc - base * direction, radius), (xc + base * direction, radius)
    seat = (xc - 0.15 * direction, radius + 0.55)
    bar = (xc + (base - 0.1) * direction, radius + 0.65)
    for p, q in ((rear, seat), (seat, bar), (bar, front), (rear, (xc, radius)), ((xc, radius), seat),
                 ((xc, radius), bar)):
        got = cv.segment(p, q, z, 0.05)
        if got is not None:
            r0, c0, region = got
            cv.paint(r0, c0, region, cls, frame_c)
    if motor:
        got = cv.ellipse(xc, radius + 0.35, z, base * 0.75, 0.28)
        if got is not None:
            r0, c0, region, u, v = got
            colour = np.broadcast_to(frame_c * (0.75 + 0.25 * np.clip(-v, 0, 1))[..., None], region.shape + (3,))
            cv.paint(r0, c0, region, cls, colour)


def _pole(cv: _Canvas, rng: np.random.Generator, x: float, z: float, kind: str, towards_road: int,
          light: float) -> None:
    """A pole (street light, or carrying traffic lights or a sign); the attachments get their own classes."""
    height = {"plain": rng.uniform(6, 9), "light": rng.uniform(3.0, 5.0), "sign": rng.uniform(2.3, 3.4)}[kind]
    radius = rng.uniform(0.06, 0.1)
    pole_c = _jitter(rng, (130, 130, 125) if rng.random() < 0.7 else (70, 80, 70), 0.15) * light
    got = cv.frontal(x - radius, x + radius, 0, height, z)
    if got is not None:
        r0, c0, xw, yw = got
        shade = 0.7 + 0.45 * np.clip((xw - x + radius) / (2 * radius), 0, 1)  # cylinder shading
        colour = np.broadcast_to((pole_c * shade[..., None]), (yw.shape[0], xw.shape[1], 3))
        cv.paint(r0, c0, np.ones(colour.shape[:2], bool), POLE, colour)
    if kind == "plain":  # street lamp arm over the road
        tip = (x + towards_road * rng.uniform(1.0, 2.5), height + 0.3)
        got = cv.segment((x, height - 0.2), tip, z, 0.08)
        if got is not None:
            cv.paint(*got, POLE, pole_c)
        got = cv.frontal(tip[0] - 0.3, tip[0] + 0.3, tip[1] - 0.2, tip[1], z)
        if got is not None:
            r0, c0, xw, yw = got
            cv.paint(r0, c0, np.ones((yw.shape[0], xw.shape[1]), bool), POLE, pole_c * 1.2)
    elif kind == "light":
        housing = _jitter(rng, (40, 40, 40) if rng.random() < 0.6 else (160, 140, 40), 0.15) * light
        positions = [x]
        if rng.random() < 0.5:  # a second head hanging from an arm over the road
            arm_x = x + towards_road * rng.uniform(2.5, 5.0)
            got = cv.segment((x, height + 0.8), (arm_x, height + 0.8), z, 0.1)
            if got is not None:
                cv.paint(*got, POLE, pole_c)
            got = cv.frontal(x - radius, x + radius, height, height + 0.9, z)
            if got is not None:
                r0, c0, xw, yw = got
                cv.paint(r0, c0, np.ones((yw.shape[0], xw.shape[1]), bool), POLE, pole_c)
            positions.append(arm_x)
        lit = int(rng.integers(0, 3))
        for px in positions:
            got = cv.frontal(px - 0.17, px + 0.17, height - 0.9, height, z)
            if got is None:
                continue
            r0, c0, xw, yw = got
            colour = np.empty((yw.shape[0], xw.shape[1], 3), np.float32)
            colour[:] = housing
            for k, lamp in enumerate(((255, 40, 30), (255, 190, 30), (40, 230, 110))):
                cy = height - 0.15 - 0.3 * k
                on = ((xw - px) ** 2 + (yw - cy) ** 2) < 0.1**2
                colour[np.broadcast_to(on, colour.shape[:2])] = lamp if k == lit else np.float32(lamp) * 0.25
            cv.paint(r0, c0, np.ones(colour.shape[:2], bool), LIGHT, colour)
    else:
        shape = rng.choice(["round", "triangle", "square", "rect"])
        size = rng.uniform(0.55, 0.8)
        cy = height + size / 2 - 0.1
        got = cv.frontal(x - size / 2, x + size / 2, cy - size / 2, cy + size / 2, z)
        if got is None:
            return
        r0, c0, xw, yw = got
        u, v = (xw - x) / (size / 2), (yw - cy) / (size / 2)  # -1..1, v up
        if shape == "round":
            inside, rim = u * u + v * v <= 1.0, u * u + v * v > 0.6
            face, rim_c = (240, 240, 240) if rng.random() < 0.5 else (30, 80, 180), (200, 25, 30)
        elif shape == "triangle":
            inside = (v >= -0.9) & (np.abs(u) <= (1.0 - v) * 0.52)
            rim = (v < -0.65) | (np.abs(u) > (1.0 - v) * 0.52 - 0.25)
            face, rim_c = (240, 230, 200), (200, 25, 30)
        elif shape == "square":
            inside, rim = np.abs(u) + np.abs(v) <= 1.0, np.abs(u) + np.abs(v) > 0.75
            face, rim_c = (245, 200, 30), (240, 240, 240)
        else:
            inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 0.6)
            rim = (np.abs(u) > 0.88) | (np.abs(v) > 0.5)
            face, rim_c = (30, 90, 170), (240, 240, 240)
        inside = np.broadcast_to(inside, (yw.shape[0], xw.shape[1]))
        if not inside.any():
            inside = np.ones_like(inside)
        colour = np.empty(inside.shape + (3,), np.float32)
        colour[:] = np.float32(face) * light
        colour[np.broadcast_to(rim, inside.shape)] = np.float32(rim_c) * light
        cv.paint(r0, c0, inside, SIGN, colour)


def _tree(cv: _Canvas, rng: np.random.Generator, x: float, z: float, blotch: np.ndarray, light: float) -> None:
    """Trunk and an irregular crown; both are vegetation, as in Cityscapes."""
    height = rng.uniform(4, 10)
    trunk_r = rng.uniform(0.12, 0.25)
    crown_r = rng.uniform(1.5, 3.5)
    trunk_c = _jitter(rng, (85, 70, 55), 0.15) * light
    got = cv.frontal(x - trunk_r, x + trunk_r, 0, height - crown_r, z)
    if got is not None:
        r0, c0, xw, yw = got
        cv.paint(r0, c0, np.ones((yw.shape[0], xw.shape[1]), bool), VEGETATION, trunk_c)
    got = cv.ellipse(x, height - crown_r * 0.8, z, crown_r, crown_r * rng.uniform(0.8, 1.2))
    if got is None:
        return
    r0, c0, region, u, v = got
    h, w = region.shape
    # Ragged outline: the crown boundary is pushed in and out by the scene's smooth noise.
    rough = blotch[r0 : r0 + h, c0 : c0 + w]
    region = (u * u + v * v) <= 0.8 + 0.25 * rough
    green = _jitter(rng, (70, 110, 45), 0.2) * light
    colour = green * (1.1 - 0.35 * np.clip(v, 0, 1))[..., None]  # shaded underside
    cv.paint(r0, c0, region, VEGETATION, np.broadcast_to(colour, region.shape + (3,)))


def _spread(rng: np.random.Generator, count: int, z_min: float, z_max: float) -> np.ndarray:
    """Distances spread over a range with more near than far (uniform in 1/Z, like a ground plane)."""
    return 1.0 / rng.uniform(1.0 / z_max, 1.0 / z_min, count)


def _place_objects(cv: _Canvas, rng: np.random.Generator, lay: _Layout, blotch: np.ndarray, light_l: float,
                   light_r: float) -> None:
    """Collect every ground object with its distance, then paint them far to near (occlusion)."""
    objects: list[tuple[float, Callable[[], None]]] = []

    def add(z, fn, *args):
        objects.append((float(z), lambda: fn(cv, rng, *args)))

    two_way = rng.random() < 0.6
    for side in (-1, 1):
        curb = (lay.road_left - lay.verge_left) if side < 0 else (lay.road_right + lay.verge_right)
        walk = lay.walk_left if side < 0 else lay.walk_right
        urban = lay.urban_left if side < 0 else lay.urban_right
        light = light_l if side < 0 else light_r
        # Poles near the curb: street lamps, traffic lights, signs (the small classes GLV targets).
        z = rng.uniform(6, 20)
        while z < 120:
            kind = rng.choice(["plain", "light", "sign"], p=[0.3, 0.3, 0.4])
            add(z, _pole, curb + side * 0.5 * rng.uniform(0.6, 1.4), z, kind, -side, light)
            z += rng.uniform(8, 30)
        # Trees along the sidewalk's outer edge (or anywhere beyond it in green areas).
        if rng.random() < (0.5 if urban else 0.95):
            z = rng.uniform(9, 18)  # no tree right beside the camera hiding half the view
            while z < 150:
                tx = walk - side * rng.uniform(0.5, 1.5) if urban else walk + side * rng.uniform(0.5, 8)
                add(z, _tree, tx, z, blotch, light)
                z += rng.uniform(6, 18)
        for zp in _spread(rng, int(rng.poisson(2.5)), 10, 70):  # pedestrians on the sidewalk
            add(zp, _person_shape, rng.uniform(min(curb, walk), max(curb, walk)), zp, 0.0, PERSON, False, light)
        for zb in _spread(rng, int(rng.poisson(0.7)), 10, 50):  # parked bicycles and motorcycles
            parked = MOTORCYCLE if rng.random() < 0.3 else BICYCLE
            add(zb, _two_wheeler, curb + side * rng.uniform(0.8, 1.8), zb, parked, light)
    # Vehicles in the lanes (oncoming on the left of a two-way road) and parked at the edges.
    lane_w = (lay.road_right - lay.road_left) / (len(lay.lanes) + 1)
    for lane in range(len(lay.lanes) + 1):
        xc = lay.road_left + (lane + 0.5) * lane_w
        oncoming = two_way and xc < 0
        z = rng.uniform(7, 25)
        if abs(xc) < lane_w / 2:
            z += rng.uniform(8, 20)  # keep the camera's own lane open ahead
        while z < 120:
            if rng.random() < 0.55:
                kind = rng.choice([CAR, CAR, CAR, CAR, CAR, TRUCK, BUS])
                add(z, _vehicle, int(kind), xc + rng.uniform(-0.3, 0.3), z, oncoming)
                z += rng.uniform(10, 30)
            else:
                z += rng.uniform(10, 40)
    # Riders on bicycles / motorcycles near the right (or left) road edge, and in crossings.
    for zr in _spread(rng, int(rng.poisson(1.3)), 12, 70):
        side = 1 if rng.random() < 0.6 else -1
        xr = (lay.road_right - 0.9) if side > 0 else (lay.road_left + 0.9)
        vehicle = MOTORCYCLE if rng.random() < 0.4 else BICYCLE
        add(zr, _rider, xr, zr, vehicle, light_r if side > 0 else light_l)
    # Painter's algorithm: far objects first, so near ones occlude them.
    for _, draw in sorted(objects, key=lambda o: -o[0]):
        draw()


def _rider(cv: _Canvas, rng: np.random.Generator, x: float, z: float, vehicle: int, light: float) -> None:
    """A rider (class rider) seated on a bicycle or motorcycle (their own classes)."""
    _two_wheeler(cv, rng, x, z, vehicle, light)
    _person_shape(cv, rng, x, z, 0.45 if vehicle == BICYCLE else 0.5, RIDER, True, light)


# ----------------------------------------------------------------------------- render
def render_scene(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One driving scene: (image uint8 (H, W, 3) RGB, mask uint8 (H, W) SYNTHETIC train ids).

    Deterministic in ``seed``; the layout is in metres, so one seed gives the same scene at every size.
    """
    if height < 8 or width < 8:
        raise UserError(f"synthetic scenes need at least 8x8 pixels, got {width}x{height}")
    rng = np.random.default_rng(seed)
    cv = _Canvas(rng, height, width)
    lay = _make_layout(rng)
    blotch = _upsampled_noise(rng, height, width, 12)
    sun_left = rng.random() < 0.5
    light_l = rng.uniform(0.95, 1.1) if sun_left else rng.uniform(0.6, 0.8)
    light_r = rng.uniform(0.6, 0.8) if sun_left else rng.uniform(0.95, 1.1)

    _paint_sky(cv, rng, blotch)
    _paint_skyline(cv, rng)
    xg, zg = _paint_ground(cv, rng, lay)
    # Building shadows across the ground on the shaded side (colour only: labels are unaffected).
    r0 = int(np.ceil(cv.yh))
    # The buildings on the shaded side cast their shadows over the near part of the ground.
    shade = (xg > lay.road_right - rng.uniform(0, 5)) if sun_left else (xg < lay.road_left + rng.uniform(0, 5))
    shade &= blotch[r0:] > rng.uniform(-0.8, 0.3)  # gaps between buildings let the sun through
    cv.image[r0:][shade] *= rng.uniform(0.55, 0.75)
    _paint_facades(cv, rng, lay, sun_left)
    _place_objects(cv, rng, lay, blotch, light_l, light_r)

    # Texture: fine grain plus smooth blotches, with a per-class strength (vegetation strongest).
    grain = rng.standard_normal((height, width), dtype=np.float32)
    blotch2 = _upsampled_noise(rng, height, width, 40)
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


# ----------------------------------------------------------------------------- datasets
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


class SyntheticFolder(SegmentationDataset):
    """Scenes written by ``generate_synthetic_dataset``: ROOT/images/SPLIT/ID.png, ROOT/masks/SPLIT/ID.png."""

    def __init__(self, root: str | os.PathLike, split: str):
        self.root, self.split = Path(root), split
        image_dir = self.root / "images" / split
        if not image_dir.is_dir():
            raise UserError(
                f"{image_dir}: synthetic split not found; generate it with "
                f"`carbseg synthesize --out {self.root} --split {split}`"
            )
        classes_file = self.root / "classes.json"
        self.classes = _read_classes(classes_file) if classes_file.is_file() else SYNTHETIC
        self.ids = sorted(p.stem for p in image_dir.glob("*.png") if not p.name.startswith("."))
        if not self.ids:
            raise UserError(
                f"{image_dir}: no images; generate them with `carbseg synthesize --out {self.root} --split {split}`"
            )
        check_unique_ids(self.ids, image_dir)

    def image_path(self, index: int) -> Path:
        return self.root / "images" / self.split / f"{self.ids[index]}.png"

    def mask_path(self, index: int) -> Path:
        return self.root / "masks" / self.split / f"{self.ids[index]}.png"

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.image_path(index))

    def _load_raw_mask(self, index: int) -> np.ndarray:
        return read_label_png(self.mask_path(index))


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
