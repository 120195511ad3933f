"""Joint augmentations: sizes, nearest label resizing, cat_max_ratio crops, flips, padding, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from carbseg.config import DataConfig
from carbseg.data.transforms import (
    TrainAugmentation,
    pad_to,
    photometric_distortion,
    random_crop,
    random_crop_window,
    random_flip,
    rescaled_size,
    resize_by_ratio,
    scale_saturation,
    shift_hue,
)


def blocks_mask(h: int, w: int, block: int) -> np.ndarray:
    """Label map of block x block squares with labels 0..k (a checkerboard of several classes)."""
    ys, xs = np.mgrid[0:h, 0:w]
    return ((ys // block) * 3 + (xs // block)).astype(np.uint8) % 7


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rescaled_size_keeps_aspect_and_fits_the_scale():
    assert rescaled_size(360, 480, (720, 960)) == (720, 960)  # CamVid x2: both edges fit exactly
    assert rescaled_size(1024, 2048, (512, 1024)) == (512, 1024)  # Cityscapes at ratio 0.5
    assert rescaled_size(100, 100, (200, 300)) == (200, 200)  # short edge limits


def test_resize_by_ratio_uses_nearest_for_masks():
    mask = blocks_mask(12, 16, 4)
    image = random_image(12, 16)
    rng = np.random.default_rng(0)
    out_image, out_mask = resize_by_ratio(image, mask, (24, 32), (1.0, 1.0), rng)  # ratio 1: exactly x2
    assert out_image.shape == (24, 32, 3) and out_mask.shape == (24, 32)
    assert np.array_equal(out_mask, np.kron(mask, np.ones((2, 2), dtype=np.uint8)))
    # A non-integer factor still invents no label values.
    _, odd = resize_by_ratio(image, mask, (24, 32), (0.7, 0.7), rng)
    assert odd.shape == rescaled_size(12, 16, (int(24 * 0.7), int(32 * 0.7)))
    assert set(np.unique(odd)) <= set(np.unique(mask))


def test_resize_ratio_is_drawn_from_the_range():
    image, mask = random_image(10, 20), blocks_mask(10, 20, 5)
    rng = np.random.default_rng(3)
    widths = [resize_by_ratio(image, mask, (100, 200), (0.5, 2.0), rng)[1].shape[1] for _ in range(50)]
    assert min(widths) >= 100 and max(widths) <= 400 and len(set(widths)) > 10


def test_random_crop_respects_cat_max_ratio():
    # Columns 0-9 class 0, 10-19 class 1, 20-39 class 0; a 20x20 crop at left l has class 0 share
    # 0.5 for l <= 10 and l/20 above, so it is acceptable (<= 0.75) only for l <= 15.
    mask = np.zeros((20, 40), dtype=np.uint8)
    mask[:, 10:20] = 1
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[..., 0] = np.arange(40, dtype=np.uint8)[None, :]  # the crop's left edge is readable from the image
    lefts_checked, lefts_unchecked = set(), set()
    for seed in range(60):
        crop_image, crop_mask = random_crop(
            image, mask, (20, 20), np.random.default_rng(seed), cat_max_ratio=0.75
        )
        counts = np.bincount(crop_mask.ravel(), minlength=2)
        assert counts.max() / counts.sum() <= 0.75
        assert np.array_equal(crop_mask, mask[:, crop_image[0, 0, 0] : crop_image[0, 0, 0] + 20])
        lefts_checked.add(int(crop_image[0, 0, 0]))
        crop_image, _ = random_crop(image, mask, (20, 20), np.random.default_rng(seed), cat_max_ratio=1.0)
        lefts_unchecked.add(int(crop_image[0, 0, 0]))
    assert max(lefts_checked) <= 15
    assert max(lefts_unchecked) > 15  # without the check, bad crops do occur


def test_random_crop_ignores_ignore_pixels_and_clamps_to_small_images():
    mask = np.full((10, 10), 255, dtype=np.uint8)
    mask[:, :3] = 0
    mask[:, 3:6] = 1
    image = random_image(10, 10)
    for seed in range(20):  # an all-ignore crop (left >= 6) has a single "class": never accepted
        _, crop = random_crop(image, mask, (10, 4), np.random.default_rng(seed), cat_max_ratio=0.75)
        valid = crop[crop != 255]
        assert len(np.unique(valid)) == 2
    small_image, small_mask = random_crop(image, mask, (32, 32), np.random.default_rng(0))
    assert small_image.shape == (10, 10, 3) and small_mask.shape == (10, 10)


def test_random_flip_applies_to_both():
    image, mask = random_image(4, 6), blocks_mask(4, 6, 2)
    flipped_image, flipped_mask = random_flip(image, mask, np.random.default_rng(0), prob=1.0)
    assert np.array_equal(flipped_image, image[:, ::-1]) and np.array_equal(flipped_mask, mask[:, ::-1])
    same_image, same_mask = random_flip(image, mask, np.random.default_rng(0), prob=0.0)
    assert same_image is image and same_mask is mask
    flips = [random_flip(image, mask, np.random.default_rng(s))[1][0, 0] != mask[0, 0] for s in range(200)]
    assert 70 < sum(flips) < 130  # about half


def test_photometric_distortion_identity_when_every_range_is_neutral():
    image = random_image(8, 8)
    for seed in range(10):
        out = photometric_distortion(
            image, np.random.default_rng(seed), brightness_delta=0, contrast_range=(1, 1),
            saturation_range=(1, 1), hue_delta=0,
        )  # fmt: skip
        assert np.abs(out.astype(int) - image.astype(int)).max() <= 1  # HSV round trip rounding


def test_photometric_brightness_is_a_constant_shift():
    image = np.full((4, 4, 3), 128, dtype=np.uint8)
    image[0, 0] = (100, 120, 140)
    shifts = set()
    for seed in range(20):
        out = photometric_distortion(
            image, np.random.default_rng(seed), contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0
        ).astype(int)
        delta = out - image.astype(int)
        assert np.all(np.abs(delta - delta[1, 1, 0]) <= 1) and abs(delta[1, 1, 0]) <= 32
        shifts.add(int(delta[1, 1, 0]))
    assert 0 in shifts and len(shifts) > 3  # applied about half of the time, with varying delta


def test_photometric_distortion_is_deterministic_and_grey_stays_grey_under_hue():
    image = random_image(16, 16)
    a = photometric_distortion(image, np.random.default_rng(7))
    b = photometric_distortion(image, np.random.default_rng(7))
    assert a.dtype == np.uint8 and a.shape == image.shape and np.array_equal(a, b)
    assert any(
        not np.array_equal(photometric_distortion(image, np.random.default_rng(s)), image) for s in range(5)
    )
    grey = np.full((2, 2, 3), 90, dtype=np.uint8)
    for seed in range(10):
        out = photometric_distortion(
            grey, np.random.default_rng(seed), brightness_delta=0, contrast_range=(1, 1)
        )
        assert np.all(out == out[0, 0, 0])  # saturation/hue leave grey grey


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.5, 4.0])
def test_scale_saturation_equals_the_hsv_round_trip(alpha):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    image = random_image(32, 32).astype(np.float32)
    image[0, :4] = (90, 90, 90)  # grey: chroma 0
    image[1, :4] = (200, 200, 10)  # two channels tie for the maximum
    hsv = rgb_to_hsv(image / 255.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * alpha, 0, 1)
    np.testing.assert_allclose(scale_saturation(image, alpha), hsv_to_rgb(hsv) * 255.0, atol=1e-3)


@pytest.mark.parametrize("shift", [-18 / 180, -1 / 180, 0.0, 7 / 180, 17 / 180, 0.5])
def test_shift_hue_equals_the_hsv_round_trip(shift):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    image = random_image(32, 32).astype(np.float32)
    image[0, :4] = (90, 90, 90)
    image[1, :4] = (200, 200, 10)
    image[2, :4] = (10, 200, 200)
    hsv = rgb_to_hsv(image / 255.0)
    hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
    np.testing.assert_allclose(shift_hue(image, shift), hsv_to_rgb(hsv) * 255.0, atol=1e-3)


def test_pad_to_fills_ignore_and_marks_padding_invalid():
    image, mask = random_image(3, 5), blocks_mask(3, 5, 2)
    out_image, out_mask, valid = pad_to(image, mask, (4, 8))
    assert out_image.shape == (4, 8, 3) and out_mask.shape == (4, 8) and valid.shape == (4, 8)
    assert (
        np.array_equal(out_image[:3, :5], image)
        and np.all(out_image[3:] == 0)
        and np.all(out_image[:, 5:] == 0)
    )
    assert (
        np.array_equal(out_mask[:3, :5], mask)
        and np.all(out_mask[3:] == 255)
        and np.all(out_mask[:, 5:] == 255)
    )
    assert valid.sum() == 15 and valid[:3, :5].all()
    same_image, same_mask, all_valid = pad_to(image, mask, (2, 2))
    assert same_image.shape == image.shape and all_valid.all()


def test_train_augmentation_shapes_labels_and_determinism():
    cfg = DataConfig(scale_size=[48, 64], ratio_range=[0.5, 2.0], crop_size=[32, 40], cat_max_ratio=0.75)
    augment = TrainAugmentation(cfg)
    image, mask = random_image(48, 64), blocks_mask(48, 64, 8)
    mask[:4] = 255
    first = augment(image, mask, np.random.default_rng(5))
    again = augment(image, mask, np.random.default_rng(5))
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    seen_padding = False
    for seed in range(15):
        out_image, out_mask, valid = augment(image, mask, np.random.default_rng(seed))
        assert out_image.shape == (32, 40, 3) and out_image.dtype == np.uint8
        assert out_mask.shape == (32, 40) and out_mask.dtype == np.uint8 and valid.dtype == bool
        assert set(np.unique(out_mask)) <= set(np.unique(mask))
        assert np.all(out_mask[~valid] == 255)
        seen_padding |= not valid.all()  # ratio 0.5 gives 24x32 images, smaller than the crop
    assert seen_padding
    different = augment(image, mask, np.random.default_rng(6))
    assert not np.array_equal(different[0], first[0])


@pytest.mark.parametrize("flag", ["flip", "photometric"])
def test_train_augmentation_switches(flag):
    cfg = DataConfig(scale_size=[16, 16], ratio_range=[1.0, 1.0], crop_size=[16, 16], cat_max_ratio=1.0)
    cfg.flip = False
    cfg.photometric = False
    image, mask = random_image(16, 16), blocks_mask(16, 16, 4)
    out_image, out_mask, _ = TrainAugmentation(cfg)(image, mask, np.random.default_rng(0))
    assert np.array_equal(out_image, image) and np.array_equal(out_mask, mask)  # everything off: identity
    setattr(cfg, flag, True)
    changed = [
        not np.array_equal(TrainAugmentation(cfg)(image, mask, np.random.default_rng(s))[0], image)
        for s in range(8)
    ]
    assert any(changed)


@pytest.mark.parametrize(("image_hw", "cat_max_ratio"), [((60, 90), 0.75), ((60, 90), 1.0), ((20, 30), 0.75)])
def test_an_image_without_a_mask_gets_the_views_of_an_all_ignore_mask(image_hw, cat_max_ratio):
    """A teacher that reads only pixels needs no mask: none is made, and the views drawn are exactly
    those of an all-ignore mask (whose every crop is redrawn up to CROP_TRIES times)."""
    cfg = DataConfig(scale_size=[48, 96], ratio_range=[0.5, 2.0], crop_size=[32, 64], cat_max_ratio=cat_max_ratio)
    augmentation = TrainAugmentation(cfg)
    image = np.random.default_rng(0).integers(0, 256, (*image_hw, 3), dtype=np.uint8)
    all_ignore = np.full(image_hw, 255, dtype=np.uint8)
    for seed in range(12):
        with_mask = augmentation.with_frame(image, all_ignore, np.random.default_rng(seed))
        without = augmentation.with_frame(image, None, np.random.default_rng(seed))
        assert without[1] is None and (with_mask[1] == 255).all()
        assert np.array_equal(with_mask[0], without[0]) and np.array_equal(with_mask[2], without[2])
        assert with_mask[3] == without[3]  # the same place in the frame


def test_rescaled_size_when_the_long_edge_limits():
    # 100 x 400 into (200, 300): long side 400 -> 300 (x0.75) binds before short 100 -> 200 (x2).
    assert rescaled_size(100, 400, (200, 300)) == (75, 300)


def test_images_resize_bilinearly_and_by_the_ratio_on_both_axes():
    image = np.repeat(np.array([[0, 100]], dtype=np.uint8)[:, :, None], 3, axis=2)
    out, _ = resize_by_ratio(image, np.zeros((1, 2), np.uint8), (1, 4), (2.0, 2.0), np.random.default_rng(0))
    # Ratio 2 on both axes: scale (2, 8), aspect 1:2 kept -> 2 x 4 (x2); bilinear, not bicubic
    # (which overshoots to 0, 21, 79, 109).
    assert out.shape == (2, 4, 3)
    assert out[..., 0].tolist() == [[0, 25, 75, 100]] * 2


def _draws(seed: int, rows: int, cols: int, n: int = 11) -> list[tuple[int, int]]:
    """The (top, left) positions random_crop_window draws in turn from ``seed``."""
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, rows)), int(rng.integers(0, cols))) for _ in range(n)]


@pytest.mark.parametrize("seed", range(8))
def test_random_crop_retries_single_class_windows_by_the_draw_sequence(seed):
    # Row 0 0 0 1 1 1, 1x2 crops: only left = 2 holds two classes (0.5 <= 0.75); every other window
    # holds one class and is retried (up to 10 times, then the last draw is kept).
    mask = np.array([[0, 0, 0, 1, 1, 1]], dtype=np.uint8)
    lefts = [left for _, left in _draws(seed, 1, 5)]
    expected = next((left for left in lefts if left == 2), lefts[-1])
    assert random_crop_window(mask, (1, 2), np.random.default_rng(seed)) == (0, expected, 1, 2)  # default 0.75
    # cat_max_ratio 1 switches the check off: the first draw is kept.
    assert random_crop_window(mask, (1, 2), np.random.default_rng(seed), cat_max_ratio=1.0) == (0, lefts[0], 1, 2)
    # Ignored pixels are no class: with class 0 ignored no window has two classes.
    image = np.arange(6, dtype=np.uint8).reshape(1, 6, 1).repeat(3, axis=2)
    cut_image, cut_mask = random_crop(image, mask, (1, 2), np.random.default_rng(seed), ignore_index=0)
    assert cut_image[0, :, 0].tolist() == [lefts[-1], lefts[-1] + 1]
    assert cut_mask.tolist() == mask[:, lefts[-1]: lefts[-1] + 2].tolist()


def test_random_crop_accepts_a_class_of_one_pixel():
    # Two 1-pixel classes: share 0.5 on the first draw, nothing to retry.
    mask = np.array([[3, 4]], dtype=np.uint8)
    assert random_crop_window(mask, (1, 2), np.random.default_rng(0)) == (0, 0, 1, 2)
    assert random_crop_window(np.array([[3, 255]], np.uint8), (1, 2), np.random.default_rng(0),
                              cat_max_ratio=0.75) == (0, 0, 1, 2)  # one class only, every retry the same


def test_saturation_cap_holds_for_dark_pixels_under_one_grey_level():
    # V = chroma = 0.9: saturation is already 1, so alpha 1.5 cannot move the channels.
    pixel = np.array([[[0.0, 0.0, 0.9]]], dtype=np.float32)
    np.testing.assert_allclose(scale_saturation(pixel, 1.5), pixel, atol=1e-6)


def test_shift_hue_keeps_the_hue_of_a_colour_with_chroma_below_one():
    pixel = np.array([[[0.5, 0.25, 0.0]]], dtype=np.float32)  # hue 30 degrees, chroma 0.5
    np.testing.assert_allclose(shift_hue(pixel, 0.0), pixel, atol=1e-6)
    np.testing.assert_allclose(shift_hue(pixel, 1 / 6), [[[0.25, 0.5, 0.0]]], atol=1e-6)  # 90 degrees


def _reference_photometric(image, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """mmseg's PhotoMetricDistortion step by step, draws in its order, float between steps."""
    img = image.astype(np.float32)
    if rng.integers(2):
        img = np.clip(img + rng.uniform(-brightness_delta, brightness_delta), 0, 255)
    mode = rng.integers(2)  # 1: contrast first, 0: contrast last
    if mode == 1 and rng.integers(2):
        img = np.clip(img * rng.uniform(*contrast_range), 0, 255)
    if rng.integers(2):
        img = scale_saturation(img, rng.uniform(*saturation_range))
    if rng.integers(2):
        img = shift_hue(img, (rng.integers(-hue_delta, hue_delta) if hue_delta > 0 else 0) / 180.0)
    if mode == 0 and rng.integers(2):
        img = np.clip(img * rng.uniform(*contrast_range), 0, 255)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kwargs", [{}, {"hue_delta": 1}, {"brightness_delta": 100, "contrast_range": (0.2, 3.0)}])
