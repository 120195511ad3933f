"""Frame maps and persistent teacher noise: the same region keeps its error in every view.

The simulated teacher lays its noise on the original frame; these tests check that a flipped view,
a grid-aligned crop and a shifted crop repeat the frame's errors, that the frame maps of the
augmentation place every view pixel where it came from, and that labels do not depend on the process.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from carbseg.config import DataConfig
from carbseg.data.classes import ClassSet
from carbseg.data.frames import IDENTITY, FrameMaps, cropped, flipped, frame_key, resized
from carbseg.data.transforms import TrainAugmentation
from carbseg.teacher.persistence import PersistenceCount, error_persistence
from carbseg.teacher.simulated import SimulatedTeacher

NAMES = ["road", "sidewalk", "building", "wall", "pole", "traffic sign", "car", "truck"]
CLASSES = ClassSet(name="test", names=tuple(NAMES), text_names=tuple(NAMES),
                   palette=tuple((10 * i, 20 * i, 30 * i) for i in range(len(NAMES))))


def _scene(h: int = 96, w: int = 128, seed: int = 0) -> torch.Tensor:
    """A blocky train-id map with every class of NAMES present."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, len(NAMES), (h // 16, w // 16))
    gt = np.kron(coarse, np.ones((16, 16), dtype=np.int64))
    gt[:, 40:43] = NAMES.index("pole")  # a thin object
    return torch.from_numpy(gt).long()


def _labels(gt: torch.Tensor) -> torch.Tensor:
    labels = torch.zeros(len(NAMES), dtype=torch.bool)
    labels[gt.unique()] = True
    return labels


def test_frame_map_algebra_by_hand():
    # Resize 100 -> 50 rows and 80 -> 40 columns: view edge 10 is frame edge 20.
    m = resized(IDENTITY, (100, 80), (50, 40))
    assert m == (2.0, 0.0, 2.0, 0.0)
    # Crop at (5, 7) of the resized view: view 0 is frame 10 (rows) and 14 (columns).
    m = cropped(m, 5, 7)
    assert m == (2.0, 10.0, 2.0, 14.0)
    # Flip a 30-wide view: view x = 0 (left edge) is the old x = 30, i.e. frame 2 * 30 + 14 = 74.
    m = flipped(m, 30)
    assert m == (2.0, 10.0, -2.0, 74.0)
    keys = FrameMaps.whole_frames(["a", "b"])
    assert keys.keys.tolist() == [frame_key("a"), frame_key("b")] and frame_key("a") != frame_key("b")
    zoomed = keys.zoomed(8, 4, (16, 32), (32, 64))  # cut at (8, 4), zoomed 2x
    assert zoomed.affine[0].tolist() == [0.5, 8.0, 0.5, 4.0]


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_frame_map_places_every_view_pixel_where_it_came_from(seed):
    h, w = 60, 90
    rows = np.repeat(np.arange(h, dtype=np.uint8)[:, None], w, axis=1)
    cols = np.repeat(np.arange(w, dtype=np.uint8)[None, :], h, axis=0)
    image = np.zeros((h, w, 3), np.uint8)
    cfg = DataConfig(scale_size=[60, 90], ratio_range=[0.7, 1.6], crop_size=[40, 50], cat_max_ratio=1.0,
                     flip=True, photometric=False)
    augment = TrainAugmentation(cfg)
    _, view_rows, valid, frame = augment.with_frame(image, rows, np.random.default_rng(seed))
    _, view_cols, _, frame_again = augment.with_frame(image, cols, np.random.default_rng(seed))
    assert frame == frame_again
    ay, by, ax, bx = frame
    ys, xs = np.nonzero(valid)
    frame_y = ay * (ys + 0.5) + by
    frame_x = ax * (xs + 0.5) + bx
    # Nearest resampling takes the frame pixel whose span holds the mapped centre (to within a pixel).
    assert np.abs(frame_y - (view_rows[ys, xs] + 0.5)).max() <= 1.0
    assert np.abs(frame_x - (view_cols[ys, xs] + 0.5)).max() <= 1.0
    # The draws are those of __call__: same image, mask and validity.
    plain = augment(image, rows, np.random.default_rng(seed))
    assert np.array_equal(plain[1], view_rows) and np.array_equal(plain[2], valid)


def test_simulated_noise_persists_in_flipped_and_grid_aligned_views():
    teacher = SimulatedTeacher(CLASSES, patch_size=16, noise=0.6, seed=3)
    gt = _scene()
    labels = _labels(gt)[None]
    frame = FrameMaps.whole_frames(["frame-1"])
    whole = teacher(torch.zeros(1, 3, *gt.shape), labels, gt=gt[None], frames=frame)[0]
    assert (whole != gt).float().mean() > 0.05  # the noise is there at all
    # A flipped view (width a multiple of the grid): exactly the flipped labels.
    flip = teacher(torch.zeros(1, 3, *gt.shape), labels, gt=gt.flip(-1)[None],
                   frames=frame.flipped(gt.shape[1]))[0]
    assert torch.equal(flip.flip(-1), whole)
    # A crop aligned with the grid: exactly the frame's labels on the overlap, away from the crop's
    # border by the largest bleeding displacement (3 steps x 0.5 x 16 px = 24 px; a crop cannot read
    # labels from beyond its border).
    big = _scene(160, 192)
    big_labels = _labels(big)[None]
    big_frame = teacher(torch.zeros(1, 3, 160, 192), big_labels, gt=big[None], frames=frame)[0]
    crop = teacher(torch.zeros(1, 3, 112, 128), big_labels, gt=big[None, 32:144, 48:176],
                   frames=frame.cropped(32, 48))[0]
    assert torch.equal(crop[32:-32, 32:-32], big_frame[64:112, 80:144])
    assert (crop != big[32:144, 48:176]).float().mean() > 0.05


