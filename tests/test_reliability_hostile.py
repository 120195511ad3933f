"""Reliability matrix, hostile files: pickle payloads are refused unexecuted, ids and YAML cannot escape.

The payload is a pickle whose ``__reduce__`` calls ``open(MARKER, "w")``: loading it the unsafe way
creates the marker file (checked once, so these tests can fail), carbseg's loaders must not.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch

from carbseg.cli import main
from carbseg.data.base import SegmentationDataset
from carbseg.data.classes import SYNTHETIC
from carbseg.errors import UserError
from carbseg.io import safe_child
from carbseg.teacher.generate import generate_pseudo_masks
from carbseg.teacher.simulated import SimulatedTeacher
from carbseg.teacher.tiny import write_tiny_config
from test_reliability_common import all_files, error_line, make_scenes, tiny_train_config


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def scene_labels(scenes, tmp_path_factory):
    labels = tmp_path_factory.mktemp("labels") / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--split", "train",
                 "--out", str(labels)]) == 0
    return labels


@pytest.fixture
def hostile(tmp_path):
    """Payload files in every pickle flavour, and the marker their payload would create."""
    marker = tmp_path / "PAYLOAD_RAN"
    payload = {"model": _Payload(marker), "state_dict": _Payload(marker)}
    files = {}
    torch.save(payload, tmp_path / "zip.pt")  # torch.save's zip archive
    files["zip.pt"] = tmp_path / "zip.pt"
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(payload, protocol=2))  # legacy raw pickle
    files["raw.pt"] = tmp_path / "raw.pt"
    shutil.copy(tmp_path / "zip.pt", tmp_path / "zip.bin")
    files["zip.bin"] = tmp_path / "zip.bin"
    shutil.copy(tmp_path / "zip.pt", tmp_path / "disguised.safetensors")  # a pickle renamed
    files["disguised.safetensors"] = tmp_path / "disguised.safetensors"
    # A forged "TorchScript archive": what carbseg's OpenAI-format detection looks for, around a payload.
    with zipfile.ZipFile(tmp_path / "forged_torchscript.pt", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("archive/code/__torch__/model.py", "")
        archive.writestr("archive/version", "3\n")
    files["forged_torchscript.pt"] = tmp_path / "forged_torchscript.pt"
    np.save(tmp_path / "labels.npy", np.array({"x": _Payload(marker)}, dtype=object), allow_pickle=True)
    files["labels.npy"] = tmp_path / "labels.npy"
    return marker, files


def test_the_payload_is_real(hostile):
    marker, files = hostile
    with open(files["raw.pt"], "rb") as f:
        pickle.load(f)  # the unsafe way
    assert marker.exists()


@pytest.mark.parametrize("name", ["zip.pt", "raw.pt", "disguised.safetensors"])
def test_evaluate_and_predict_refuse_pickled_checkpoints(hostile, scenes, tmp_path, capsys, name):
    marker, files = hostile
    assert main(["evaluate", "--dataset", "synthetic", "--root", str(scenes), "--split", "val",
                 "--checkpoint", str(files[name]), "--json", str(tmp_path / "r.json")]) == 2
    error_line(capsys.readouterr().err, "evaluate", str(files[name]), "never loads as a model")
    assert main(["predict", "--checkpoint", str(files[name]), "--input", str(scenes / "images" / "val"),
                 "--out", str(tmp_path / "pred")]) == 2
    error_line(capsys.readouterr().err, "predict", str(files[name]), "never loads as a model")
    assert not marker.exists() and not (tmp_path / "r.json").exists() and all_files(tmp_path / "pred") == []


def test_train_resume_refuses_a_tampered_training_state(hostile, scenes, tmp_path, capsys):
    marker, files = hostile
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(files["zip.pt"], run / "checkpoint_last.pt")
    assert main(["train", "--config", str(config), "--out", str(run), "--resume", "--max-iters", "2"]) == 2
    error_line(capsys.readouterr().err, "train", "checkpoint_last.pt", "refused to load", "io.open")
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_last.pt"]


def test_labels_from_npy_refuses_a_payload(hostile, tmp_path, capsys):
    marker, files = hostile
    out = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--from-npy", str(files["labels.npy"]), "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, "labels", str(files["labels.npy"]), "refusing to load", "io.open")
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("name, fragment", [
    ("zip.pt", "refused to load"), ("raw.pt", "refused to load"), ("zip.bin", "refused to load"),
    ("disguised.safetensors", "cannot read CLIP weights"), ("forged_torchscript.pt", "TorchScript archive"),
])
def test_teacher_weights_refuse_payloads(hostile, scenes, scene_labels, tmp_path, capsys, name, fragment):
    marker, files = hostile
    labels = scene_labels
    out = tmp_path / "masks"
    assert main(["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train",
                 "--labels", str(labels), "--out", str(out), "--clip-model", str(write_tiny_config(tmp_path / "t.json")),
                 "--clip-pretrained", str(files[name]), "--workers", "0", "--cache-dir", str(tmp_path / "cache")]) == 2
    error_line(capsys.readouterr().err, "pseudo-masks", str(files[name]), fragment)
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("name, fragment", [("zip.pt", "refused to load"), ("raw.pt", "refused to load"),
                                            ("disguised.safetensors", "cannot read weights")])
def test_model_pretrained_weights_refuse_payloads(hostile, scenes, tmp_path, capsys, name, fragment):
    marker, files = hostile
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, model={"pretrained": str(files[name])})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--max-iters", "1"]) == 2
    error_line(capsys.readouterr().err, "train", str(files[name]), fragment)
    assert not marker.exists() and not (tmp_path / "run" / "checkpoint_last.pt").exists()


# ---------------------------------------------------------------- YAML
def test_yaml_python_tags_are_not_constructed(scenes, tmp_path, capsys):
    marker = tmp_path / "YAML_RAN"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: {tag}\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    error_line(capsys.readouterr().err, "train", str(config), "not valid YAML", "python/object/apply:os.system")
    classes = tmp_path / "classes.yaml"
    classes.write_text(f"names: [road, car]\nname: {tag}\n")
    assert main(["labels", "--dataset", "folder", "--root", str(scenes), "--classes", str(classes),
                 "--out", str(tmp_path / "l.json")]) == 2
    error_line(capsys.readouterr().err, "labels", str(classes), "cannot parse classes file")
    assert main(["train", "--config", str(tiny_train_config(tmp_path / "ok.yaml", scenes)), "--out",
                 str(tmp_path / "run"), f"name={tag}"]) == 2
    error_line(capsys.readouterr().err, "train", "override 'name=", "not a plain YAML scalar")
    assert not marker.exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- path escapes
@pytest.mark.parametrize("image_id", ["../../escaped", "/tmp/escaped_abs", "a/../../escaped", ".."])
def test_safe_child_refuses_escapes(tmp_path, image_id):
    with pytest.raises(UserError, match="outside the output folder"):
        safe_child(tmp_path / "out", image_id + ("" if image_id == ".." else ".png"))


def test_safe_child_keeps_dotted_names_inside(tmp_path):
    assert safe_child(tmp_path, "a..b.png") == (tmp_path / "a..b.png").resolve()
    assert safe_child(tmp_path, "sub/x.png") == (tmp_path / "sub" / "x.png").resolve()


class _HostileIds(SegmentationDataset):
    """An in-memory dataset whose second id tries to climb out of the output folder."""

    classes = SYNTHETIC

    def __init__(self):
        self.ids = ["fine", "../../escaped"]

    def load_image(self, index):
        return np.zeros((16, 16, 3), np.uint8)

    def _load_raw_mask(self, index):
        return np.zeros((16, 16), np.uint8)


def test_pseudo_mask_ids_cannot_write_outside_out(tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    teacher = SimulatedTeacher(SYNTHETIC, patch_size=8, noise=0.0)
    with pytest.raises(UserError, match="escaped.png'.*outside the output folder"):
        generate_pseudo_masks(_HostileIds(), {"fine": [0], "../../escaped": [0]}, teacher, out, progress=False)
    assert [p for p in tmp_path.rglob("*escaped*")] == []


def test_labels_json_ids_cannot_write_outside_out(scenes, tmp_path, capsys):
    """Ids in a labels JSON are reduced to bare IMAGE_IDs; outputs are named by the dataset's own files."""
    labels = tmp_path / "work" / "labels.json"
    labels.parent.mkdir()
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--out", str(labels)]) == 0
    data = json.loads(labels.read_text())
    data["labels"]["../../escaped"] = [0]
    data["labels"]["/tmp/escaped_abs"] = [0]
    labels.write_text(json.dumps(data))
    out = tmp_path / "work" / "masks"
    assert main(["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train",
                 "--labels", str(labels), "--out", str(out), "--teacher", "simulated", "--workers", "0",
                 "--no-progress"]) == 0
    assert all_files(tmp_path) == ["work/labels.json"] + [f"work/masks/synth_train_00000{i}.png" for i in range(4)]