def test_photometric_distortion_equals_the_step_by_step_reference(kwargs):
    # Black, white, saturated and mid pixels, so every clip and every step shows.
    image = random_image(6, 6, seed=1)
    image[0, :3] = 0
    image[1, :3] = 255
    image[2, :3] = (250, 5, 120)
    for seed in range(40):
        out = photometric_distortion(image, np.random.default_rng(seed), **kwargs)
        ref = _reference_photometric(image, np.random.default_rng(seed), **kwargs)
        assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1, seed
        assert np.mean(out != ref) < 0.05  # float rounding only, at a few pixels


def test_train_augmentation_flips_image_and_mask_together_about_half_the_time_and_pads_with_its_ignore():
    cfg = DataConfig(scale_size=[4, 6], ratio_range=[1.0, 1.0], crop_size=[5, 6], cat_max_ratio=1.0)
    cfg.photometric = False
    columns = np.tile(np.arange(6, dtype=np.uint8), (4, 1))
    image = np.repeat(columns[:, :, None], 3, axis=2)
    augment = TrainAugmentation(cfg, ignore_index=200)
    flips = 0
    for seed in range(20):
        out_image, out_mask, valid = augment(image, columns, np.random.default_rng(seed))
        assert np.array_equal(out_image[..., 0][valid], out_mask[valid])  # still aligned
        assert out_mask[4].tolist() == [200] * 6 and not valid[4].any()  # padding row: its ignore index
        flips += out_mask[0, 0] == 5
    assert 4 <= flips <= 16


def test_train_augmentation_crops_with_its_own_ignore_index_and_cat_max_ratio():
    # Constant-scale 1x6 frame, crop 1x2: the window is random_crop_window's with the same settings.
    cfg = DataConfig(scale_size=[1, 6], ratio_range=[1.0, 1.0], crop_size=[1, 2], cat_max_ratio=0.75)
    cfg.flip = cfg.photometric = False
    mask = np.array([[0, 0, 0, 1, 1, 1]], dtype=np.uint8)
    image = np.arange(6, dtype=np.uint8).reshape(1, 6, 1).repeat(3, axis=2)
    for ignore in (0, 255):
        for seed in range(6):
            rng = np.random.default_rng(seed)
            rng.uniform(1.0, 1.0)  # the resize ratio's draw
            _, left, _, _ = random_crop_window(mask, (1, 2), rng, 0.75, ignore)
            out_image, _, _ = TrainAugmentation(cfg, ignore_index=ignore)(image, mask, np.random.default_rng(seed))
            assert out_image[0, :, 0].tolist() == [left, left + 1]
