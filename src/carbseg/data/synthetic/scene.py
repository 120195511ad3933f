"""What a synthetic scene contains, laid out in metres: the ground strips (road with lanes,
verges, sidewalks, terrain), the background (sky, skyline, facades, walls, fences) and the objects
placed on the ground (poles with traffic lights and signs, vehicles, people, riders, trees).

Every painter draws on a ``Canvas`` through its camera, so far objects come out small and near
the horizon, and nearer ones are painted over them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from carbseg.data.synthetic.camera import (
    BICYCLE,
    BUILDING,
    BUS,
    CAMERA_HEIGHT,
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
    jitter,
)


# ----------------------------------------------------------------------------- scene layout
@dataclass
class Layout:
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


def make_layout(rng: np.random.Generator) -> Layout:
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
    return Layout(road_left, road_right, lanes, walk_left, walk_right, verge_left, verge_right,
                   urban_left=rng.random() < 0.75, urban_right=rng.random() < 0.75)


# ----------------------------------------------------------------------------- background
def paint_sky(cv: Canvas, rng: np.random.Generator, blotch: np.ndarray) -> None:
    overcast = rng.random() < 0.3
    top = jitter(rng, (150, 155, 160) if overcast else (70, 120, 190), 0.12)
    bottom = jitter(rng, (200, 202, 205) if overcast else (175, 200, 225), 0.08)
    rows = min(cv.h, int(cv.yh) + 2)  # the ground covers everything below the horizon
    t = np.clip(cv.ys[:rows] / max(cv.yh, 1.0), 0, 1)[:, None, None]
    sky = top * (1 - t) + bottom * t
    # Clouds: where the smooth noise is high, blend towards white-grey.
    cloud = np.clip((blotch[:rows] - rng.uniform(0.3, 1.2)) * 0.6, 0, 0.8)[..., None]
    cv.image[:rows] = sky + (jitter(rng, (235, 235, 238), 0.05) - sky) * cloud
    cv.mask[:] = SKY


def paint_skyline(cv: Canvas, rng: np.random.Generator) -> None:
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
            colour = jitter(rng, (70, 90, 60) if is_tree else (120, 125, 135), 0.15)
            region = np.ones((r1 - r0, min(block_w, cv.w - x)), bool)
            if is_tree:  # rounded crowns: drop the top corners
                u = np.linspace(-1, 1, region.shape[1])[None, :]
                v = np.linspace(0, 1, region.shape[0])[:, None]
                region &= v > 0.6 * u * u
            cv.paint(r0, x, region, cls, colour)
        x += block_w


def paint_ground(cv: Canvas, rng: np.random.Generator, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
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
        jitter(rng, (85, 85, 90), 0.15), jitter(rng, (150, 140, 135), 0.15), jitter(rng, (120, 140, 70), 0.2),
        jitter(rng, (215, 215, 205), 0.05),
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


def paint_facades(cv: Canvas, rng: np.random.Generator, lay: Layout, sun_left: bool) -> None:
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


def _building(cv: Canvas, rng: np.random.Generator, x: float, z0: float, z1: float, light: float) -> None:
    height = rng.uniform(6, 28)
    got = cv.side(x, z0, z1, 0.0, height)
    if got is None:
        return
    r0, c0, region, zz, yy = got
    base = jitter(rng, [(150, 140, 125), (120, 120, 125), (170, 160, 145), (140, 110, 95), (95, 95, 100)]
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
    glass = jitter(rng, (60, 75, 95) if rng.random() < 0.6 else (140, 160, 180), 0.15) * light
    colour[win] = glass * (0.85 + 0.3 * fy[win, None])
    # Shop front: a dark band at street level in city streets.
    if rng.random() < 0.5:
        colour[(yy < 2.6) & (yy > 0.3) & (np.mod(zz - z0, bay_w * 2) > 0.6)] *= 0.55
    cv.paint(r0, c0, region, BUILDING, colour)


def _low_boundary(cv: Canvas, rng: np.random.Generator, x: float, z0: float, z1: float, light: float) -> None:
    """A wall, a fence or a hedge along the sidewalk's outer edge."""
    kind = rng.choice(["wall", "fence", "hedge"], p=[0.45, 0.4, 0.15])
    height = rng.uniform(1.0, 2.5)
    got = cv.side(x, z0, z1, 0.0, height)
    if got is None:
        return
    r0, c0, region, zz, yy = got
    if kind == "wall":
        colour = np.empty(region.shape + (3,), np.float32)
        colour[:] = jitter(rng, (135, 130, 125), 0.15) * light
        colour[np.mod(yy, 0.6) < 0.05] *= 0.8  # block joints
        colour[yy > height - 0.15] *= 1.15  # capping
        cv.paint(r0, c0, region, WALL, colour)
    elif kind == "fence":
        # See-through mesh: bars in the fence colour, the background dimmed between them (still fence).
        fence_c = jitter(rng, (150, 125, 105) if rng.random() < 0.5 else (110, 120, 110), 0.15) * light
        bars = (np.mod(zz - z0, 2.5) < 0.12) | (np.mod(zz, 0.25) < 0.05) | (yy > height - 0.1) | (np.abs(yy - height / 2) < 0.05)
        behind = cv.image[r0 : r0 + region.shape[0], c0 : c0 + region.shape[1]]
        colour = np.where(bars[..., None], fence_c, 0.55 * behind + 0.45 * fence_c)
        cv.paint(r0, c0, region, FENCE, colour)
    else:
        colour = np.empty(region.shape + (3,), np.float32)
        colour[:] = jitter(rng, (60, 95, 45), 0.15) * light
        cv.paint(r0, c0, region, VEGETATION, colour)


