"""studies/camvid/class_probe.py: is a missed class outvoted or not represented?"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

STUDY_DIR = Path(__file__).resolve().parents[1] / "studies" / "camvid"


def _probe_module():
    spec = importlib.util.spec_from_file_location("camvid_study_class_probe", STUDY_DIR / "class_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class_probe = _probe_module()


def test_counts_by_hand():
    # Five pixels, three classes, probed class 1:
    #   pixel 0: logits (2, 1, 0),   GT 1   -> margin -1, second choice
    #   pixel 1: logits (0, 3, 1),   GT 1   -> margin +2, first choice
    #   pixel 2: logits (0, .5, 3),  GT 0   -> margin -2.5 (not class 1's pixel)
    #   pixel 3: logits (1, 0, 5),   GT 1   -> margin -5, third choice
    #   pixel 4: logits (0, 1, 2),   ignore -> never counted, even where class 1 would win it
    logits = torch.tensor([[2.0, 0.0, 0.0, 1.0, 0.0],
                           [1.0, 3.0, 0.5, 0.0, 1.0],
                           [0.0, 1.0, 3.0, 5.0, 2.0]]).reshape(3, 1, 5)
    mask = torch.tensor([[1, 1, 0, 1, 255]])
    counts = class_probe.ClassProbeCounts(3, 1, offsets=(0, 2, 3))
    counts.update(logits, mask)
    report = counts.report(["a", "b", "c"])
    assert report["pixels"] == 3
    assert report["first_choice"] == pytest.approx(100 / 3)
    assert report["in_first_two"] == pytest.approx(200 / 3)
    # offset 0: wins pixel 1 only -> 1 / |{0, 1, 3}|; offset 2: pixels 0 and 1 -> 2 / 3;
    # offset 3: also pixel 2 (a false positive) -> 2 / |{0, 1, 2, 3}|
    assert report["iou_by_offset"] == pytest.approx({"0": 100 / 3, "2": 200 / 3, "3": 50.0})
    assert report["oracle_offset"] == 2.0 and report["oracle_iou"] == pytest.approx(200 / 3)
    assert report["taken_by"] == pytest.approx({"a": 100 / 3, "b": 100 / 3, "c": 100 / 3})


def test_summary_table_of_a_probe(tmp_path):
    import sys

    sys.path.insert(0, str(STUDY_DIR))
    from summarize import class_probe_table

    counts = class_probe.ClassProbeCounts(3, 1, offsets=(0, 2))
    counts.update(torch.tensor([[2.0, 0.0], [1.0, 3.0], [0.0, 1.0]]).reshape(3, 1, 2), torch.tensor([[1, 1]]))
    report = {"images": 1, "eval": {"mode": "whole", "scales": [2.0], "flip": False},
              "classes": {"b": counts.report(["a", "b", "c"])},
              "model": {"source": "gt_r200_seed0/checkpoint_last.pt", "iteration": 1500, "split": "val"}}
    (tmp_path / "probe_x.json").write_text(json.dumps(report))
    assert class_probe_table(tmp_path).splitlines()[-1] == "| gt_r200_seed0 @ 1500 | 2 | b | 50.0 | 100.0 | 50.0 | 2 | 100.0 | a 50, b 50 |"
    assert class_probe_table(tmp_path / "nothing") == ""


def test_counts_accumulate_over_images_and_check_shapes():
    counts = class_probe.ClassProbeCounts(2, 0, offsets=(0,))
    logits = torch.tensor([[1.0, -1.0], [0.0, 0.0]]).reshape(2, 1, 2)
    counts.update(logits, torch.tensor([[0, 1]]))
    counts.update(logits, torch.tensor([[1, 0]]))
    # image 1: predicted {0}, GT {0} -> 1 / 1; image 2: predicted {0}, GT {1} -> 0 / 2; together 1 / 3
    assert counts.report(["a", "b"])["iou_by_offset"]["0"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="do not match"):
        counts.update(logits, torch.tensor([[0, 1, 1]]))


def test_a_runs_training_state_probes_like_its_final_model(tmp_path):
    # The last training state of a finished run holds the final model's weights: probing the run folder
    # (checkpoint_last.pt + config.yaml) and its model.safetensors must agree exactly.
    from carbseg.cli import main
    from carbseg.data.synthetic import generate_synthetic_dataset

    scenes = tmp_path / "scenes"
    generate_synthetic_dataset(scenes, "train", 4, 64, 128, seed=1, progress=False)
    generate_synthetic_dataset(scenes, "val", 3, 64, 128, seed=2, progress=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 0, "device": "cpu",
        "data": {"dataset": "synthetic", "crop_size": [64, 96], "scale_size": [64, 128], "batch_size": 2,
                 "num_workers": 0, "cat_max_ratio": 1.0},
        "teacher": {"kind": "simulated"},
        "model": {"backbone": "tiny", "pretrained": "none", "classifier": "learned", "head_channels": 16,
                  "aspp_dilations": [1, 2, 3, 4]},
        "glv": {"enabled": False}, "carb": {"enabled": False},
        "train": {"max_iters": 2, "warmup_iters": 1, "eval_interval": 0, "checkpoint_interval": 100},
    }))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress", f"data.root={scenes}"]) == 0
    common = ["--dataset", "synthetic", "--root", str(scenes), "--classes", "person,pole", "--no-progress"]
    assert class_probe.main([*common, "--run", str(run), "--json", str(tmp_path / "run.json")]) == 0
    assert class_probe.main([*common, "--checkpoint", str(run / "model.safetensors"),
                             "--json", str(tmp_path / "model.json")]) == 0
    from_run = json.loads((tmp_path / "run.json").read_text())
    from_model = json.loads((tmp_path / "model.json").read_text())
    assert from_run["model"] == {"source": "run/checkpoint_last.pt", "iteration": 2, "split": "val"}
    assert from_run["classes"] == from_model["classes"] and from_run["images"] == 3
    assert from_run["classes"]["person"]["pixels"] > 0


def test_clear_errors(tmp_path, capsys):
    from carbseg.data.synthetic import generate_synthetic_dataset

    generate_synthetic_dataset(tmp_path, "val", 1, 64, 128, seed=2, progress=False)
    common = ["--root", str(tmp_path), "--dataset", "synthetic", "--classes", "pole", "--no-progress"]
    assert class_probe.main([*common, "--run", str(tmp_path / "nothing")]) == 2
    assert "config.yaml: not found" in capsys.readouterr().err
    assert class_probe.main([*common, "--run", str(tmp_path), "--classes", "pole,lamppost"]) == 2  # the last wins
    assert "--classes lamppost: not classes of synthetic" in capsys.readouterr().err
