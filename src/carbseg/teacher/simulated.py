"""The simulated teacher: a research instrument that READS GROUND TRUTH (never a default).

It mimics what makes CLIP pseudo-masks what they are, so that training (GLV, CARB) can be
studied on real images without CLIP weights:

1. **Patch grid of CLIP's size.** A square grid of ``patch_size`` px is laid on the *view it is
   given*; each cell takes the majority ground-truth class among the image's classes, and cells
   are upsampled back (nearest). Objects thinner than about half a cell vanish -- unless the view
   is zoomed (a GLV local patch upscaled by s sees the scene through 16/s-px cells, exactly as a
   finer grid would), which is the effect GLV exploits.
2. **Persistent CLIP-like noise** of strength ``noise`` in [0, 1] (0 = none), at cell level:
   - *confusions* between similar classes (sidewalk<->road, terrain<->vegetation, truck<->car,
     rider<->person, wall<->building, pole<->traffic sign, ...; table by class *names*, only
     towards classes present in the image): each such class, with probability ``noise``, loses
     a blob-shaped fraction of its cells to its partner;
   - *boundary bleeding*: labels spread across class borders by up to ceil(4 * noise) cells;
   - *patch flips*: each cell becomes a random present class with probability 0.1 * noise.

The noise is laid on the *original frame* (``carbseg.data.frames``): every random number is a hash
of (``seed``, the frame's key, the position in the frame), so the same region carries the same
error in every crop, flip and zoom of the frame -- like CLIP's errors, which are a function of the
image -- and results do not depend on batching, sharding or processes. (Before, the noise was
seeded per *view*, so every view drew independent errors that plain cross-entropy averages away.)

What it can and cannot show: it reads the ground truth, so a zoomed GLV patch gets finer labels
from the ground truth itself, not from seeing more pixels: a GLV gain measured with it is a
property of the simulator. The proxy teacher (``carbseg.teacher.proxy``) sees only the pixels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from carbseg.data.classes import IGNORE_INDEX, ClassSet
from carbseg.data.frames import IDENTITY as IDENTITY_FRAME
from carbseg.data.frames import FrameMaps, cell_centres_in_frame, view_from_frame
from carbseg.errors import UserError

log = logging.getLogger(__name__)

#: Pairs of class *names* that CLIP tends to confuse (symmetric); used when both are in the image.
SIMILAR_CLASSES: tuple[tuple[str, str], ...] = (
    ("sidewalk", "road"), ("terrain", "vegetation"), ("truck", "car"), ("bus", "truck"), ("train", "bus"),
    ("rider", "person"), ("wall", "building"), ("fence", "wall"), ("pole", "traffic sign"),
    ("traffic light", "pole"), ("motorcycle", "bicycle"), ("bicyclist", "pedestrian"),
    ("signsymbol", "pole"), ("fence", "building"), ("tree", "building"), ("pickup", "car"), ("van", "car"),
    ("guard rail", "fence"), ("streetlight", "pole"), ("road marking", "road"), ("billboard", "traffic sign"),
    ("ego vehicle", "car"), ("sidewalk", "terrain"),
)

# Noise constants at strength 1 (the `noise` argument scales them); calibrated in docs/teacher.md.
MAX_BLEED_STEPS = 4
BLEED_PROB = 0.5
FLIP_PROB = 0.1
CONFUSION_BLOB_CELLS = 4  # size of the blobs in which a class is confused, in cells


def confusion_partners(classes: ClassSet) -> dict[int, list[int]]:
    """class index -> indices of similar classes in this class set (by name)."""
    partners: dict[int, list[int]] = {i: [] for i in range(classes.num_classes)}
    for a, b in SIMILAR_CLASSES:
        if a in classes.names and b in classes.names:
            ia, ib = classes.names.index(a), classes.names.index(b)
            partners[ia].append(ib)
            partners[ib].append(ia)
    return partners


def cell_majority(gt: torch.Tensor, image_labels: torch.Tensor, num_classes: int, patch_size: int) -> torch.Tensor:
    """(B, H, W) train ids -> (B, gh, gw) majority present class per cell (255 where no present pixel).

    The grid starts at the view's top-left corner; the last row/column of cells may be partial.
    Ties go to the lower class index.
    """
    b, h, w = gt.shape
    gh, gw = math.ceil(h / patch_size), math.ceil(w / patch_size)
    rows = torch.arange(h, device=gt.device) // patch_size
    cols = torch.arange(w, device=gt.device) // patch_size
    cell = rows[:, None] * gw + cols[None, :]  # (H, W) cell index of each pixel
    image = torch.arange(b, device=gt.device).view(b, 1, 1) * (gh * gw)
    ids = gt.long().clamp(max=num_classes)  # ignore (255) -> extra bin num_classes
    bins = (image + cell) * (num_classes + 1) + ids
    counts = torch.bincount(bins.flatten(), minlength=b * gh * gw * (num_classes + 1))
    counts = counts.view(b, gh, gw, num_classes + 1)[..., :num_classes]
    counts = counts.masked_fill(~image_labels.bool().view(b, 1, 1, num_classes), -1)
    best_count, best = counts.max(dim=-1)
    return best.masked_fill(best_count <= 0, IGNORE_INDEX)


# ---------------------------------------------------------------- persistent noise
# Every random number of the noise is a hash of (seed, frame key, what it decides, where in the
# frame), never a draw from a stream: the same region of the same frame gets the same error in
# every crop, flip and zoom, as CLIP's errors are a function of the image and not of the view.
_TAG_CONFUSE, _TAG_BLOB, _TAG_WARP_AMPLITUDE, _TAG_WARP_Y, _TAG_WARP_X, _TAG_FLIP = range(1, 7)
# splitmix64's finaliser: its additive constant and two multipliers, and the 64-bit mask.
_GAMMA, _MUL1, _MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MASK64_INT = (1 << 64) - 1
_MASK64 = np.uint64(_MASK64_INT)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(_GAMMA)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(_MUL1)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(_MUL2)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _mix_int(x: int) -> int:
    """``_mix`` on one Python int (the same wrapping arithmetic, mod 2**64)."""
    x = (x + _GAMMA) & _MASK64_INT
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64_INT
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64_INT
    return x ^ (x >> 31)


def _hash(*parts) -> np.ndarray | np.uint64:
    """A uint64 hash of integers / integer arrays (broadcast together).

    The leading integer parts (seed, frame key, tag, class) are folded in plain Python ints: each
    numpy operation on a 0-d array costs microseconds, and the teacher hashes a few dozen times a
    view, so this prefix was about a third of the simulated teacher's time. The values are those of folding
    every part with ``_mix`` (``tests/test_teacher_simulated.py`` checks them against that reference)."""
    h, rest = 0, parts
    for i, part in enumerate(parts):
        if not isinstance(part, (int, np.integer)):
            rest = parts[i:]
            break
        h = _mix_int(h ^ (int(part) & _MASK64_INT))
    else:
        return np.uint64(h)
    acc = np.uint64(h)
    for part in rest:
        acc = _mix(acc ^ np.asarray(part).astype(np.int64).astype(np.uint64))
    return acc


@functools.lru_cache(maxsize=1 << 16)
def _int_hash(*parts: int) -> np.uint64:
    """``_hash`` of integers only (seed, frame key, tag, class, ...), remembered: a frame's per-class
    decisions and its fields' prefixes are the same in every view and epoch of it (the demo labels each
    of its 300 frames in two views, 26 epochs); remembering them took the teacher views of a demo batch
    from 6.1 to 5.6 ms."""
    return _hash(*parts)


def _uniform(*parts) -> np.ndarray:
    """Uniform [0, 1) numbers from ``_hash``."""
    return _to_unit(_hash(*parts))


def _to_unit(hashed: np.ndarray) -> np.ndarray:
    return (hashed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _row_prefixes(*columns) -> np.ndarray:
    """(K, 1, 1) uint64: ``_hash`` of each row's leading integers (seed, frame key, tag, class), folded
    in Python ints; a column is a list (one value per row) or one int for every row. ``_fold`` then
    hashes the rows' arrays on top: ``_fold(_row_prefixes(a, b), y, x)[k] == _hash(a, b[k], y[k], x[k])``."""
    count = max(len(c) for c in columns if isinstance(c, list | tuple))
    rows = zip(*(c if isinstance(c, list | tuple) else [c] * count for c in columns))
    return np.array([_int_hash(*row) for row in rows], dtype=np.uint64).reshape(-1, 1, 1)


