"""Image-level labels: from masks, JSON round trip and class checks, labels.npy conversion (safely)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carbseg.data.classes import CAMVID, CITYSCAPES
from carbseg.data.datasets import build_dataset
from carbseg.data.labels import (
    compute_image_labels,
    image_labels_from_mask,
    labels_from_npy,
    labels_to_multi_hot,
    read_labels_json,
    write_labels_json,
)
from carbseg.errors import UserError


def test_image_labels_from_mask_counts_pixels():
    mask = np.array([[0, 0, 2, 255], [2, 2, 5, 255], [255, 255, 255, 255]], dtype=np.uint8)
    # pixel counts: class 0 -> 2, class 2 -> 3, class 5 -> 1; 255 never counts
    assert image_labels_from_mask(mask, 6) == [0, 2, 5]
    assert image_labels_from_mask(mask, 6, min_pixels=2) == [0, 2]
    assert image_labels_from_mask(mask, 6, min_pixels=3) == [2]
    assert image_labels_from_mask(mask, 6, min_pixels=4) == []
    assert image_labels_from_mask(np.full((2, 2), 255, np.uint8), 6) == []


def _folder(root: Path, with_masks: bool = True) -> Path:
    masks = {"x": [[0, 0], [1, 255]], "y": [[2, 2], [2, 2]], "z": [[255, 255], [255, 255]]}
    for name, mask in masks.items():
        (root / "images/train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / f"images/train/{name}.png")
        if with_masks:
            (root / "masks/train").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.array(mask, np.uint8)).save(root / f"masks/train/{name}.png")
    classes = root / "classes.yaml"
    classes.write_text("names: [a, b, c]\n")
    return classes


def test_compute_image_labels_on_folder_dataset(tmp_path):
    ds = build_dataset("folder", tmp_path, "train", classes_file=_folder(tmp_path))
    assert compute_image_labels(ds) == {"x": [0, 1], "y": [2], "z": []}
    assert compute_image_labels(ds, min_pixels=2) == {"x": [0], "y": [2], "z": []}


def test_compute_image_labels_needs_masks(tmp_path):
    ds = build_dataset("folder", tmp_path, "train", classes_file=_folder(tmp_path, with_masks=False))
    with pytest.raises(UserError, match="no ground-truth masks"):
        compute_image_labels(ds)


def test_labels_json_round_trip_and_contract(tmp_path):
    path = tmp_path / "labels.json"
    write_labels_json(path, "camvid", CAMVID, {"f1": [3, 0, 10], "f2": []})
    data = json.loads(path.read_text())
    assert data == {"dataset": "camvid", "classes": list(CAMVID.names), "labels": {"f1": [0, 3, 10], "f2": []}}
    assert read_labels_json(path, CAMVID) == {"f1": [0, 3, 10], "f2": []}
    assert not list(tmp_path.glob(".*.tmp*"))


def test_read_labels_json_refuses_other_class_list(tmp_path):
    path = tmp_path / "labels.json"
    write_labels_json(path, "camvid", CAMVID, {"f1": [1]})
    with pytest.raises(UserError) as err:
        read_labels_json(path, CITYSCAPES)
    message = str(err.value)
    assert "11 classes" in message and "19 classes" in message and "carbseg labels --dataset cityscapes" in message


def test_read_labels_json_normalises_and_validates(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"dataset": "cityscapes", "classes": list(CITYSCAPES.names),
                                "labels": {"krefeld/krefeld_000000_003707": [13, 0, 13]}}))
    assert read_labels_json(path, CITYSCAPES) == {"krefeld_000000_003707": [0, 13]}
    path.write_text(json.dumps({"dataset": "cityscapes", "classes": list(CITYSCAPES.names), "labels": {"a": [19]}}))
    with pytest.raises(UserError, match=r"labels of 'a' must be class indices 0..18"):
        read_labels_json(path, CITYSCAPES)
    path.write_text("not json")
    with pytest.raises(UserError, match="not a labels JSON"):
        read_labels_json(path, CITYSCAPES)


def test_labels_to_multi_hot():
    multi_hot = labels_to_multi_hot([[0, 2], [], [1]], 3)
    assert multi_hot.dtype == torch.bool
    assert multi_hot.tolist() == [[True, False, True], [False, False, False], [False, True, False]]


# ---------------------------------------------------------------- the authors' labels.npy
def test_labels_from_npy_converts_release_format(tmp_path):
    vectors = {
        "krefeld/krefeld_000000_003707": np.eye(19, dtype=np.float32)[[0, 2, 13]].sum(0),
        "aachen/aachen_000001_000019": np.zeros(19, dtype=np.float64),
    }
    path = tmp_path / "labels.npy"
    np.save(path, vectors)
    assert labels_from_npy(path, CITYSCAPES) == {"aachen_000001_000019": [], "krefeld_000000_003707": [0, 2, 13]}
    with pytest.raises(UserError, match="has 19 entries but the camvid class set has 11"):
        labels_from_npy(path, CAMVID)
    np.save(path, np.zeros((2, 3)))
    with pytest.raises(UserError, match="expected a pickled dict"):
        labels_from_npy(path, CITYSCAPES)


class _Payload:
    """What a hostile labels.npy would carry: unpickling it runs code (here: creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_hostile_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "marker"
    payload = pickle.dumps({"a": _Payload(marker)})
    pickle.loads(payload)  # an ordinary unpickler runs the payload ...
    assert marker.exists()
    marker.unlink()
    raw = tmp_path / "raw.npy"
    raw.write_bytes(payload)
    with pytest.raises(UserError, match=r"refusing to load: the pickle asks for builtins.exec"):
        labels_from_npy(raw, CITYSCAPES)
    wrapped = tmp_path / "wrapped.npy"  # ... and the same payload inside a real .npy object array
    np.save(wrapped, np.array({"a": _Payload(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match=r"refusing to load.*trusted source"):
        labels_from_npy(wrapped, CITYSCAPES)
    assert not marker.exists()
