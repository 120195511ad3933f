"""The canvas and the camera of a synthetic scene: a pinhole camera 1.5 m above a flat ground
plane, and the image + label map that the scene is painted on back to front.

World coordinates are metres (X right, Y up, Z forward); the focal length and the horizon scale
with the image size, so one scene looks the same at every resolution. The primitives (frontal
rectangles, side faces, ellipses, thick segments) work on their pixel bounding box only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from carbseg.data.classes import SYNTHETIC

C = {name: i for i, name in enumerate(SYNTHETIC.names)}
ROAD, SIDEWALK, BUILDING, WALL, FENCE = C["road"], C["sidewalk"], C["building"], C["wall"], C["fence"]
POLE, LIGHT, SIGN = C["pole"], C["traffic light"], C["traffic sign"]
VEGETATION, TERRAIN, SKY = C["vegetation"], C["terrain"], C["sky"]
PERSON, RIDER, CAR, TRUCK, BUS = C["person"], C["rider"], C["car"], C["truck"], C["bus"]
MOTORCYCLE, BICYCLE = C["motorcycle"], C["bicycle"]


CAMERA_HEIGHT = 1.5  # metres above the ground plane


class Canvas:
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

    def box_bounds(self, a0: float, a1: float, size: int) -> tuple[int, int] | None:
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
        cols = self.box_bounds(self.col(x0, z), self.col(x1, z), self.w)
        rows = self.box_bounds(self.row(y1, z), self.row(y0, z), self.h)
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
        cols = self.box_bounds(self.col(x, z0), self.col(x, z1), self.w)
        if cols is None:
            return None
        c0, c1 = cols
        dx = self.xs[c0:c1] - self.cx
        with np.errstate(divide="ignore", invalid="ignore"):
            zcol = np.where(dx * x > 0, self.f * x / dx, np.inf)
        zmin = max(z0, float(np.min(zcol)))
        rows = self.box_bounds(self.row(y1, zmin), self.row(y0, zmin), self.h)
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
        cols = self.box_bounds(px - prx, px + prx, self.w)
        rows = self.box_bounds(py - pry, py + pry, self.h)
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
        cols = self.box_bounds(min(ax, bx) - half, max(ax, bx) + half, self.w)
        rows = self.box_bounds(min(ay, by) - half, max(ay, by) + half, self.h)
        if cols is None or rows is None:
            return None
        (c0, c1), (r0, r1) = cols, rows
        px, py = self.xs[None, c0:c1], self.ys[r0:r1, None]
        dx, dy = bx - ax, by - ay
        t = np.clip(((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
        dist2 = (px - ax - t * dx) ** 2 + (py - ay - t * dy) ** 2
        return r0, c0, dist2 <= half * half + 0.25


def upsampled_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise (std about 1): a coarse Gaussian grid, bilinearly enlarged to the image size."""
    coarse = rng.standard_normal((cells, 2 * cells)).astype(np.float32)
    big = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    return np.array(big, dtype=np.float32)


def jitter(rng: np.random.Generator, rgb, amount: float) -> np.ndarray:
    """A colour with each channel scaled independently by 1 +- amount, and overall brightness too."""
    rgb = np.asarray(rgb, np.float32)
    return np.clip(rgb * rng.uniform(1 - amount, 1 + amount, 3) * rng.uniform(1 - amount, 1 + amount), 0, 255)