def test_simulated_teacher_repeats_most_errors_when_shifted_and_per_view_noise_does_not():
    teacher = SimulatedTeacher(CLASSES, patch_size=16, noise=0.6, seed=3)
    total = PersistenceCount()
    for k in range(4):
        gt = _scene(seed=k)
        total = total.add(error_persistence(teacher, torch.zeros(3, *gt.shape), gt, _labels(gt), f"f{k}", "shift"))
    assert total.wrong > 500
    # The previous per-view noise (each view its own frame) repeats errors only where the grid
    # majority itself is wrong or by chance; the frame-keyed noise repeats far more of them.
    per_view = PersistenceCount()
    for k in range(4):
        gt = _scene(seed=k)
        per_view = per_view.add(error_persistence(_PerView(teacher), torch.zeros(3, *gt.shape), gt, _labels(gt),
                                                  f"f{k}", "shift"))
    assert total.share > 30.0 and total.share > 2 * per_view.share
    flip_total = PersistenceCount()
    for k in range(4):
        gt = _scene(seed=k)
        flip_total = flip_total.add(error_persistence(teacher, torch.zeros(3, *gt.shape), gt, _labels(gt), f"f{k}",
                                                      "flip"))
    assert flip_total.share == 100.0


class _PerView:
    """The simulated teacher without frame maps: each view is a frame of its own."""

    reads_ground_truth = True

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, images, labels, gt=None, valid=None, frames=None):
        return self.teacher(images, labels, gt=gt, valid=valid)


def test_persistence_count_by_hand():
    class Fixed:
        """Labels every view with 0 except column 0 of the frame's left half, which gets 1."""

        reads_ground_truth = False

        def __call__(self, images, labels, gt=None, valid=None, frames=None):
            out = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.long)
            out[..., :, 0] = 1
            return out

    gt = torch.full((4, 6), 2)
    gt[0, 0] = 255
    count = error_persistence(Fixed(), torch.zeros(3, 4, 6), gt, torch.ones(3, dtype=torch.bool), "x", "flip")
    # Every labelled pixel is wrong (23); after unflipping, column 0 says 0 in the second view and
    # 1 in the first, column 5 the reverse: only columns 1-4 repeat (16 pixels).
    assert count == PersistenceCount(wrong=23, repeated=16)
    assert count.share == pytest.approx(100 * 16 / 23)


def test_without_frames_each_view_is_its_own_frame():
    teacher = SimulatedTeacher(CLASSES, patch_size=16, noise=0.6, seed=3)
    gt = _scene()
    labels = _labels(gt)[None]
    keyed = teacher(torch.zeros(1, 3, *gt.shape), labels, gt=gt[None], frames=FrameMaps.whole_frames(["a"]))
    other_key = teacher(torch.zeros(1, 3, *gt.shape), labels, gt=gt[None], frames=FrameMaps.whole_frames(["b"]))
    unkeyed = teacher(torch.zeros(1, 3, *gt.shape), labels, gt=gt[None])
    assert not torch.equal(keyed, other_key)  # the key decides the noise
    assert torch.equal(unkeyed, teacher(torch.zeros(1, 3, *gt.shape), labels, gt=gt[None]))  # deterministic


def test_simulated_labels_are_the_same_in_another_process():
    teacher = SimulatedTeacher(CLASSES, patch_size=16, noise=0.6, seed=3)
    gt = _scene()
    here = teacher(torch.zeros(1, 3, *gt.shape), _labels(gt)[None], gt=gt[None],
                   frames=FrameMaps.whole_frames(["frame-1"]).cropped(3, 5))[0]
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_teacher_persistence import CLASSES, _scene, _labels\n"
        "from carbseg.data.frames import FrameMaps\n"
        "from carbseg.teacher.simulated import SimulatedTeacher\n"
        "t = SimulatedTeacher(CLASSES, patch_size=16, noise=0.6, seed=3)\n"
        "gt = _scene()\n"
        "m = t(torch.zeros(1, 3, *gt.shape), _labels(gt)[None], gt=gt[None],\n"
        "      frames=FrameMaps.whole_frames(['frame-1']).cropped(3, 5))[0]\n"
        "print(','.join(str(v) for v in m.flatten().tolist()))\n"
    )
    import pathlib

    out = subprocess.run([sys.executable, "-c", code, str(pathlib.Path(__file__).parent)], check=True,
                         capture_output=True, text=True, env={"PYTHONHASHSEED": "123", **_env()}).stdout
    there = torch.tensor([int(v) for v in out.strip().split(",")]).view_as(here)
    assert torch.equal(here, there)


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
