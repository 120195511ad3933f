"""Reliability matrix, numerics: NaN/Inf steps are skipped (then a clear stop), the loss is computed in
fp32 under bf16/fp16 autocast, and an all-ignore batch gives a loss of exactly 0."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import carbseg.losses.carb as carb
from carbseg.cli import main
from carbseg.engine.guards import MAX_CONSECUTIVE_NONFINITE, DivergedError, NonFiniteGuard, any_rank_nonfinite
from carbseg.losses.carb import carb_loss
from test_reliability_common import error_line, make_scenes, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"))


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- NaN / Inf
def test_guard_counts_skips_and_stops_after_consecutive_ones():
    guard = NonFiniteGuard(patience=3)
    for skipped in (True, True, False, True, True):
        guard.record(skipped, iteration=0)
    assert (guard.consecutive, guard.skipped) == (2, 4)
    with pytest.raises(DivergedError, match="NaN/Inf at 3 consecutive iterations"):
        guard.record(True, iteration=9)
    restored = NonFiniteGuard(patience=3)
    restored.load_state_dict(guard.state_dict())
    assert (restored.consecutive, restored.skipped) == (3, 5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_carb_term_is_checked(bad):
    """A non-finite logit reaches the terms of its pixel's region; the guard sees any of them."""
    logits = torch.zeros(1, 3, 2, 2)
    teacher = torch.tensor([[[0, 1], [2, 255]]])
    labels = torch.ones(1, 3, dtype=torch.bool)
    assert not any_rank_nonfinite(_terms(carb_loss(logits, teacher, logits, teacher, labels)), "cpu")
    poisoned = logits.clone()
    poisoned[0, 1, 0, 1] = bad  # a pixel of the patch view only
    terms = carb_loss(logits, teacher, poisoned, teacher, labels)
    assert torch.isfinite(terms.global_ce) and torch.isfinite(terms.consistent)
    assert any_rank_nonfinite(_terms(terms), "cpu")


def _terms(t):
    return [t.global_ce, t.patch_ce, t.consistent, t.inconsistent, t.patch_consistent, t.patch_inconsistent]


def _poison_logits_at(monkeypatch, calls: set[int] | None):
    """Make carb_loss see NaN logits at the given call numbers (None: always)."""
    original = carb.carb_loss
    count = {"n": 0}

    def poisoned(global_logits, *args, **kwargs):
        n = count["n"]
        count["n"] += 1
        if calls is None or n in calls:
            global_logits = global_logits * float("nan")
        return original(global_logits, *args, **kwargs)

    monkeypatch.setattr(carb, "carb_loss", poisoned)


def test_a_nan_step_is_skipped_and_leaves_the_weights_unchanged(scenes, tmp_path, monkeypatch):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(reference), "--max-iters", "2"]) == 0
    _poison_logits_at(monkeypatch, {2})  # the third iteration
    assert main(["train", "--config", str(config), "--out", str(run), "--max-iters", "3"]) == 0
    records = _records(run)
    assert [r["nonfinite_skipped"] for r in records] == [0.0, 0.0, 1.0]
    assert records[2]["total"] is None and all(np.isfinite(r["total"]) for r in records[:2])
    # The skipped step changed no parameter (BatchNorm running statistics did see the batch).
    a, b = load_file(reference / "model.safetensors"), load_file(run / "model.safetensors")
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    assert len(params) > 5 and all(torch.equal(a[k], b[k]) for k in params)


def test_a_diverged_run_stops_with_one_line(scenes, tmp_path, capsys, monkeypatch):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    _poison_logits_at(monkeypatch, None)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--max-iters", "8"]) == 2
    error_line(capsys.readouterr().err, "train", f"NaN/Inf at {MAX_CONSECUTIVE_NONFINITE} consecutive iterations",
               "lower train.lr")


# ---------------------------------------------------------------- bf16 / fp16
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_is_computed_in_fp32_from_half_precision_logits(dtype):
    """CE = 32768 - (-32768) = 65536: beyond fp16's largest value (65504), exact in fp32."""
    logits = torch.tensor([32768.0, -32768.0]).view(1, 2, 1, 1).to(dtype)
    teacher = torch.tensor([[[1]]])
    terms = carb_loss(logits, teacher, None, None, torch.ones(1, 2, dtype=torch.bool))
    assert terms.global_ce.dtype == torch.float32 and terms.global_ce.item() == 65536.0
    assert terms.warmup_loss().item() == 65536.0


def test_bf16_autocast_training_on_cpu_stays_finite(scenes, tmp_path):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"amp": "bf16"})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--max-iters", "3"]) == 0
    records = _records(tmp_path / "run")
    assert all(np.isfinite(r["total"]) and r["nonfinite_skipped"] == 0.0 for r in records)


def test_fp16_without_a_gpu_is_one_line(scenes, tmp_path, capsys):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"amp": "fp16"})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--max-iters", "1"]) == 2
    error_line(capsys.readouterr().err, "train", "train.amp = fp16 needs a CUDA GPU")


# ---------------------------------------------------------------- all-ignore batch
@pytest.mark.parametrize("warmup", [True, False])
def test_all_ignore_batch_gives_zero_loss_and_zero_gradients(warmup):
    logits = torch.randn(2, 4, 3, 5, requires_grad=True)
    teacher = torch.full((2, 3, 5), 255)
    patch_logits = logits[:, :, :2, :2]
    terms = carb_loss(logits, teacher, patch_logits, teacher[:, :2, :2], torch.ones(2, 4, dtype=torch.bool))
    total = terms.warmup_loss() if warmup else terms.balanced_loss(0.5)
    assert total.item() == 0.0 and all(t.item() == 0.0 for t in _terms(terms))
    assert terms.consistent_pixels.item() == terms.inconsistent_pixels.item() == 0
    total.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_training_on_all_ignore_pseudo_masks_runs_with_zero_loss(scenes, tmp_path):
    pseudo = tmp_path / "pseudo"
    shutil.copytree(scenes / "masks" / "train", pseudo)
    for path in pseudo.iterdir():
        Image.fromarray(np.full((32, 64), 255, np.uint8)).save(path)
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, data={"pseudo_masks": str(pseudo)})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--max-iters", "3"]) == 0
    records = _records(tmp_path / "run")
    assert [r["total"] for r in records] == [0.0, 0.0, 0.0]  # warm-up (2) and one CARB step
    assert [r["nonfinite_skipped"] for r in records] == [0.0, 0.0, 0.0]
