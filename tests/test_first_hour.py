"""A new user's first hour: the exact inputs that used to crash or mislead, each now one line or working."""

from __future__ import annotations

import pytest
import yaml

from carbseg.cli import main
from carbseg.config import load_config
from test_reliability_common import error_line, make_checkpoint, make_scenes, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors")


# ---------------------------------------------------------------- config values as users type them
def test_exponent_learning_rates_are_floats_on_the_command_line_and_in_yaml(tmp_path):
    cfg = load_config(None, ["train.lr=1e-3", "train.min_lr=-2.5E-5", "carb.fixed_coefficient=3e-2"])
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr == -2.5e-5 and cfg.carb.fixed_coefficient == 0.03
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5e-3\n  weight_decay: 1e-4\n")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "5e-3"  # what YAML 1.1 makes of it
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.weight_decay) == (0.005, 0.0001)


def test_text_that_is_not_a_number_is_still_refused_for_a_float():
    with pytest.raises(Exception, match="train.lr must be float, got 'fast'"):
        load_config(None, ["train.lr=fast"])


def test_numbers_typed_for_text_keys_stay_the_text_typed(tmp_path):
    cfg = load_config(None, ["data.root=2024", "name=1.10", "data.labels=007"])
    assert (cfg.data.root, cfg.name, cfg.data.labels) == ("2024", "1.10", "007")
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: 2024\n")
    assert load_config(path).data.root == "2024"
    path.write_text("data:\n  root: yes\n")
    with pytest.raises(Exception, match="data.root must be text, got True; quote the value"):
        load_config(path)


def test_zero_batch_size_is_one_line(scenes, tmp_path, capsys):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "data.batch_size=0", "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, "train", "data.batch_size = 0", "at least 1")
    assert not out.exists()


# ---------------------------------------------------------------- devices
@pytest.mark.parametrize("device", ["banana", "cuda:x"])
def test_unknown_device_is_one_line_on_every_command(device, scenes, checkpoint, tmp_path, capsys):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    assert main(["train", "--config", str(config), f"device={device}", "--out", str(tmp_path / "run")]) == 2
    error_line(capsys.readouterr().err, "train", f"device = {device!r} is not a device", "auto, cpu, cuda")
    labels = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--out", str(labels)]) == 0
    assert main(["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--labels",
                 str(labels), "--out", str(tmp_path / "pm"), "--teacher", "simulated", "--device", device]) == 2
    error_line(capsys.readouterr().err, "pseudo-masks", f"--device {device!r} is not a device")
    assert main(["evaluate", "--dataset", "synthetic", "--root", str(scenes), "--split", "val", "--checkpoint",
                 str(checkpoint), "--device", device]) == 2
    error_line(capsys.readouterr().err, "evaluate", f"--device {device!r}")
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(scenes / "images" / "val"),
                 "--out", str(tmp_path / "pred"), "--device", device]) == 2
    error_line(capsys.readouterr().err, "predict", f"--device {device!r}")
    assert not (tmp_path / "pm").exists() and not (tmp_path / "pred").exists() and not (tmp_path / "run").exists()


def test_cuda_without_a_gpu_is_one_line(scenes, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    labels = tmp_path / "labels.json"
    assert main(["labels", "--dataset", "synthetic", "--root", str(scenes), "--out", str(labels)]) == 0
    assert main(["pseudo-masks", "--dataset", "synthetic", "--root", str(scenes), "--split", "train", "--labels",
                 str(labels), "--out", str(tmp_path / "pm"), "--teacher", "simulated", "--device", "cuda"]) == 2
    error_line(capsys.readouterr().err, "pseudo-masks", "--device 'cuda' but no CUDA GPU is visible", "carbseg doctor")
    assert not (tmp_path / "pm").exists()
