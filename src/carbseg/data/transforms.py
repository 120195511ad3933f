"""Joint image + label-map augmentations for training (the authors' mmsegmentation pipeline).

Resize by a random ratio (keep aspect) -> random crop (at most ``cat_max_ratio`` of one class) ->
horizontal flip -> photometric distortion -> pad with ignore. Images are uint8 (H, W, 3) RGB, label
maps uint8 (H, W); images resize bilinearly, label maps with nearest (no new label values).

Every random draw comes from a ``numpy.random.Generator`` passed in by the caller: the trainer
seeds one per sample from (seed, iteration, ...) so a resumed run draws exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from carbseg.config import DataConfig
from carbseg.data import frames
from carbseg.data.classes import IGNORE_INDEX

CROP_TRIES = 10


def rescaled_size(height: int, width: int, scale_hw: Sequence[float]) -> tuple[int, int]:
    """(h, w) of an image rescaled, aspect kept, to fit inside ``scale_hw`` (mmcv's ``imrescale``):
    the long side fits the long edge of the scale and the short side its short edge."""
    long_edge, short_edge = max(scale_hw), min(scale_hw)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_to(image: np.ndarray, mask: np.ndarray | None, size_hw: tuple[int, int]):
    """Image bilinear, mask nearest, to (h, w)."""
    h, w = size_hw
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return image, mask


def resize_by_ratio(
    image: np.ndarray,
    mask: np.ndarray | None,
    scale_hw: Sequence[int],
    ratio_range: Sequence[float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """mmseg ``Resize(img_scale=scale, ratio_range=..., keep_ratio=True)``.

    ``scale_hw`` is (h, w), e.g. Cityscapes (1024, 2048) (mmseg writes the same scale as (w, h));
    a ratio r ~ U[ratio_range) multiplies it and the image is rescaled, aspect kept, to fit into
    (r*h, r*w).
    """
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    target = (int(scale_hw[0] * ratio), int(scale_hw[1] * ratio))
    return resize_to(image, mask, rescaled_size(image.shape[0], image.shape[1], target))


def random_crop_window(
    mask: np.ndarray | None,
    crop_hw: Sequence[int],
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
    size_hw: Sequence[int] | None = None,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop (smaller when the image is smaller), retried up to 10 times
    until the largest class covers <= ``cat_max_ratio`` of the crop's labelled pixels (mmseg's
    ``RandomCrop``; a crop with a single class is retried too). ``cat_max_ratio >= 1`` disables the check.

    ``mask`` None: no labels at all (an image of ``size_hw``), drawn exactly as an all-ignore mask
    is -- every try redrawn -- without making one."""
    height, width = mask.shape if mask is not None else (int(size_hw[0]), int(size_hw[1]))

    def draw() -> tuple[int, int, int, int]:
        h, w = min(crop_hw[0], height), min(crop_hw[1], width)
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return top, left, h, w

    top, left, h, w = draw()
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            if mask is not None:
                window = mask[top : top + h, left : left + w]
                counts = np.bincount(window.ravel(), minlength=256)
                counts[ignore_index] = 0
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() <= cat_max_ratio:
                    break
            top, left, h, w = draw()
    return top, left, h, w


def random_crop(
    image: np.ndarray,
    mask: np.ndarray,
    crop_hw: Sequence[int],
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask cut at ``random_crop_window``."""
    top, left, h, w = random_crop_window(mask, crop_hw, rng, cat_max_ratio, ignore_index)
    return image[top : top + h, left : left + w], mask[top : top + h, left : left + w]


def random_flip(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of image and mask together with probability ``prob``."""
    if rng.random() < prob:
        return image[:, ::-1], mask[:, ::-1]
    return image, mask


def scale_saturation(image: np.ndarray, alpha: float) -> np.ndarray:
    """HSV saturation times ``alpha`` (clipped to 1) with hue and value kept, on float RGB (H, W, 3).

    Without a trip through HSV: a channel is c = V - S*V*k(H), so scaling S moves every channel
    towards (alpha < 1) or away from (alpha > 1) the value V = max(R, G, B) by the same factor; the
    clip S' <= 1 caps the factor at V / (V - min). Equal to the HSV round trip up to float error,
    and several times faster (this ran on every training sample).
    """
    v = image.max(axis=-1, keepdims=True)
    chroma = v - image.min(axis=-1, keepdims=True)
    factor = np.minimum(np.float32(alpha), v / np.maximum(chroma, np.float32(1e-12)))
    return v - factor * (v - image)


def shift_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """HSV hue rotated by ``shift`` turns (value and saturation kept), on float RGB (H, W, 3)."""
    v = image.max(axis=-1)
    chroma = v - image.min(axis=-1)
    safe = np.where(chroma > 0, chroma, np.float32(1))  # grey pixels: any hue, chroma 0 keeps them grey
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    sector = np.where(v == b, (r - g) / safe + 4, np.where(v == g, (b - r) / safe + 2, (g - b) / safe))
    hue6 = ((sector / 6 + np.float32(shift)) % 1.0 * 6)[..., None]  # hue in sixths of a turn
    # HSV -> RGB: channel = V - C * clip(min(n, 4 - n), 0, 1), n = (k + 6H) mod 6, k = 5, 3, 1 for R, G, B.
    n = (np.array([5, 3, 1], dtype=np.float32) + hue6) % 6
    return v[..., None] - chroma[..., None] * np.clip(np.minimum(n, 4 - n), 0, 1)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: float = 32,
    contrast_range: Sequence[float] = (0.5, 1.5),
    saturation_range: Sequence[float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion``: each step applied with probability 1/2, in this order:
    brightness (+delta), contrast (*alpha) either first or last (a coin decides), saturation
    (*alpha in HSV), hue (shift in OpenCV's 0..180 hue units, i.e. 2 degrees each).

    Values are clipped to 0..255 after every step as in mmseg, but kept in float until the end
    (mmseg rounds to uint8 between steps; the difference is below one grey level per step).
    """
    img = image.astype(np.float32)
    if rng.integers(2):
        img = np.clip(img + rng.uniform(-brightness_delta, brightness_delta), 0, 255)
    contrast_first = bool(rng.integers(2))

    def contrast(x: np.ndarray) -> np.ndarray:
        if rng.integers(2):
            x = np.clip(x * rng.uniform(contrast_range[0], contrast_range[1]), 0, 255)
        return x

    if contrast_first:
        img = contrast(img)
    if rng.integers(2):
        img = scale_saturation(img, rng.uniform(saturation_range[0], saturation_range[1]))
    if rng.integers(2):
        # mmseg draws randint(-delta, delta) in OpenCV hue units (1/180 of a turn).
        shift = (int(rng.integers(-hue_delta, hue_delta)) if hue_delta > 0 else 0) / 180.0
        img = shift_hue(img, shift)
    if not contrast_first:
        img = contrast(img)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def pad_to(
    image: np.ndarray, mask: np.ndarray | None, crop_hw: Sequence[int], ignore_index: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Pad bottom/right to at least ``crop_hw`` (image 0, mask ``ignore_index``) -> (image, mask, valid),
    ``valid`` False on the padding, so the teacher's labels there can be ignored too (mask None: none)."""
    h, w = image.shape[:2]
    ph, pw = max(crop_hw[0] - h, 0), max(crop_hw[1] - w, 0)
    valid = np.ones((h, w), dtype=bool)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        if mask is not None:
            mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=ignore_index)
        valid = np.pad(valid, ((0, ph), (0, pw)), constant_values=False)
    return image, mask, valid


class TrainAugmentation:
    """The training pipeline of ``DataConfig``: resize by ratio, crop, flip, photometric, pad."""

    def __init__(self, cfg: DataConfig, ignore_index: int = IGNORE_INDEX):
        self.scale_hw = tuple(cfg.scale_size)
        self.ratio_range = tuple(cfg.ratio_range)
        self.crop_hw = tuple(cfg.crop_size)  # (h, w)
        self.cat_max_ratio = cfg.cat_max_ratio
        self.flip = cfg.flip
        self.photometric = cfg.photometric
        self.ignore_index = ignore_index

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image, mask, valid, _ = self.with_frame(image, mask, rng)
        return image, mask, valid

    def with_frame(
        self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, tuple[float, ...]]:
        """The augmented (image, mask, valid) and where the view lies in the original frame
        (``carbseg.data.frames``: y_scale, y_offset, x_scale, x_offset). Same draws as ``__call__``.

        ``mask`` None: an image without labels (a teacher that reads only pixels): the same view as
        with an all-ignore mask, which is never made (it was resized, cropped and padded for nothing);
        the returned mask is None."""
        frame = frames.IDENTITY
        original_hw = image.shape[:2]
        image, mask = resize_by_ratio(image, mask, self.scale_hw, self.ratio_range, rng)
        frame = frames.resized(frame, original_hw, image.shape[:2])
        top, left, h, w = random_crop_window(mask, self.crop_hw, rng, self.cat_max_ratio, self.ignore_index,
                                             size_hw=image.shape[:2])
        image = image[top : top + h, left : left + w]
        mask = None if mask is None else mask[top : top + h, left : left + w]
        frame = frames.cropped(frame, top, left)
        if self.flip and rng.random() < 0.5:  # the one draw of random_flip(prob=0.5)
            image, mask = image[:, ::-1], (None if mask is None else mask[:, ::-1])
            frame = frames.flipped(frame, image.shape[1])
        if self.photometric:
            image = photometric_distortion(image, rng)
        image, mask, valid = pad_to(image, mask, self.crop_hw, self.ignore_index)
        return np.ascontiguousarray(image), None if mask is None else np.ascontiguousarray(mask), valid, frame