def _fold(acc: np.ndarray, *parts) -> np.ndarray:
    """``_hash``'s array stage: fold further parts into already hashed values."""
    for part in parts:
        acc = _mix(acc ^ np.asarray(part).astype(np.int64).astype(np.uint64))
    return acc


def _value_noise(prefix: np.ndarray, y: np.ndarray, x: np.ndarray, spacing: float) -> np.ndarray:
    """Smooth random fields in [0, 1] over frame coordinates, one per row of ``prefix`` (K, 1, 1):
    hashed values on a lattice of ``spacing`` frame pixels, interpolated bilinearly at the points
    (y (K, gh, 1), x (K, 1, gw)) -> (K, gh, gw)."""
    gy, gx = y / spacing, x / spacing
    y0, x0 = np.floor(gy), np.floor(gx)
    ty, tx = gy - y0, gx - x0

    def corner(dy, dx):
        return _to_unit(_fold(prefix, y0 + dy, x0 + dx))

    top = corner(0, 0) * (1 - tx) + corner(0, 1) * tx
    bottom = corner(1, 0) * (1 - tx) + corner(1, 1) * tx
    return top * (1 - ty) + bottom * ty


def add_cell_noise(cells: np.ndarray, present: np.ndarray, partners: dict[int, list[int]], noise: float,
                   keys: Sequence[int], affines: np.ndarray, patch_size: int, seed: int = 0) -> np.ndarray:
    """CLIP-like noise on a batch of views' (B, gh, gw) cell labels; ``present`` is (B, C) bool.

    ``keys[i]`` identifies view i's frame and ``affines[i]`` (4 numbers) places the view in it
    (``carbseg.data.frames``); the noise is laid on the frame, in frame pixels, and read at the
    centres of the view's cells:

    - *confusions* between similar classes: with probability ``noise`` a present class loses the
      cells where a smooth frame field (blobs of ``CONFUSION_BLOB_CELLS`` cells) is below a hashed
      fraction to one present partner;
    - *boundary bleeding*: every cell reads its label at a point displaced by a smooth frame field
      of up to ``ceil(MAX_BLEED_STEPS * noise)`` cells (a hashed amplitude per frame), so labels
      spread across class borders the same way in every view;
    - *patch flips*: each frame cell becomes a random present class with probability ``FLIP_PROB * noise``.

    Each view's noise depends on its own frame and position only, never on the rest of the batch;
    the fields of all views are computed together (a few numpy calls per batch, not per view).
    """
    if noise <= 0:
        return cells
    b, gh, gw = cells.shape
    clean = cells
    out = clean.copy()
    keys = [int(k) for k in keys]
    ay, by, ax, bx = (np.asarray(affines, dtype=np.float64).reshape(b, 4)[:, j].reshape(b, 1, 1) for j in range(4))
    fy, fx = cell_centres_in_frame((ay, by, ax, bx), (gh, gw), patch_size)  # (B, 1, gh), (B, 1, gw)
    fy, fx = fy.reshape(b, gh, 1), fx.reshape(b, 1, gw)
    cell = float(patch_size)  # the noise's frame-level unit: one teacher cell of the original frame
    present_ids = [np.flatnonzero(present[i]).tolist() for i in range(b)]

    # Confusions between similar classes, in blobs (CLIP confuses regions, not isolated patches).
    confused = []  # (view, class, partner, fraction)
    for i in range(b):
        for c in present_ids[i]:
            choices = [p for p in partners.get(c, []) if present[i, p]]
            if not choices or _to_unit(_int_hash(seed, keys[i], _TAG_CONFUSE, c, 0)) >= noise:
                continue
            partner = choices[int(_int_hash(seed, keys[i], _TAG_CONFUSE, c, 1) % np.uint64(len(choices)))]
            confused.append((i, c, partner, _to_unit(_int_hash(seed, keys[i], _TAG_CONFUSE, c, 2))))
    if confused:
        views, classes = [row[0] for row in confused], [row[1] for row in confused]
        prefix = _row_prefixes(seed, [keys[i] for i in views], _TAG_BLOB, classes)
        fields = _value_noise(prefix, fy[views], fx[views], CONFUSION_BLOB_CELLS * cell)
        for (i, c, partner, fraction), field in zip(confused, fields):
            out[i][(clean[i] == c) & (field < fraction)] = partner

    # Boundary bleeding as a persistent warp: read each cell's label a little way off, in the frame.
    max_steps = math.ceil(MAX_BLEED_STEPS * noise)
    steps = np.array([int(_int_hash(seed, k, _TAG_WARP_AMPLITUDE) % np.uint64(max_steps + 1)) for k in keys])
    warped_views = np.flatnonzero(steps)
    if len(warped_views):
        v = warped_views
        view_keys = [keys[i] for i in v]
        amplitude = (steps[v] * BLEED_PROB * cell).reshape(-1, 1, 1)  # frame pixels (a random walk of `steps` moves)
        dy = amplitude * (2 * _value_noise(_row_prefixes(seed, view_keys, _TAG_WARP_Y, 0), fy[v], fx[v], 2 * cell) - 1)
        dx = amplitude * (2 * _value_noise(_row_prefixes(seed, view_keys, _TAG_WARP_X, 0), fy[v], fx[v], 2 * cell) - 1)
        vy, vx = view_from_frame((ay[v], by[v], ax[v], bx[v]), fy[v] + dy, fx[v] + dx)
        rows = np.clip(np.floor(vy / patch_size), 0, gh - 1).astype(np.int64)
        cols = np.clip(np.floor(vx / patch_size), 0, gw - 1).astype(np.int64)
        current = out[v]
        warped = np.take_along_axis(current.reshape(len(v), -1), (rows * gw + cols).reshape(len(v), -1), axis=1)
        warped = warped.reshape(len(v), gh, gw)
        out[v] = np.where((warped != IGNORE_INDEX) & (current != IGNORE_INDEX), warped, current)

    # Patch-level random flips towards any present class, per cell of the frame.
    flipped_views = np.array([i for i in range(b) if present_ids[i]], dtype=np.int64)
    if len(flipped_views):
        v = flipped_views
        prefix = _row_prefixes(seed, [keys[i] for i in v], _TAG_FLIP)
        iy, ix = np.floor(fy[v] / cell), np.floor(fx[v] / cell)
        current = out[v]
        flip = (_to_unit(_fold(prefix, iy, ix, 0)) < FLIP_PROB * noise) & (current != IGNORE_INDEX)
        counts = np.array([len(present_ids[i]) for i in v], dtype=np.uint64).reshape(-1, 1, 1)
        choice = (_fold(prefix, iy, ix, 1) % counts).astype(np.int64)
        table = np.zeros((len(v), max(len(present_ids[i]) for i in v)), dtype=out.dtype)
        for row, i in enumerate(v):
            table[row, : len(present_ids[i])] = present_ids[i]
        drawn = np.take_along_axis(table, choice.reshape(len(v), -1), axis=1).reshape(len(v), gh, gw)
        out[v] = np.where(flip, drawn, current)
    return out


