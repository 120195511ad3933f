"""MaskCLIP's refinements of dense scores, and the authors' offline dense-CRF of finished masks.

- Key smoothing: patches whose last-block *keys* are similar are likely the same object, so each
  patch's scores are replaced by the affinity-weighted average of all patches' scores. MaskCLIP's
  idea by carbseg's own rule (cosine >= 0.5, row-normalised, on the scores of every patch); its
  released code computes it differently (docs/teacher.md, "Key smoothing").
- Prompt denoising: a present class that is nowhere confidently the winner is most likely a
  false prompt; its scores are dropped (at least one class always remains).
- Dense CRF (offline, ``pip install -e ".[crf]"`` in the checkout): label-based unaries and the authors'
  pairwise terms, 10 mean-field iterations.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from carbseg.data.classes import IGNORE_INDEX
from carbseg.errors import UserError
from carbseg.teacher.pseudo_masks import CLIP_LOGIT_SCALE, restrict_to_image_labels

#: Affinities below this cosine of keys do not smooth (keeps smoothing within objects).
KEY_SMOOTHING_MIN_AFFINITY = 0.5
#: A class whose highest probability anywhere is below this is treated as a false prompt.
PROMPT_DENOISING_THRESHOLD = 0.5


#: Elements of one block of the affinity (query rows x all keys, per batch); bounds the memory of
#: key smoothing: 16 M fp32 = 64 MiB, whatever the image size.
KEY_SMOOTHING_BLOCK_ELEMENTS = 1 << 24


def key_smoothing(scores: torch.Tensor, keys: torch.Tensor,
                  min_affinity: float = KEY_SMOOTHING_MIN_AFFINITY,
                  block_elements: int = KEY_SMOOTHING_BLOCK_ELEMENTS) -> torch.Tensor:
    """scores (B, C, h, w), keys (B, K, h, w) -> smoothed scores.

    Each patch's scores become the average of all patches' scores weighted by the (thresholded,
    row-normalised) cosine affinity of their keys. The (hw x hw) affinity is never held whole: it
    is built a block of query rows at a time (each row is normalised on its own, so blocks are exact),
    because at 2048x1024 and teacher scale 2 one full fp32 copy is 4.3 GB per image.
    """
    b, c, h, w = scores.shape
    hw = h * w
    k = F.normalize(keys.float().flatten(2), dim=1)  # (B, K, hw)
    values = scores.float().flatten(2)  # (B, C, hw)
    smoothed = torch.empty_like(values)
    rows = max(1, block_elements // max(b * hw, 1))
    for start in range(0, hw, rows):
        stop = min(start + rows, hw)
        affinity = torch.bmm(k[:, :, start:stop].transpose(1, 2), k)  # (B, rows, hw) cosine
        affinity = affinity.mul_(affinity >= min_affinity).clamp_min_(0.0)
        affinity = affinity.div_(affinity.sum(dim=-1, keepdim=True).clamp_min_(1e-6))
        smoothed[:, :, start:stop] = torch.bmm(values, affinity.transpose(1, 2))
    return smoothed.view(b, c, h, w)


def prompt_denoising(scores: torch.Tensor, image_labels: torch.Tensor,
                     threshold: float = PROMPT_DENOISING_THRESHOLD) -> torch.Tensor:
    """Image labels (B, C) with false prompts removed: classes never above ``threshold`` probability."""
    prob = torch.softmax(restrict_to_image_labels(scores.float(), image_labels) * CLIP_LOGIT_SCALE, dim=1)
    peak = prob.flatten(2).amax(dim=2)  # (B, C)
    keep = image_labels.bool() & (peak >= threshold)
    # Never remove every class of an image: keep its most confident one.
    best = F.one_hot(peak.masked_fill(~image_labels.bool(), -1.0).argmax(dim=1), image_labels.shape[1]).bool()
    empty = ~keep.any(dim=1, keepdim=True)
    return torch.where(empty, best & image_labels.bool(), keep)


# The authors' offline refinement: label unary with 0.7 confidence, Gaussian (sxy 3, compat 3) and
# bilateral (sxy 50, srgb 5, compat 10) kernels, 10 iterations.
CRF_PARAMS = {"gt_prob": 0.7, "iterations": 10, "gauss_sxy": 3, "gauss_compat": 3,
              "bilateral_sxy": 50, "bilateral_srgb": 5, "bilateral_compat": 10}


def import_densecrf():
    """The dense-CRF modules of the crf extra (pydensecrf2, or pydensecrf): a UserError that names the
    extra when neither is installed, so a caller can check before doing any work."""
    for module in ("pydensecrf2.densecrf", "pydensecrf.densecrf"):
        try:
            dcrf = __import__(module, fromlist=["DenseCRF2D"])
            utils = __import__(module.rsplit(".", 1)[0] + ".utils", fromlist=["unary_from_labels"])
            return dcrf, utils
        except ImportError:
            continue
    raise UserError("dense-CRF refinement needs pydensecrf2, which is not installed; "
                    "pip install -e '.[crf]' in the carbseg checkout (or drop --crf)")


def dense_crf(image: np.ndarray, mask: np.ndarray, num_classes: int, params: dict = CRF_PARAMS) -> np.ndarray:
    """Refine a (H, W) label map on its uint8 RGB image; 255 pixels get a uniform unary and may change."""
    dcrf, utils = import_densecrf()
    h, w = mask.shape
    present = np.unique(mask[mask != IGNORE_INDEX])
    if present.size <= 1:
        return mask
    # Work on the present classes only (index 0 = unsure for unary_from_labels).
    lut = np.zeros(256, dtype=np.int32)
    lut[present] = np.arange(1, present.size + 1)
    compact = lut[mask]
    crf = dcrf.DenseCRF2D(w, h, present.size)
    crf.setUnaryEnergy(utils.unary_from_labels(compact, present.size, gt_prob=params["gt_prob"], zero_unsure=True))
    crf.addPairwiseGaussian(sxy=params["gauss_sxy"], compat=params["gauss_compat"])
    crf.addPairwiseBilateral(sxy=params["bilateral_sxy"], srgb=params["bilateral_srgb"],
                             rgbim=np.ascontiguousarray(image), compat=params["bilateral_compat"])
    q = np.array(crf.inference(params["iterations"])).reshape(present.size, h, w)
    return present[q.argmax(axis=0)].astype(mask.dtype)
