"""Where a training view's pixels lie in the original frame it was cut from.

Every view the teacher labels -- the augmented global crop, and the zoomed GLV local patch -- is an
axis-aligned resampling of one original frame: resize, crop, horizontal flip and padding, then the
patch's cut-out and zoom. Each of these maps coordinates affinely per axis, so one view is fully
placed in its frame by four numbers, ``(y_scale, y_offset, x_scale, x_offset)``:

    frame_y = y_scale * view_y + y_offset,   frame_x = x_scale * view_x + x_offset

in *pixel-edge* coordinates (pixel i spans [i, i + 1); its centre is i + 0.5). A flipped view has
a negative ``x_scale``. Padding appended at the bottom/right maps outside the frame.

A research instrument needs this: the simulated teacher seeds its noise from the frame position,
so that the same region carries the same error in every crop, flip and zoom, as CLIP's errors do
(they are a function of the image, not of the view).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IDENTITY = (1.0, 0.0, 1.0, 0.0)


def frame_key(image_id: str) -> int:
    """A stable 63-bit key of an image id (the same in every process and session)."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def resized(affine: Sequence[float], old_hw: Sequence[int], new_hw: Sequence[int]) -> tuple[float, ...]:
    """The map after resizing the view from ``old_hw`` to ``new_hw`` (edges stay on edges)."""
    ay, by, ax, bx = affine
    sy, sx = old_hw[0] / new_hw[0], old_hw[1] / new_hw[1]
    return ay * sy, by, ax * sx, bx


def cropped(affine: Sequence[float], top: float, left: float) -> tuple[float, ...]:
    """The map after cutting the view at ``(top, left)``."""
    ay, by, ax, bx = affine
    return ay, by + ay * top, ax, bx + ax * left


def flipped(affine: Sequence[float], width: int) -> tuple[float, ...]:
    """The map after a horizontal flip of a view ``width`` pixels wide (x -> width - x)."""
    ay, by, ax, bx = affine
    return ay, by, -ax, bx + ax * width


@dataclass(frozen=True)
class FrameMaps:
    """A batch of views placed in their frames: what the simulated teacher needs besides pixels."""

    keys: torch.Tensor  # (B,) int64, ``frame_key`` of each view's image id
    affine: torch.Tensor  # (B, 4) float64 maps, see the module docstring

    @classmethod
    def whole_frames(cls, image_ids: Sequence[str]) -> FrameMaps:
        """Views that are the original frames themselves (offline pseudo-masks)."""
        keys = torch.tensor([frame_key(i) for i in image_ids], dtype=torch.int64)
        return cls(keys, torch.tensor([IDENTITY] * len(image_ids), dtype=torch.float64))

    def zoomed(self, top: int, left: int, patch_hw: Sequence[int], zoomed_hw: Sequence[int]) -> FrameMaps:
        """The maps of each view's GLV local patch, cut at (top, left) and resized to ``zoomed_hw``."""
        rows = [resized(cropped(row, top, left), patch_hw, zoomed_hw) for row in self.affine.tolist()]
        return FrameMaps(self.keys, torch.tensor(rows, dtype=torch.float64))

    def flipped(self, width: int) -> FrameMaps:
        """The maps after flipping every view horizontally."""
        rows = [flipped(row, width) for row in self.affine.tolist()]
        return FrameMaps(self.keys, torch.tensor(rows, dtype=torch.float64))

    def cropped(self, top: int, left: int) -> FrameMaps:
        rows = [cropped(row, top, left) for row in self.affine.tolist()]
        return FrameMaps(self.keys, torch.tensor(rows, dtype=torch.float64))


def cell_centres_in_frame(affine: Sequence[float], grid_hw: Sequence[int], cell: int) -> tuple[np.ndarray, ...]:
    """Frame coordinates (y (gh,), x (gw,)) of the centres of a view's ``cell``-px grid cells."""
    ay, by, ax, bx = affine
    ys = (np.arange(grid_hw[0]) + 0.5) * cell
    xs = (np.arange(grid_hw[1]) + 0.5) * cell
    return ay * ys + by, ax * xs + bx


def view_from_frame(affine: Sequence[float], frame_y: np.ndarray, frame_x: np.ndarray) -> tuple[np.ndarray, ...]:
    """The inverse map: frame coordinates -> view coordinates."""
    ay, by, ax, bx = affine
    return (frame_y - by) / ay, (frame_x - bx) / ax
