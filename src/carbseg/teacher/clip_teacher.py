"""The CLIP teacher: dense value-path features -> cosine scores -> label-restricted pseudo-masks."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from carbseg.precision import PrecisionChoice, native_bf16, teacher_precision
from carbseg.teacher.clip_dense import DenseCLIP
from carbseg.teacher.pseudo_masks import cosine_scores, masks_from_scores
from carbseg.teacher.refine import key_smoothing, prompt_denoising

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # fp16: what auto picks on pre-Ampere GPUs, asked for by name

__all__ = ["CLIPTeacher", "native_bf16"]  # native_bf16 lives in carbseg.precision


class CLIPTeacher:
    """Implements ``carbseg.teacher.base.Teacher`` with a frozen CLIP image tower.

    precision: ``bf16`` runs the transformer blocks under bf16 autocast (scores and the argmax
    stay in fp32); ``auto`` (default) does so only where bf16 is fast: on GPUs with native bf16
    (:func:`native_bf16`), on a CPU where the timed probe of :func:`carbseg.precision.cpu_choice`
    measured it faster than fp32; on older CUDA GPUs (V100, T4) it runs them under fp16 autocast
    (:func:`carbseg.precision.teacher_precision`); else fp32.
    scales: multi-scale averaging -- the view is resized by each factor, scored, and the scores
    (upsampled back to the view) are averaged before the restriction and the argmax.
    """

    reads_ground_truth = False

    def __init__(self, dense: DenseCLIP, text_embeddings: torch.Tensor, scales: Sequence[float] = (1.0,),
                 use_key_smoothing: bool = False, use_prompt_denoising: bool = False,
                 confidence_threshold: float | None = None, precision: str = "auto"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        self.dense = dense
        self.text_embeddings = F.normalize(text_embeddings.float(), dim=-1)
        self.num_classes = int(text_embeddings.shape[0])
        self.scales = tuple(float(s) for s in scales)
        self.use_key_smoothing = use_key_smoothing
        self.use_prompt_denoising = use_prompt_denoising
        self.confidence_threshold = confidence_threshold
        self.precision = precision
        self._resolved: dict[str, PrecisionChoice] = {}
        self._mean_std: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def resolved_precision(self, device: torch.device | str) -> PrecisionChoice:
        """What ``precision`` means on ``device`` (``auto`` resolved once per device), and why."""
        device = torch.device(device)
        if str(device) not in self._resolved:
            self._resolved[str(device)] = teacher_precision(self.precision, device)
        return self._resolved[str(device)]

    def _autocast(self, device: torch.device):
        dtype = self.resolved_precision(device).autocast_dtype  # bf16, fp16 (auto on pre-Ampere GPUs) or none
        if dtype is not None:
            return torch.autocast(device_type=device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's mean and std (0..255 scale, (1, 3, 1, 1)) on ``device``, made once per device: built
        on every call they were a host-to-device copy, twice per training step (global view, patch)."""
        key = str(device)
        if key not in self._mean_std:
            mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0
            self._mean_std[key] = (mean.to(device), std.to(device))
        return self._mean_std[key]

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._statistics(images.device)
        return (images.float() - mean) / std

    def _scores_at_scale(self, normalised: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, C, H, W) cosine scores for one scale, upsampled to the view's size."""
        h, w = normalised.shape[-2:]
        x = normalised
        if scale != 1.0:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        # Pad with zeros (= CLIP's mean colour after normalisation) to whole patches, so the
        # ragged right/bottom edge is scored instead of being cut off.
        ph, pw = self.dense.patch_size
        sh, sw = x.shape[-2:]
        pad_h, pad_w = (-sh) % ph, (-sw) % pw
        x = F.pad(x, (0, pad_w, 0, pad_h))
        with torch.no_grad(), self._autocast(x.device):
            if self.use_key_smoothing:
                feats, keys = self.dense.dense_features(x, with_keys=True)
            else:
                feats, keys = self.dense.dense_features(x), None
        scores = cosine_scores(feats.float(), self.text_embeddings.to(x.device))
        if keys is not None:
            scores = key_smoothing(scores, keys.float())
        # Upsample to the padded size, drop the padding, then bring back to the view size.
        scores = F.interpolate(scores, size=(sh + pad_h, sw + pad_w), mode="bilinear", align_corners=False)
        scores = scores[..., :sh, :sw]
        if (sh, sw) != (h, w):
            scores = F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False)
        return scores

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) cosine scores averaged over the scales (before any label restriction).

        A caller's autocast (the segmenter's, in training) is switched off here: the teacher's own
        ``precision`` alone decides, so the masks made inside training equal ``carbseg pseudo-masks``'.
        """
        # no_grad as a block, not a decorator (here and in __call__): mutation testing skips decorated
        # functions (docs/testing.md).
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            normalised = self._normalise(images)
            total = None
            for scale in self.scales:
                s = self._scores_at_scale(normalised, scale)
                # In place: one full-resolution map is held besides the current scale's, not three
                # (at 2048x1024, 19 classes and batch 4 each fp32 map is 637 MB).
                total = s if total is None else total.add_(s)
                del s
            return total.div_(len(self.scales))

    def __call__(self, images: torch.Tensor, image_labels: torch.Tensor, gt: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None, frames=None) -> torch.Tensor:
        with torch.no_grad():
            scores = self.scores(images)  # ``frames`` is not needed: CLIP sees only the pixels
            labels = image_labels.to(scores.device).bool()
            # No autocast guard needed from here: the fp32 scores go through interpolation, softmax and
            # max only, which autocast never lowers (tests/test_clip_teacher.py compares masks made
            # inside a caller's bf16 autocast with those made outside it).
            if self.use_prompt_denoising:
                labels = prompt_denoising(scores, labels)
            return masks_from_scores(scores, labels, tuple(images.shape[-2:]), self.confidence_threshold,
                                     None if valid is None else valid.to(scores.device))
