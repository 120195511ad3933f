"""WildDash2: category mapping, panoptic decoding, release conversion (tiny generated release) and dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carbseg.cli import main
from carbseg.data.classes import WILDDASH2
from carbseg.data.datasets import build_dataset
from carbseg.data.wilddash2 import (
    WildDash2Dataset,
    category_train_id,
    convert_wilddash2,
    panoptic_to_train_ids,
    split_ids,
)
from carbseg.errors import UserError
from carbseg.io import read_label_png

# Release category ids and names (as in the public panoptic.json) used by the fixture.
CATEGORIES = [(1, "egovehicle"), (7, "road"), (14, "guardrail"), (18, "polegroup"), (26, "car"),
              (31, "onrails"), (34, "pickup"), (38, "roadmarking"), (50, "bicyclist")]


def _rgb_of(segment_id: int) -> tuple[int, int, int]:
    return segment_id % 256, (segment_id // 256) % 256, segment_id // 65536


# segment id -> category id of image "a"; 77 is painted but not listed, 0 means "no segment"
SEGMENTS_A = {1: 7, 517: 26, 196873: 50, 4000: 31, 9: 1, 70000: 38}
LAYOUT_A = [[1, 517, 196873, 0], [4000, 77, 9, 70000]]
# hand-derived train ids: road 1, car 15, bicyclist -> rider 14, none 255 / on rails 255, unlisted 255,
# ego vehicle 0, road marking 24
EXPECTED_A = [[1, 15, 14, 255], [255, 255, 0, 24]]
SEGMENTS_B = {3: 14, 4: 18, 5: 34}
LAYOUT_B = [[3, 3, 4, 5], [5, 5, 5, 5]]
EXPECTED_B = [[6, 6, 7, 20], [20, 20, 20, 20]]  # guard rail 6, polegroup -> pole 7, pickup 20


def _write_release(src: Path) -> None:
    (src / "images").mkdir(parents=True)
    (src / "panoptic").mkdir()
    images, annotations = [], []
    for n, (name, segments, layout) in enumerate((("a", SEGMENTS_A, LAYOUT_A), ("b", SEGMENTS_B, LAYOUT_B))):
        Image.fromarray(np.full((2, 4, 3), 40 + n, dtype=np.uint8)).save(src / "images" / f"wd_{name}.jpg")
        rgb = np.array([[_rgb_of(s) for s in row] for row in layout], dtype=np.uint8)
        Image.fromarray(rgb).save(src / "panoptic" / f"wd_{name}.png")
        images.append({"id": f"wd_{name}", "file_name": f"wd_{name}.jpg", "width": 4, "height": 2})
        annotations.append({"image_id": f"wd_{name}", "file_name": f"wd_{name}.png",
                            "segments_info": [{"id": s, "category_id": c, "iscrowd": 0}
                                              for s, c in segments.items()]})
    meta = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n, "isthing": 1} for i, n in CATEGORIES]}
    (src / "panoptic.json").write_text(json.dumps(meta))


def test_category_names_map_onto_the_25_classes():
    assert category_train_id("egovehicle") == 0 and category_train_id("ego vehicle") == 0
    assert category_train_id("Road") == 1
    assert category_train_id("guardrail") == 6
    assert category_train_id("trafficsignframe") == WILDDASH2.index("pole")
    assert category_train_id("bicyclist") == WILDDASH2.index("rider") == 14
    assert category_train_id("curb") == WILDDASH2.index("sidewalk")
    assert category_train_id("roadmarking") == 24
    for ignored in ("onrails", "parking", "caravan", "unlabeled", "outofroi", "junctionbox", "trafficsignback"):
        assert category_train_id(ignored) == 255
    # every one of the 25 classes is reachable from its release spelling (no spaces)
    assert [category_train_id(n.replace(" ", "")) for n in WILDDASH2.names] == list(range(25))


def test_panoptic_decoding_uses_r_plus_256g_plus_65536b():
    rgb = np.array([[_rgb_of(s) for s in row] for row in LAYOUT_A], dtype=np.uint8)
    assert tuple(rgb[0, 2]) == (9, 1, 3)  # 196873 = 9 + 256 * 1 + 65536 * 3
    segment_train = {s: category_train_id(dict(CATEGORIES)[c]) for s, c in SEGMENTS_A.items()}
    np.testing.assert_array_equal(panoptic_to_train_ids(rgb, segment_train), EXPECTED_A)


def test_split_rule_is_seeded_and_exact():
    ids = [f"img{i:02d}" for i in range(10)]
    split = split_ids(ids, 0.3, seed=1)
    assert len(split["val"]) == 3 and len(split["train"]) == 7
    assert sorted(split["val"] + split["train"]) == ids
    assert split_ids(list(reversed(ids)), 0.3, seed=1) == split  # independent of the listing order
    assert split_ids(ids, 0.3, seed=2) != split
    with pytest.raises(UserError, match="--val-fraction 1.0"):
        split_ids(ids, 1.0, seed=0)


def test_convert_and_read(tmp_path):
    src, out = tmp_path / "release", tmp_path / "wd2"
    _write_release(src)
    counts = convert_wilddash2(src, out, val_fraction=0.5, seed=0)
    assert counts == {"train": 1, "val": 1}
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(splits["train"] + splits["val"]) == ["wd_a", "wd_b"]
    expected = {"wd_a": EXPECTED_A, "wd_b": EXPECTED_B}
    for split, (image_id,) in splits.items():
        np.testing.assert_array_equal(read_label_png(out / "labels" / split / f"{image_id}.png"), expected[image_id])
        assert (out / "images" / split / f"{image_id}.jpg").read_bytes() == \
            (src / "images" / f"{image_id}.jpg").read_bytes()
        ds = build_dataset("wilddash2", out, split)
        assert isinstance(ds, WildDash2Dataset) and ds.ids == [image_id] and ds.classes is WILDDASH2
        sample = ds[0]
        assert sample.image.shape == (2, 4, 3)
        np.testing.assert_array_equal(sample.mask, expected[image_id])
    with pytest.raises(UserError, match="no WildDash2 split 'test'; available: train, val"):
        WildDash2Dataset(out, "test")


def test_convert_is_resumable_and_refuses_a_different_split(tmp_path):
    src, out = tmp_path / "release", tmp_path / "wd2"
    _write_release(src)
    convert_wilddash2(src, out, val_fraction=0.0)
    label_a, label_b = out / "labels/train/wd_a.png", out / "labels/train/wd_b.png"
    label_a.unlink()
    before = label_b.stat().st_mtime_ns
    (src / "panoptic/wd_b.png").unlink()  # would fail if b were converted again
    convert_wilddash2(src, out, val_fraction=0.0)
    assert label_b.stat().st_mtime_ns == before
    np.testing.assert_array_equal(read_label_png(label_a), EXPECTED_A)
    assert not list(out.rglob("*.tmp*"))
    with pytest.raises(UserError, match="converted with a different split"):
        convert_wilddash2(src, out, val_fraction=0.5)


def test_convert_with_split_file(tmp_path):
    src = tmp_path / "release"
    _write_release(src)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"val": ["wd_b"]}))
    assert convert_wilddash2(src, tmp_path / "out", split_file=split_file) == {"val": 1}
    assert [p.name for p in (tmp_path / "out").rglob("*.png")] == ["wd_b.png"]
    split_file.write_text(json.dumps({"val": ["wd_z"]}))
    with pytest.raises(UserError, match="names 'wd_z', which is not an annotated release image"):
        convert_wilddash2(src, tmp_path / "out2", split_file=split_file)


def test_convert_errors(tmp_path):
    with pytest.raises(UserError, match=r"panoptic.json: not found; expected the WildDash2 public release"):
        convert_wilddash2(tmp_path, tmp_path / "out")
    src = tmp_path / "release"
    _write_release(src)
    (src / "panoptic/wd_a.png").unlink()
    with pytest.raises(UserError, match=r"wd_a.png: panoptic PNG listed in panoptic.json is missing"):
        convert_wilddash2(src, tmp_path / "out")


def test_cli_convert_wilddash2(tmp_path, capsys):
    src, out = tmp_path / "release", tmp_path / "wd2"
    _write_release(src)
    assert main(["convert-wilddash2", "--src", str(src), "--out", str(out), "--val-fraction", "0"]) == 0
    assert "train 2 images" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "labels/train").iterdir()) == ["wd_a.png", "wd_b.png"]
    assert main(["convert-wilddash2", "--src", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("carbseg convert-wilddash2: error:") and "panoptic.json: not found" in err
    assert "\n" not in err


def test_cli_convert_wilddash2_help_names_the_folders_it_writes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert-wilddash2", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "OUT/images/SPLIT and OUT/labels/SPLIT" in text and "masks" not in text
    # ... which are the folders the conversion writes.
    src, out = tmp_path / "release", tmp_path / "wd2"
    _write_release(src)
    convert_wilddash2(src, out, val_fraction=0)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["images", "labels"]
