"""`carbseg labels` through the real entry point (in-process and as a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from carbseg.cli import main
from carbseg.data.classes import CAMVID, CITYSCAPES
from carbseg.io import list_images, read_label_png

SRC = Path(__file__).resolve().parents[1] / "src"


def test_labels_real_camvid_val(camvid_root, tmp_path):
    out = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "camvid", "--root", str(camvid_root), "--split", "val",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["dataset"] == "camvid" and data["classes"] == list(CAMVID.names)
    assert len(data["labels"]) == 101
    # reference: the distinct values of each raw mask file, void (11) left out
    for image in list_images(camvid_root / "val"):
        values = np.unique(read_label_png(camvid_root / "valannot" / image.name))
        assert data["labels"][image.stem] == [int(v) for v in values if v != 11]


def _folder(root: Path) -> Path:
    (root / "images/train").mkdir(parents=True)
    (root / "masks/train").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(root / "images/train/p.png")
    Image.fromarray(np.array([[1, 1, 0], [1, 255, 255]], np.uint8)).save(root / "masks/train/p.png")
    (root / "classes.json").write_text(json.dumps({"names": ["flat", "object"]}))
    return root / "classes.json"


def test_labels_folder_min_pixels(tmp_path):
    classes = _folder(tmp_path)
    out = tmp_path / "l.json"
    args = ["labels", "--dataset", "folder", "--root", str(tmp_path), "--classes", str(classes), "--out", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text()) == {"dataset": "folder", "classes": ["flat", "object"],
                                           "labels": {"p": [0, 1]}}
    assert main([*args, "--min-pixels", "2"]) == 0
    assert json.loads(out.read_text())["labels"] == {"p": [1]}


def test_labels_bad_usage_exits_2(tmp_path, capsys):
    out = str(tmp_path / "l.json")
    assert main(["labels", "--dataset", "camvid", "--out", out]) == 2
    assert "--root is required" in capsys.readouterr().err
    assert main(["labels", "--dataset", "camvid", "--root", str(tmp_path), "--out", out, "--min-pixels", "0"]) == 2
    assert "--min-pixels 0: must be at least 1" in capsys.readouterr().err
    assert main(["labels", "--dataset", "camvid", "--root", str(tmp_path / "none"), "--out", out]) == 2
    assert "dataset root folder not found" in capsys.readouterr().err
    assert not Path(out).exists()


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "carbseg", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_labels_from_npy_subprocess(tmp_path):
    npy = tmp_path / "labels.npy"
    np.save(npy, {"krefeld/krefeld_000000_003707": np.eye(19, dtype=np.float32)[[18, 5]].sum(0)})
    out = tmp_path / "labels.json"
    done = _run("labels", "--dataset", "cityscapes", "--from-npy", str(npy), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == {"dataset": "cityscapes", "classes": list(CITYSCAPES.names),
                                           "labels": {"krefeld_000000_003707": [5, 18]}}
    # a pickle that asks for anything else is refused: one line on stderr, exit 2, no traceback
    npy.write_bytes(b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94"
                    b"\x8c\x04true\x94\x85\x94R\x94.")
    done = _run("labels", "--dataset", "cityscapes", "--from-npy", str(npy), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "refusing to load: the pickle asks for os.system" in done.stderr