def _content_key(gt: torch.Tensor, labels: torch.Tensor) -> int:
    """A frame key from the view's content, for views given without frame maps (each its own frame)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(gt.to(torch.uint8).cpu().numpy().tobytes())
    digest.update(labels.to(torch.uint8).cpu().numpy().tobytes())
    digest.update(str(tuple(gt.shape)).encode())
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


class SimulatedTeacher:
    """Implements ``carbseg.teacher.base.Teacher`` from ground truth (a research instrument)."""

    reads_ground_truth = True

    def __init__(self, classes: ClassSet, patch_size: int = 16, noise: float = 0.3, seed: int = 0):
        if patch_size < 1:
            raise UserError(f"teacher.grid_cell (the grid cell side in pixels) must be >= 1, got {patch_size}")
        if not 0.0 <= noise <= 1.0:
            raise UserError(f"teacher.noise must be within [0, 1], got {noise}")
        self.classes = classes
        self.num_classes = classes.num_classes
        self.patch_size = patch_size
        self.noise = noise
        self.seed = seed
        self.partners = confusion_partners(classes)
        log.warning("simulated teacher: pseudo-masks are made from the GROUND TRUTH (patch grid %d px, noise %.2f); "
                    "a research instrument, not weak supervision", patch_size, noise)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, image_labels: torch.Tensor, gt: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None, frames: FrameMaps | None = None) -> torch.Tensor:
        """``frames`` places each view in its original frame (keys and maps): the noise then persists
        across views of the same frame. Without it, each view is treated as a whole frame of its own."""
        if gt is None:
            raise UserError("the simulated teacher reads ground truth, but no gt was given; "
                            "use --teacher clip for images without masks")
        b, h, w = gt.shape
        labels = image_labels.to(gt.device).bool()
        cells = cell_majority(gt, labels, self.num_classes, self.patch_size)
        if frames is None:
            keys = [_content_key(gt[i], labels[i]) for i in range(b)]
            affines = np.array([IDENTITY_FRAME] * b, dtype=np.float64)
        else:
            keys, affines = frames.keys.tolist(), frames.affine.cpu().numpy()
        noisy = add_cell_noise(cells.cpu().numpy(), labels.cpu().numpy(), self.partners, self.noise, keys, affines,
                               self.patch_size, self.seed)
        cells = torch.from_numpy(noisy).to(gt.device)
        ps = self.patch_size
        masks = cells.repeat_interleave(ps, dim=1).repeat_interleave(ps, dim=2)[:, :h, :w]
        if valid is not None:
            masks = masks.masked_fill(~valid.to(gt.device).bool(), IGNORE_INDEX)
        return masks.long()
