"""Pictures: exact colours of colorize / overlay / error_map, and grid / legend geometry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from carbseg.data.classes import SYNTHETIC
from carbseg.visualize import (
    CORRECT_COLOR,
    IGNORE_COLOR,
    WRONG_COLOR,
    colorize,
    error_map,
    legend,
    make_grid,
    overlay,
    save_png,
)


def test_colorize_uses_palette_and_black_for_ignore():
    mask = np.array([[0, 255], [13, 1]], np.uint8)
    out = colorize(mask, SYNTHETIC)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [128, 64, 128]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[1, 0].tolist() == [0, 0, 142]
    assert out[1, 1].tolist() == [244, 35, 232]


def test_overlay_blends_and_keeps_ignored_pixels():
    image = np.full((1, 3, 3), 100, np.uint8)
    mask = np.array([[0, 255, 13]], np.uint8)
    out = overlay(image, mask, SYNTHETIC, alpha=0.5)
    # road (128, 64, 128): 0.5 * 100 + 0.5 * 128 = 114, 0.5 * 100 + 0.5 * 64 = 82; car (0, 0, 142) -> 121
    assert out[0].tolist() == [[114, 82, 114], [100, 100, 100], [50, 50, 121]]
    out = overlay(image, mask, SYNTHETIC, alpha=0.25)
    assert out[0, 0].tolist() == [107, 91, 107]


def test_error_map_colours():
    pred = np.array([[0, 1], [2, 3]], np.uint8)
    gt = np.array([[0, 2], [255, 3]], np.uint8)
    out = error_map(pred, gt)
    assert out[0, 0].tolist() == list(CORRECT_COLOR)
    assert out[0, 1].tolist() == list(WRONG_COLOR) == [255, 0, 0]
    assert out[1, 0].tolist() == list(IGNORE_COLOR) == [0, 0, 0]
    assert out[1, 1].tolist() == list(CORRECT_COLOR)


def test_make_grid_layout_and_resizing():
    a = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    b = np.full((20, 10, 3), 7, np.uint8)
    c = np.full((10, 10), 200, np.uint8)  # gray pictures become RGB
    grid = make_grid([[a, b], [c]], pad=2)
    # Every picture is scaled to the tallest height (20): a -> 20x40, c -> 20x20; columns 40 and 10 wide.
    assert grid.shape == (2 * 20 + 3 * 2, 40 + 10 + 3 * 2, 3)
    np.testing.assert_array_equal(grid[2:22, 2:42], np.repeat(np.repeat(a, 2, 0), 2, 1))
    np.testing.assert_array_equal(grid[2:22, 44:54], b)
    np.testing.assert_array_equal(grid[24:44, 12:32], np.full((20, 20, 3), 200, np.uint8))  # centred in column 0
    assert (grid[24:44, 2:12] == 255).all()
    titled = make_grid([[a, b], [c]], titles=["image", "mask"], pad=2)
    assert titled.shape[1] == grid.shape[1] and titled.shape[0] > grid.shape[0]
    band = titled.shape[0] - grid.shape[0]
    np.testing.assert_array_equal(titled[band:], grid)
    assert (titled[:band] < 128).any()  # the title text is drawn


def test_legend_lists_present_classes():
    panel = legend(SYNTHETIC, present=[13, 0, 13])
    assert panel.dtype == np.uint8 and panel.shape[0] == 4 + 2 * (14 + 4)
    assert panel[4 + 7, 4 + 7].tolist() == [128, 64, 128]  # road swatch first (ascending order)
    assert panel[4 + 18 + 7, 4 + 7].tolist() == [0, 0, 142]
    assert legend(SYNTHETIC).shape[0] == 4 + SYNTHETIC.num_classes * 18


def test_save_png_round_trip(tmp_path):
    picture = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    save_png(tmp_path / "sub" / "p.png", picture)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "p.png")), picture)
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "f.png", picture.astype(np.float32))


def test_overlay_with_legend_names_the_classes_it_shows():
    from carbseg.visualize import overlay_with_legend

    image = np.full((40, 30, 3), 100, np.uint8)
    mask = np.zeros((40, 30), np.uint8)
    mask[20:] = 13
    mask[:5] = 255
    out = overlay_with_legend(image, mask, SYNTHETIC)
    np.testing.assert_array_equal(out[:40, :30], overlay(image, mask, SYNTHETIC))
    key = legend(SYNTHETIC, [0, 13], max_height=40)
    assert out.shape == (40, 30 + 4 + key.shape[1], 3)
    np.testing.assert_array_equal(out[: key.shape[0], 34:], key)
    assert key[4 + 7, 4 + 7].tolist() == [128, 64, 128] and key[4 + 18 + 7, 4 + 7].tolist() == [0, 0, 142]
    # A video's frames: every class, in columns no taller than the frame, even sizes for the encoder.
    frame = overlay_with_legend(image[:39, :29], mask[:39, :29], SYNTHETIC, all_classes=True, even=True)
    assert frame.shape[0] == 40 and frame.shape[1] % 2 == 0
    assert legend(SYNTHETIC, max_height=40).shape[0] <= 40


def test_error_key_shows_the_three_error_map_colours():
    from carbseg.visualize import error_key

    key = error_key()
    assert [key[4 + 18 * row + 7, 4 + 7].tolist() for row in range(3)] == [
        list(CORRECT_COLOR), list(WRONG_COLOR), list(IGNORE_COLOR)]


def test_overlay_legend_grows_with_a_large_picture():
    from carbseg.visualize import LEGEND_REFERENCE_HEIGHT, legend_scale, overlay_with_legend

    assert legend_scale(360) == 1.0 and legend_scale(4 * LEGEND_REFERENCE_HEIGHT) == 4.0
    height = 4 * LEGEND_REFERENCE_HEIGHT
    image = np.full((height, 8, 3), 100, np.uint8)
    mask = np.zeros((height, 8), np.uint8)
    mask[height // 2:] = 13
    out = overlay_with_legend(image, mask, SYNTHETIC)
    # At 4x: 16 px padding (also between picture and legend), 56 px swatches, rows 72 px apart.
    x0 = 8 + 16
    key = out[:, x0:]
    assert key[16 + 28, 16 + 28].tolist() == [128, 64, 128]  # road swatch, centre
    assert key[16 + 72 + 28, 16 + 28].tolist() == [0, 0, 142]  # car swatch one 72 px row lower
    assert key[16 + 6, 16 + 55 - 6].tolist() == [128, 64, 128]  # inside the 56 px swatch and its 4 px outline
    # The names are drawn at 4x the base text size: the road label's ink spans > 20 px in height.
    text = key[16:16 + 56, 16 + 56 + 16:] < 128
    rows = np.flatnonzero(text.any(axis=(1, 2)))
    assert rows.size and rows[-1] - rows[0] > 20
    # A picture no taller than the reference keeps the base legend.
    small = overlay_with_legend(image[:40], mask[:40], SYNTHETIC)
    np.testing.assert_array_equal(small[:4 + 18, 8 + 4:], legend(SYNTHETIC, [0], max_height=40)[:22])
