"""The interface both teachers share, offline (pseudo-mask folders) and online (inside training).

Images travel through carbseg as float RGB in 0..255 (B, 3, H, W); each consumer applies its own
normalisation (CLIP's mean/std for the CLIP teacher, ImageNet's for the segmenter). The release fed
CLIP the segmenter's ImageNet-normalised crop; we give CLIP the statistics it was trained with.
"""

from __future__ import annotations

from typing import Protocol

import torch

from carbseg.data.frames import FrameMaps


class Teacher(Protocol):
    #: True for the simulated teacher, which reads ground truth (a research instrument, never a default).
    #: The proxy teacher is a research instrument too, but sees only the pixels.
    reads_ground_truth: bool
    num_classes: int

    def __call__(
        self,
        images: torch.Tensor,
        image_labels: torch.Tensor,
        gt: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        frames: FrameMaps | None = None,
    ) -> torch.Tensor:
        """Pseudo-masks for a batch of views.

        images: float (B, 3, H, W) RGB in 0..255 (a global crop, or a zoomed local patch).
        image_labels: bool (B, C) multi-hot image-level labels; scores of absent classes are set to
            -inf before the argmax (never multiplied by 0/1, a defect of the release).
        gt: long (B, H, W) train ids, 255 = ignore, transformed exactly like ``images``; read only by
            the simulated teacher.
        valid: bool (B, H, W), False on padding; the output is 255 there.
        frames: where each view lies in its original frame (``carbseg.data.frames``); read only by the
            simulated teacher, whose noise is laid on the frame so it persists across views.
        Returns long (B, H, W): class indices, or 255 where no label is given.
        """
        ...
