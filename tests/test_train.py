"""End-to-end training on tiny generated scenes: run directory, exact resume, CARB bookkeeping, signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from carbseg.cli import main
from carbseg.config import load_config
from carbseg.data.synthetic import generate_synthetic_dataset
from carbseg.engine.checkpoint import load_model, load_training_state

PROJECT_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_synthetic_dataset(root, "train", 6, 64, 128, seed=1, progress=False)
    generate_synthetic_dataset(root, "val", 2, 64, 128, seed=1, progress=False)
    return root


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 7, "device": "cpu",
        "data": {"dataset": "synthetic", "crop_size": [32, 64], "scale_size": [64, 128], "ratio_range": [0.75, 1.5],
                 "batch_size": 2, "num_workers": 0},
        "teacher": {"kind": "simulated", "grid_cell": 8, "noise": 0.3},
        "model": {"backbone": "tiny", "pretrained": "none", "classifier": "learned", "head_channels": 16,
                  "aspp_dilations": [1, 2, 3, 4]},
        "glv": {"patch_size": [16, 32], "scale_offset": 1.0, "scale_rate": 1.0},
        "train": {"max_iters": 20, "warmup_iters": 3, "lr": 0.01, "eval_interval": 8, "log_interval": 1,
                  "checkpoint_interval": 100},
    }))
    return path


def _train(config_file, scenes, out, *extra) -> int:
    # key=value overrides must form one group on the command line (argparse): options go first.
    overrides = [a for a in extra if "=" in a]
    options = [a for a in extra if "=" not in a]
    return main(["train", "--config", str(config_file), "--out", str(out), *options, f"data.root={scenes}",
                 *overrides])


def test_resume_is_bit_identical_and_run_dir_is_complete(config_file, scenes, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(config_file, scenes, straight, "--max-iters", "8") == 0
    assert _train(config_file, scenes, resumed, "--max-iters", "4") == 0
    assert load_training_state(resumed / "checkpoint_last.pt")["iteration"] == 4
    assert _train(config_file, scenes, resumed, "--max-iters", "8", "--resume") == 0

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a), "resume must continue bit-identically on CPU"
    state_a = load_training_state(straight / "checkpoint_last.pt")
    state_b = load_training_state(resumed / "checkpoint_last.pt")
    assert state_a["iteration"] == state_b["iteration"] == 8
    assert state_a["loss_queue"] == state_b["loss_queue"] and len(state_a["loss_queue"]["consistent"]) == 5

    # The run directory: resolved config, model with its config embedded, one log line per iteration.
    cfg = load_config(straight / "config.yaml")
    assert cfg.data.root == str(scenes) and cfg.seed == 7
    loaded = load_model(straight / "model.safetensors")
    assert loaded.config == cfg and loaded.classes.name == "synthetic"
    records = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 9))
    assert any(p.name.startswith("events.out.tfevents") for p in (straight / "tb").iterdir())
    resumed_records = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["total"] for r in resumed_records] == [r["total"] for r in records]

    # Warm-up (iterations 0..2) is plain CE; afterwards CARB with the adaptive c of the release:
    # this step's CE_cons / CE_incons are pushed, then c = mean(last 5 cons) / mean(last 5 incons).
    assert [r["warmup"] for r in records] == [1.0] * 3 + [0.0] * 5
    for r in records[:3]:
        assert r["c"] == 1.0 and r["total"] == pytest.approx(r["global_ce"] + r["patch_ce"], rel=1e-5)
    carb = records[3:]
    for i, r in enumerate(carb):
        window = carb[max(0, i - 4): i + 1]
        expected_c = np.mean([w["consistent"] for w in window]) / np.mean([w["inconsistent"] for w in window])
        assert r["c"] == pytest.approx(expected_c, rel=1e-5)
        expected_total = r["consistent"] + r["c"] * r["inconsistent"] + r["patch_consistent"] + \
            r["c"] * r["patch_inconsistent"]
        assert r["total"] == pytest.approx(expected_total, rel=1e-4)
        assert r["consistent_share"] == pytest.approx(
            r["consistent_pixels"] / (r["consistent_pixels"] + r["inconsistent_pixels"]), rel=1e-6)
    # lr follows the poly schedule over train.max_iters = 20 (logged value = the lr of that step).
    assert records[0]["lr"] == pytest.approx(0.01)
    assert records[7]["lr"] == pytest.approx((0.01 - 1e-4) * (1 - 7 / 20) ** 0.9 + 1e-4)
    # Validation mIoU at the evaluation step and at the end only.
    assert [r["iteration"] for r in records if r.get("val_miou") is not None] == [8]
    assert 0.0 <= records[7]["val_miou"] <= 100.0


def test_warmup_steps_that_are_not_logged_skip_the_regions_and_train_the_same_weights(config_file, scenes, tmp_path,
                                                                                       monkeypatch):
    from carbseg.losses import carb

    calls = []
    full = carb.carb_loss
    monkeypatch.setattr(carb, "carb_loss", lambda *a, **k: calls.append(k.get("regions", True)) or full(*a, **k))
    every, sparse = tmp_path / "every", tmp_path / "sparse"
    assert _train(config_file, scenes, every, "--max-iters", "8", "train.warmup_iters=5") == 0
    assert calls == [True] * 8
    calls.clear()
    assert _train(config_file, scenes, sparse, "--max-iters", "8", "train.warmup_iters=5", "train.log_interval=2",
                  "train.eval_interval=0") == 0
    # Warm-up iterations 0..4: regions only where the step is logged (done = 2, 4); CARB after it: always.
    assert calls == [False, True, False, True, False, True, True, True]
    a, b = load_file(every / "model.safetensors"), load_file(sparse / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same gradients: the warm-up loss never used them
    logged = {r["iteration"]: r for r in map(json.loads, (every / "log.jsonl").read_text().splitlines())}
    for r in map(json.loads, (sparse / "log.jsonl").read_text().splitlines()):
        same = {k: v for k, v in logged[r["iteration"]].items() if k in r and k not in ("iters_per_s", "val_miou")}
        assert {k: r[k] for k in same} == same  # every logged term as the run that logs every step
    assert load_training_state(every / "checkpoint_last.pt")["loss_queue"] == \
        load_training_state(sparse / "checkpoint_last.pt")["loss_queue"]


def _with_old_keys(cfg: dict) -> dict:
    """A resolved config as carbseg wrote it before the renames: data.resize (w, h), teacher.patch_size."""
    data = {("resize" if k == "scale_size" else k): (v[::-1] if k == "scale_size" else v)
            for k, v in cfg["data"].items()}
    teacher = {("patch_size" if k == "grid_cell" else k): v for k, v in cfg["teacher"].items()}
    return {**cfg, "data": data, "teacher": teacher}


def test_a_run_saved_with_old_keys_resumes_bit_identically(config_file, scenes, tmp_path, caplog):
    # A run folder started before data.resize / teacher.patch_size were renamed keeps its config.yaml
    # (data.resize [128, 64] meant (w, h)): resumed with today's config (data.scale_size [64, 128]),
    # it continues exactly as a run that never stopped, and no config difference is reported.
    import logging

    from safetensors import safe_open
    from safetensors.torch import save_file

    from carbseg.engine.checkpoint import META_CONFIG, read_model_metadata

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(config_file, scenes, straight, "--max-iters", "6") == 0
    assert _train(config_file, scenes, resumed, "--max-iters", "3") == 0
    saved = yaml.safe_load((resumed / "config.yaml").read_text())
    old = _with_old_keys(saved)
    assert old["data"]["resize"] == [128, 64] and old["teacher"]["patch_size"] == 8 and "scale_size" not in old["data"]
    (resumed / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with caplog.at_level(logging.WARNING, logger="carbseg.engine.run_dir"):
        assert _train(config_file, scenes, resumed, "--max-iters", "6", "--resume") == 0
    assert not [r for r in caplog.records if "differs" in r.getMessage()]
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A model.safetensors written before the renames: its embedded config reads as today's.
    with safe_open(str(straight / "model.safetensors"), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata[META_CONFIG] = json.dumps(_with_old_keys(json.loads(metadata[META_CONFIG])))
    old_model = tmp_path / "old_model.safetensors"
    save_file(a, str(old_model), metadata=metadata)
    assert read_model_metadata(old_model) == read_model_metadata(straight / "model.safetensors")
    assert read_model_metadata(old_model)[0].data.scale_size == [64, 128]


def test_fixed_coefficient_and_single_path(config_file, scenes, tmp_path):
    # Single path: offline pseudo-masks (here simply the GT masks copied) instead of the online teacher.
    pseudo = tmp_path / "pseudo"
    shutil.copytree(scenes / "masks" / "train", pseudo)
    out = tmp_path / "run"
    assert _train(config_file, scenes, out, "--max-iters", "4", f"data.pseudo_masks={pseudo}",
                  "carb.fixed_coefficient=0.03", "train.eval_interval=0") == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["c"] for r in records] == [1.0, 1.0, 1.0, 0.03]
    assert "val_miou" not in records[-1]
    assert load_training_state(out / "checkpoint_last.pt")["loss_queue"]["consistent"] == []

    (pseudo / "synth_train_000003.png").unlink()
    assert _train(config_file, scenes, tmp_path / "run2", "--max-iters", "1", f"data.pseudo_masks={pseudo}") == 2


def test_run_directory_guards(config_file, scenes, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    assert _train(config_file, scenes, out, "--max-iters", "1") == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--resume" in err
    assert _train(config_file, scenes, tmp_path / "fresh", "--max-iters", "1", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert _train(config_file, scenes, tmp_path / "x", "--max-iters", "21") == 2  # beyond train.max_iters
    assert "exceeds train.max_iters" in capsys.readouterr().err


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(config_file, scenes, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "carbseg", "train", "--config", str(config_file), "--out", str(out),
           f"data.root={scenes}", "train.eval_interval=0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Generous: on a loaded machine the start (imports, data, model) can take minutes, and a signal
    # sent before training began would meet no handler yet.
    deadline = time.time() + 600
    while not (out / "log.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert (out / "log.jsonl").is_file(), "training logged nothing within 10 minutes"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint written" in err and "Traceback" not in err
    stopped_at = load_training_state(out / "checkpoint_last.pt")["iteration"]
    assert 1 <= stopped_at < 20
    assert not (out / "model.safetensors").exists()
    assert _train(config_file, scenes, out, "--resume", "--max-iters", str(stopped_at + 1),
                  "train.eval_interval=0") == 0
    assert load_training_state(out / "checkpoint_last.pt")["iteration"] == stopped_at + 1
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow  # builds a randomly initialised CLIP text tower (15-40 s on the shared CPU)
def test_text_classifier_is_the_frozen_clip_text_embeddings(config_file, scenes, tmp_path):
    from carbseg.data.classes import SYNTHETIC
    from carbseg.teacher.text_embeddings import class_text_embeddings

    out = tmp_path / "run"
    assert _train(config_file, scenes, out, "--max-iters", "2", "model.classifier=text", "model.head_channels=32",
                  "model.embed_dim=512", "teacher.clip_pretrained=none", "teacher.text_templates=single",
                  "train.eval_interval=0") == 0
    weights = load_file(out / "model.safetensors")
    expected = class_text_embeddings(SYNTHETIC, "ViT-B-16", "none", "cpu", templates="single")
    assert torch.allclose(weights["classifier.class_embeddings"], expected.float(), atol=1e-6)  # not trained


def test_validation_in_training_equals_carbseg_evaluate(config_file, scenes, tmp_path, monkeypatch):
    # The eval section (TTA scales, flip, batch size) is honoured by both, on the same code path.
    from carbseg.engine import inference

    calls = []
    original = inference.predict

    def recording(model, images, **kwargs):
        calls.append((images.shape[0], list(kwargs["scales"]), kwargs["flip"], model.training))
        return original(model, images, **kwargs)

    monkeypatch.setattr(inference, "predict", recording)
    out = tmp_path / "run"
    assert _train(config_file, scenes, out, "--max-iters", "2", "train.eval_interval=2",
                  "eval.scales=[0.75,1.0]", "eval.flip=true", "eval.batch_size=2") == 0
    assert calls == [(2, [0.75, 1.0], True, False)]  # both val images in one batch, TTA, eval mode
    last = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    logged = last["val_miou"]
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--dataset", "synthetic", "--root", str(scenes), "--split", "val",
                 "--checkpoint", str(out / "model.safetensors"), "--json", str(report), "--no-progress"]) == 0
    assert calls == [calls[0]] * 2  # carbseg evaluate: the same settings, from the checkpoint's config
    evaluated = json.loads(report.read_text())
    assert evaluated["num_images"] == 2 and 0.0 < logged <= 100.0
    assert logged == pytest.approx(evaluated["miou"], abs=1e-9)
    # Per-class IoU is logged too (GLV's claim is about small classes), equal to carbseg evaluate's.
    assert {k[len("val_iou."):]: v for k, v in last.items() if k.startswith("val_iou.")} == evaluated["iou"]
