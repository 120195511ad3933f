"""Global-Local View (GLV): one local patch per step, zoomed for the teacher.

The *global view* is the augmented training crop. The *local patch* is a (h, w) window of it at a
random position (Cityscapes 512 x 256), upscaled by s ~ U[offset, offset + rate) before the CLIP
teacher labels it, so small objects cover more of CLIP's 16-pixel patches. The teacher's labels are
brought back to the patch size and supervise the segmenter's global logits *cut out* at the same
window -- the segmenter never sees the patch separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LocalPatch:
    top: int
    left: int
    height: int
    width: int
    scale: float  # zoom factor s

    @property
    def zoomed_hw(self) -> tuple[int, int]:
        return max(1, round(self.height * self.scale)), max(1, round(self.width * self.scale))


def sample_local_patch(
    view_hw: Sequence[int],
    patch_hw: Sequence[int],
    scale_offset: float,
    scale_rate: float,
    generator: torch.Generator,
) -> LocalPatch:
    """A uniformly placed window of ``patch_hw`` (clamped to the view) and s ~ U[offset, offset + rate).

    Every position is possible, the last one included (the release's randint excluded it).
    """
    view_h, view_w = int(view_hw[0]), int(view_hw[1])
    h, w = min(int(patch_hw[0]), view_h), min(int(patch_hw[1]), view_w)
    # Read with tolist(), not int()/float(): the same draws, and no aten::_local_scalar_dense, the op
    # that the training step's host-sync check counts (these are CPU generator draws, never on a GPU).
    top = int(torch.randint(0, view_h - h + 1, (), generator=generator).tolist())
    left = int(torch.randint(0, view_w - w + 1, (), generator=generator).tolist())
    scale = scale_offset + scale_rate * float(torch.rand((), generator=generator).tolist())
    return LocalPatch(top, left, h, w, scale)


def cut_out(tensor: torch.Tensor, patch: LocalPatch) -> torch.Tensor:
    """The patch's window of any (..., H, W) tensor: global logits, labels, valid maps."""
    return tensor[..., patch.top : patch.top + patch.height, patch.left : patch.left + patch.width]


def zoom_images(images: torch.Tensor, patch: LocalPatch) -> torch.Tensor:
    """Cut the patch out of float images (B, 3, H, W) in 0..255 and upscale it by s (bilinear)."""
    window = cut_out(images, patch)
    return F.interpolate(window.float(), size=patch.zoomed_hw, mode="bilinear", align_corners=False)


def _resize_labels(labels: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of an integer/bool map (B, H, W): no new values are invented.

    ``nearest-exact`` samples pixel centres, so a zoom by an integer factor and back is lossless.
    """
    resized = F.interpolate(labels[:, None].float(), size=size_hw, mode="nearest-exact")[:, 0]
    return resized.to(labels.dtype)


def zoom_labels(labels: torch.Tensor, patch: LocalPatch) -> torch.Tensor:
    """Cut the patch out of a label or valid map (B, H, W) and upscale it by s (nearest)."""
    return _resize_labels(cut_out(labels, patch), patch.zoomed_hw)


def labels_to_patch_size(zoomed_labels: torch.Tensor, patch: LocalPatch) -> torch.Tensor:
    """The teacher's labels of the zoomed patch (B, sh, sw) back at the patch size (B, h, w), nearest."""
    return _resize_labels(zoomed_labels, (patch.height, patch.width))