# ----------------------------------------------------------------------------- objects
def _shadow(cv: Canvas, x0: float, x1: float, z0: float, z1: float, strength: float) -> None:
    """Darken the ground under an object (contact shadow), without touching the labels."""
    cols = cv.box_bounds(cv.col(x0 - 0.2, z0), cv.col(x1 + 0.2, z0), cv.w)
    rows = cv.box_bounds(cv.row(0.0, z1), cv.row(0.0, z0) + 1, cv.h)
    if cols is None or rows is None:
        return
    (c0, c1), (r0, r1) = cols, rows
    ground = np.isin(cv.mask[r0:r1, c0:c1], (ROAD, SIDEWALK, TERRAIN))
    cv.tint(r0, c0, ground, strength)


def _box(cv: Canvas, x0, x1, y0, y1, z0, z1, cls, front_c, side_c, windows=None) -> None:
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


def _vehicle(cv: Canvas, rng: np.random.Generator, kind: int, xc: float, z: float, oncoming: bool) -> None:
    if kind == CAR:
        width, length, body_h, total_h = rng.uniform(1.65, 1.9), rng.uniform(3.8, 4.8), rng.uniform(0.85, 1.0), rng.uniform(1.4, 1.65)
        paint = jitter(rng, _CAR_COLOURS[int(rng.integers(0, len(_CAR_COLOURS)))], 0.1)
    elif kind == TRUCK:
        width, length, body_h, total_h = rng.uniform(2.3, 2.55), rng.uniform(7, 11), rng.uniform(1.0, 1.3), rng.uniform(3.0, 3.8)
        paint = jitter(rng, [(210, 210, 205), (180, 60, 40), (60, 90, 150), (200, 170, 60)][int(rng.integers(0, 4))], 0.1)
    else:
        width, length, body_h, total_h = 2.55, rng.uniform(10, 13), rng.uniform(0.9, 1.1), rng.uniform(3.0, 3.4)
        paint = jitter(rng, [(220, 210, 60), (200, 40, 40), (230, 230, 230), (60, 120, 170)][int(rng.integers(0, 4))], 0.1)
    x0, x1 = xc - width / 2, xc + width / 2
    dark = np.float32(0.6)
    glass = jitter(rng, (45, 55, 65), 0.2)
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
            cargo_c = jitter(rng, (200, 200, 195), 0.15) if rng.random() < 0.6 else paint
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


