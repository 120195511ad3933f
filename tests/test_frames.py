"""Frame maps: where a view's pixels lie in the frame it was cut from, computed by hand per axis."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from carbseg.data.frames import (
    IDENTITY,
    FrameMaps,
    cell_centres_in_frame,
    cropped,
    flipped,
    frame_key,
    resized,
    view_from_frame,
)


def test_frame_key_is_the_low_63_bits_of_the_ids_blake2b_digest():
    for image_id in ("a", "frankfurt_000000_000294", "ünïcode"):
        digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
        assert frame_key(image_id) == int.from_bytes(digest, "little") % 2**63
    # Pinned: the key seeds the simulated teacher's noise, so it must never change between releases.
    assert frame_key("a") == 3405396810240292928
    keys = [frame_key(f"id-{i}") for i in range(64)]
    assert all(0 <= k < 2**63 for k in keys)
    assert max(keys) >= 2**62  # the 63rd bit is kept (a mask one bit short would lose it)


def test_resize_crop_and_flip_act_on_each_axis_separately():
    # Rows 120 -> 40 (factor 3), columns 100 -> 50 (factor 2); the offsets stay.
    m = resized((1.0, 4.0, 1.0, 6.0), (120, 100), (40, 50))
    assert m == (3.0, 4.0, 2.0, 6.0)
    # Cut at top 5, left 7: view 0 is frame 4 + 3 * 5 = 19 (rows) and 6 + 2 * 7 = 20 (columns).
    m = cropped(m, 5, 7)
    assert m == (3.0, 19.0, 2.0, 20.0)
    # Flip a 10-wide view: view x = 0 is the old x = 10, frame 20 + 2 * 10 = 40, running leftwards.
    m = flipped(m, 10)
    assert m == (3.0, 19.0, -2.0, 40.0)
    # A crop after the flip moves leftwards in the frame.
    assert cropped(m, 1, 3) == (3.0, 22.0, -2.0, 34.0)


def test_frame_maps_methods_equal_the_functions_on_every_row_and_keep_the_keys():
    maps = FrameMaps(torch.tensor([11, 22]), torch.tensor([IDENTITY, (2.0, 1.0, -3.0, 50.0)], dtype=torch.float64))
    zoomed = maps.zoomed(4, 6, (10, 20), (25, 40))  # cut at (4, 6), rows x2.5, columns x2
    assert zoomed.keys.tolist() == [11, 22] and zoomed.affine.dtype == torch.float64
    assert zoomed.affine.tolist() == [[0.4, 4.0, 0.5, 6.0], [0.8, 9.0, -1.5, 32.0]]
    assert maps.flipped(8).affine.tolist() == [[1.0, 0.0, -1.0, 8.0], [2.0, 1.0, 3.0, 26.0]]
    assert maps.cropped(2, 5).affine.tolist() == [[1.0, 2.0, 1.0, 5.0], [2.0, 5.0, -3.0, 35.0]]
    assert maps.flipped(8).keys.tolist() == maps.cropped(2, 5).keys.tolist() == [11, 22]
    # float64 throughout: a float32 offset of a large frame is off by a pixel fraction after a few steps.
    assert maps.flipped(8).affine.dtype == maps.cropped(2, 5).affine.dtype == torch.float64
    whole = FrameMaps.whole_frames(["a", "b", "c"])
    assert whole.affine.dtype == torch.float64 and whole.affine.tolist() == [list(IDENTITY)] * 3
    assert whole.keys.dtype == torch.int64 and whole.keys.tolist() == [frame_key(i) for i in "abc"]


def test_cell_centres_and_their_inverse():
    affine = (2.0, 10.0, -0.5, 30.0)
    ys, xs = cell_centres_in_frame(affine, (2, 3), 4)
    # Cell centres in the view: rows 2, 6 and columns 2, 6, 10 (cells of 4 px).
    assert ys.tolist() == [14.0, 22.0] and xs.tolist() == [29.0, 27.0, 25.0]
    vy, vx = view_from_frame(affine, ys, xs)
    assert vy.tolist() == [2.0, 6.0] and vx.tolist() == [2.0, 6.0, 10.0]
    vy, vx = view_from_frame(affine, np.array([10.0]), np.array([31.0]))
    assert (vy.item(), vx.item()) == pytest.approx((0.0, -2.0))
