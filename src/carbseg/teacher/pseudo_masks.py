"""Pure functions from CLIP scores to pseudo-masks: label restriction, upsampling, argmax, threshold.

The restriction to the image-level classes sets the scores of absent classes to -inf. The
release multiplied scores by the 0/1 label instead, so a present class with a negative cosine
lost to an absent class's 0 -- that defect is what ``restrict_to_image_labels`` avoids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from carbseg.class_argmax import class_argmax
from carbseg.data.classes import IGNORE_INDEX

#: CLIP's learned logit scale (100 for the released models): turns cosines into softmax logits.
CLIP_LOGIT_SCALE = 100.0


def cosine_scores(features: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) patch features x (C, D) unit text embeddings -> (B, C, h, w) cosine similarities."""
    feats = F.normalize(features.float(), dim=1)
    return torch.einsum("bdhw,cd->bchw", feats, text_embeddings.float())


def restrict_to_image_labels(scores: torch.Tensor, image_labels: torch.Tensor) -> torch.Tensor:
    """Scores (B, C, ...) with absent classes (``image_labels`` False, (B, C)) set to -inf."""
    absent = ~image_labels.bool()
    return scores.masked_fill(absent.view(*absent.shape, *([1] * (scores.dim() - 2))), float("-inf"))


def upsample_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (finite) scores to the view size; done before restriction so no -inf mixes."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def masks_from_scores(scores: torch.Tensor, image_labels: torch.Tensor, size: tuple[int, int],
                      confidence_threshold: float | None = None,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, h, w) scores -> (B, H, W) long pseudo-masks.

    Upsample, restrict (-inf), argmax. With ``confidence_threshold``, pixels whose softmax
    probability (over the present classes, CLIP's logit scale) is below it become 255. Images
    without any present class and pixels outside ``valid`` are 255 as well.
    """
    restricted = restrict_to_image_labels(upsample_scores(scores.float(), size), image_labels)
    masks = class_argmax(restricted)
    if confidence_threshold is not None:
        prob = torch.softmax(restricted * CLIP_LOGIT_SCALE, dim=1).amax(dim=1)
        masks = masks.masked_fill(prob < confidence_threshold, IGNORE_INDEX)
    no_class = ~image_labels.bool().any(dim=1)
    masks = masks.masked_fill(no_class.view(-1, 1, 1), IGNORE_INDEX)
    if valid is not None:
        masks = masks.masked_fill(~valid.bool(), IGNORE_INDEX)
    return masks