def _person_shape(cv: Canvas, rng: np.random.Generator, xc: float, z: float, base_y: float, cls: int,
                  seated: bool, light: float) -> None:
    """A pedestrian (or a rider when ``seated``): legs, torso, arms, head; a few pixels wide when far."""
    height = rng.uniform(1.55, 1.9)
    s = height / 1.75
    skin = jitter(rng, [(230, 190, 160), (190, 140, 110), (120, 85, 60)][int(rng.integers(0, 3))], 0.1) * light
    shirt = jitter(rng, rng.uniform(30, 230, 3), 0.2) * light
    trousers = jitter(rng, [(40, 40, 60), (60, 60, 65), (120, 110, 90), (30, 30, 30)][int(rng.integers(0, 4))], 0.2) * light
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
        hair = jitter(rng, (50, 35, 25), 0.3) * light
        colour = np.where((v < -0.1 + 0.2 * np.abs(u))[..., None], hair, skin)
        cv.paint(r0, c0, region, cls, np.broadcast_to(colour, region.shape + (3,)))


def _two_wheeler(cv: Canvas, rng: np.random.Generator, xc: float, z: float, cls: int, light: float) -> None:
    """A bicycle or motorcycle in side view: two wheels, a frame, and for motorcycles a body and engine."""
    motor = cls == MOTORCYCLE
    radius = rng.uniform(0.3, 0.34)
    base = rng.uniform(0.5, 0.65) * (1.3 if motor else 1.0)
    direction = 1 if rng.random() < 0.5 else -1
    tyre = np.float32(30) * light
    frame_c = jitter(rng, rng.uniform(40, 220, 3), 0.2) * light
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


def _pole(cv: Canvas, rng: np.random.Generator, x: float, z: float, kind: str, towards_road: int,
          light: float) -> None:
    """A pole (street light, or carrying traffic lights or a sign); the attachments get their own classes."""
    height = {"plain": rng.uniform(6, 9), "light": rng.uniform(3.0, 5.0), "sign": rng.uniform(2.3, 3.4)}[kind]
    radius = rng.uniform(0.06, 0.1)
    pole_c = jitter(rng, (130, 130, 125) if rng.random() < 0.7 else (70, 80, 70), 0.15) * light
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
        housing = jitter(rng, (40, 40, 40) if rng.random() < 0.6 else (160, 140, 40), 0.15) * light
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


def _tree(cv: Canvas, rng: np.random.Generator, x: float, z: float, blotch: np.ndarray, light: float) -> None:
    """Trunk and an irregular crown; both are vegetation, as in Cityscapes."""
    height = rng.uniform(4, 10)
    trunk_r = rng.uniform(0.12, 0.25)
    crown_r = rng.uniform(1.5, 3.5)
    trunk_c = jitter(rng, (85, 70, 55), 0.15) * light
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
    green = jitter(rng, (70, 110, 45), 0.2) * light
    colour = green * (1.1 - 0.35 * np.clip(v, 0, 1))[..., None]  # shaded underside
    cv.paint(r0, c0, region, VEGETATION, np.broadcast_to(colour, region.shape + (3,)))


def _spread(rng: np.random.Generator, count: int, z_min: float, z_max: float) -> np.ndarray:
    """Distances spread over a range with more near than far (uniform in 1/Z, like a ground plane)."""
    return 1.0 / rng.uniform(1.0 / z_max, 1.0 / z_min, count)


def place_objects(cv: Canvas, rng: np.random.Generator, lay: Layout, blotch: np.ndarray, light_l: float,
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


def _rider(cv: Canvas, rng: np.random.Generator, x: float, z: float, vehicle: int, light: float) -> None:
    """A rider (class rider) seated on a bicycle or motorcycle (their own classes)."""
    _two_wheeler(cv, rng, x, z, vehicle, light)
    _person_shape(cv, rng, x, z, 0.45 if vehicle == BICYCLE else 0.5, RIDER, True, light)


