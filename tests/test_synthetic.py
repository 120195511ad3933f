"""Procedural driving scenes: determinism, class coverage, thin small objects, texture, files on disk."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from carbseg.cli import main
from carbseg.data.classes import SYNTHETIC
from carbseg.data.synthetic import (
    DRAWN_CLASSES,
    SyntheticScenes,
    generate_synthetic_dataset,
    open_synthetic,
    render_scene,
    scene_seed,
)
from carbseg.errors import UserError

SMALL = [SYNTHETIC.index(n) for n in ("pole", "traffic light", "traffic sign", "person")]


@pytest.fixture(scope="module")
def scenes_96x192():
    return [render_scene(seed, 96, 192) for seed in range(20)]


def test_same_seed_same_scene_and_different_seeds_differ():
    image_a, mask_a = render_scene(7, 64, 128)
    image_b, mask_b = render_scene(7, 64, 128)
    assert image_a.dtype == np.uint8 and image_a.shape == (64, 128, 3)
    assert mask_a.dtype == np.uint8 and mask_a.shape == (64, 128)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(mask_a, mask_b)
    image_c, mask_c = render_scene(8, 64, 128)
    assert (mask_a != mask_c).mean() > 0.05 and (image_a != image_c).mean() > 0.5


@pytest.mark.parametrize("height,width", [(8, 8), (37, 91), (200, 100)])
def test_any_size(height, width):
    image, mask = render_scene(3, height, width)
    assert image.shape == (height, width, 3) and mask.shape == (height, width)
    assert set(np.unique(mask)) <= set(range(SYNTHETIC.num_classes))


def test_every_drawn_class_appears_over_twenty_scenes(scenes_96x192):
    seen = set()
    for _, mask in scenes_96x192:
        seen |= set(np.unique(mask).tolist())
    assert seen == {SYNTHETIC.index(n) for n in DRAWN_CLASSES}
    assert SYNTHETIC.index("train") not in seen and len(DRAWN_CLASSES) == 18


def test_small_classes_are_frequent_but_cover_little_area(scenes_96x192):
    for cls in SMALL:
        present = sum(bool((mask == cls).any()) for _, mask in scenes_96x192)
        area = np.mean([(mask == cls).mean() for _, mask in scenes_96x192])
        assert present >= 15, (SYNTHETIC.names[cls], present)
        assert 0 < area < 0.02, (SYNTHETIC.names[cls], area)


def test_coarse_16px_grid_misses_most_thin_objects():
    # The premise of GLV: a 16-pixel patch grid (the CLIP teacher at 512x256) loses poles, lights, signs.
    kept, total = 0, 0
    for seed in range(4):
        _, mask = render_scene(seed, 256, 512)
        blocks = mask.reshape(16, 16, 32, 16).transpose(0, 2, 1, 3).reshape(16, 32, 256)
        majority = np.apply_along_axis(lambda b: np.bincount(b, minlength=256).argmax(), 2, blocks)
        coarse = np.repeat(np.repeat(majority, 16, 0), 16, 1)
        thin = np.isin(mask, SMALL[:3])
        kept += int((thin & (coarse == mask)).sum())
        total += int(thin.sum())
    assert total > 0 and kept / total < 0.3


def test_no_class_is_a_flat_colour(scenes_96x192):
    for cls in range(SYNTHETIC.num_classes):
        pixels = np.concatenate([image[mask == cls] for image, mask in scenes_96x192]).astype(np.float64)
        if len(pixels) < 200:
            continue
        assert pixels.std(axis=0).mean() > 8.0, SYNTHETIC.names[cls]


def test_splits_use_disjoint_seeds():
    seeds = {scene_seed(split, s, i) for split in ("train", "val", "test") for s in (0, 1) for i in (0, 1, 2)}
    assert len(seeds) == 18
    train, val = SyntheticScenes(2, 32, 64, seed=0, split="train"), SyntheticScenes(2, 32, 64, seed=0, split="val")
    assert train.ids == ["synth_train_000000", "synth_train_000001"] and val.ids[1] == "synth_val_000001"
    assert not np.array_equal(train[0].image, val[0].image)
    with pytest.raises(UserError, match="unknown synthetic split"):
        SyntheticScenes(1, 32, 64, split="dev")


def test_generate_then_open_round_trip(tmp_path):
    written = generate_synthetic_dataset(tmp_path, "val", 3, 40, 72, seed=5, progress=False)
    assert written == 3
    dataset = open_synthetic(tmp_path, "val")
    assert dataset.ids == [f"synth_val_{i:06d}" for i in range(3)]
    assert dataset.classes == SYNTHETIC
    in_memory = SyntheticScenes(3, 40, 72, seed=5, split="val")
    for i in range(3):
        image, mask = render_scene(scene_seed("val", 5, i), 40, 72)
        sample = dataset[i]
        np.testing.assert_array_equal(sample.image, image)
        np.testing.assert_array_equal(sample.mask, mask)
        np.testing.assert_array_equal(in_memory[i].mask, mask)


def test_generation_resumes_and_skips_finished_scenes(tmp_path):
    sentinel = np.full((40, 72), 3, np.uint8)
    for kind in ("images", "masks"):
        (tmp_path / kind / "train").mkdir(parents=True)
        Image.fromarray(sentinel).save(tmp_path / kind / "train" / "synth_train_000001.png")
    written = generate_synthetic_dataset(tmp_path, "train", 3, 40, 72, progress=False)
    assert written == 2
    kept = np.asarray(Image.open(tmp_path / "masks" / "train" / "synth_train_000001.png"))
    np.testing.assert_array_equal(kept, sentinel)
    assert generate_synthetic_dataset(tmp_path, "train", 3, 40, 72, progress=False) == 0
    assert not list(tmp_path.rglob("*.tmp*"))


def test_open_missing_split_says_how_to_generate(tmp_path):
    with pytest.raises(UserError, match=r"carbseg synthesize --out .* --split test"):
        open_synthetic(tmp_path, "test")


def test_cli_synthesize(tmp_path, capsys):
    assert main(["synthesize", "--out", str(tmp_path), "--split", "val", "--num", "2", "--size", "48x24"]) == 0
    files = sorted(p.name for p in (tmp_path / "masks" / "val").iterdir())
    assert files == ["synth_val_000000.png", "synth_val_000001.png"]
    assert np.asarray(Image.open(tmp_path / "images" / "val" / files[0])).shape == (24, 48, 3)
    assert (tmp_path / "classes.json").is_file()
    assert main(["synthesize", "--out", str(tmp_path), "--size", "48by24"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_cli_synthesize_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "carbseg", "synthesize", "--out", str(tmp_path), "--num", "1", "--size", "32x16"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    image = np.asarray(Image.open(tmp_path / "images" / "train" / "synth_train_000000.png"))
    np.testing.assert_array_equal(image, render_scene(scene_seed("train", 0, 0), 16, 32)[0])
