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


@pytest.mark.parametrize("log_interval", [1, 100])  # 100: the guard's flags are read at the end only
def test_a_diverged_run_stops_with_one_line(scenes, tmp_path, capsys, monkeypatch, log_interval):
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"log_interval": log_interval})
    _poison_logits_at(monkeypatch, None)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--max-iters", "8"]) == 2
    error_line(capsys.readouterr().err, "train", f"NaN/Inf at {MAX_CONSECUTIVE_NONFINITE} consecutive iterations",
               "lower train.lr")


@pytest.mark.parametrize("on_device", [True, False])  # a GPU's way / a CPU's way
def test_an_unlogged_nan_step_is_undone_on_the_device_and_counted_at_the_next_logged_one(scenes, tmp_path,
                                                                                         monkeypatch, caplog,
                                                                                         on_device):
    from carbseg.config import load_config
    from carbseg.engine.train import Trainer
    from carbseg.engine.train_data import training_loader

    # Adaptive CARB from the first iteration: the queue must not take the NaN step's terms either.
    config = tiny_train_config(tmp_path / "tiny.yaml", scenes, train={"warmup_iters": 0, "log_interval": 100})
    trainer = Trainer(load_config(config), tmp_path / "run", progress=False)
    trainer.undo_nonfinite_on_device = on_device
    batches = list(training_loader(trainer.samples, 0, 3, 0))
    assert trainer.train_iteration([batches[0]], 0, log_terms=False) is None

    def snapshot():
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        momentum = {id(p): s["momentum_buffer"].clone() for p, s in trainer.optimizer.state.items()}
        return params, momentum

    params, momentum = snapshot()
    queue = trainer.objective.state_dict()
    _poison_logits_at(monkeypatch, {0})  # the next carb_loss call: iteration 1
    assert trainer.train_iteration([batches[1]], 1, log_terms=False) is None
    after, after_momentum = snapshot()
    assert all(torch.equal(params[n], after[n]) for n in params)  # not one weight moved
    assert momentum.keys() == after_momentum.keys() and len(momentum) > 5
    assert all(torch.equal(momentum[k], after_momentum[k]) for k in momentum)  # nor the optimizer state
    assert trainer.objective.state_dict() == queue  # the NaN terms never joined the CARB queue
    if on_device:  # not read yet: no device sync
        assert trainer.nonfinite.skipped == 0 and "non-finite" not in caplog.text
    else:  # read at once: on a CPU it waits for nothing
        assert trainer.nonfinite.skipped == 1 and "iteration 1: non-finite" in caplog.text
    logged = trainer.train_iteration([batches[2]], 2, log_terms=True)
    assert logged["nonfinite_skipped"] == 1.0 and np.isfinite(logged["total"])
    assert "iteration 1: non-finite loss (NaN/Inf); step skipped" in caplog.text
    assert len(trainer.objective.queue) == 2 and not any(torch.equal(params[n], p) for n, p in
                                                         trainer.model.named_parameters() if p.requires_grad)


def test_every_rank_reads_the_deferred_flags_at_a_checkpoint(scenes, tmp_path):
    """Rank 0 alone writes the checkpoint; the others must still count (and stop) with it."""
    from carbseg.config import load_config
    from carbseg.engine.train import Trainer

    config = tiny_train_config(tmp_path / "tiny.yaml", scenes)
    trainer = Trainer(load_config(config), tmp_path / "run", progress=False)
    trainer.is_main = False  # stands for rank 1
    for iteration in range(MAX_CONSECUTIVE_NONFINITE):
        trainer.nonfinite.defer(torch.tensor(False), iteration)
    with pytest.raises(DivergedError, match=f"iteration {MAX_CONSECUTIVE_NONFINITE - 1}: "):
        trainer.save_checkpoint()
    assert trainer.nonfinite.skipped == MAX_CONSECUTIVE_NONFINITE
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


def test_step_unless_nonfinite_undoes_sgd_exactly_and_keeps_a_finite_step():
    from carbseg.engine.guards import step_unless_nonfinite

    def setup():
        weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=0.01)
        return weight, optimizer

    def step(weight, optimizer, grad, finite):
        weight.grad = torch.tensor(grad)
        step_unless_nonfinite(optimizer, torch.tensor(finite), optimizer.step)

    plain, plain_optimizer = setup()
    guarded, guarded_optimizer = setup()
    # A skipped first step leaves the weights alone and a zero buffer, from which SGD continues exactly
    # as from no buffer: the same weights as a run without the NaN step.
    step(guarded, guarded_optimizer, [float("nan"), 1.0, 1.0], False)
    assert torch.equal(guarded.detach(), torch.tensor([1.0, -2.0, 3.0]))
    for grad in ([0.5, 0.25, -1.0], [1.0, 2.0, 3.0]):
        step(plain, plain_optimizer, grad, True)
        step(guarded, guarded_optimizer, grad, True)
    assert torch.equal(plain.detach(), guarded.detach())
    # Hand-computed: buf1 = g1 + wd w0; w1 = w0 - lr buf1; buf2 = 0.9 buf1 + g2 + wd w1; w2 = w1 - lr buf2.
    w0, g1 = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 0.25, -1.0])
    g2 = torch.tensor([1.0, 2.0, 3.0])
    buf1 = g1 + 0.01 * w0
    w1 = w0 - 0.1 * buf1
    buf2 = 0.9 * buf1 + g2 + 0.01 * w1
    assert torch.allclose(guarded.detach(), w1 - 0.1 * buf2, atol=1e-6)
    # A skipped later step: weights and momentum stay bit-identical.
    before, buffer = guarded.detach().clone(), guarded_optimizer.state[guarded]["momentum_buffer"].clone()
    step(guarded, guarded_optimizer, [float("inf"), 0.0, 0.0], False)
    assert torch.equal(guarded.detach(), before)
    assert torch.equal(guarded_optimizer.state[guarded]["momentum_buffer"], buffer)


def test_step_unless_nonfinite_keeps_channels_last_weights_in_place():
    from carbseg.engine.guards import step_unless_nonfinite

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(4, 3, 3, 3, generator=generator)
    grads = [torch.randn(4, 3, 3, 3, generator=generator) for _ in range(2)]
    results = []
    for guarded in (False, True):
        weight = torch.nn.Parameter(start.clone().to(memory_format=torch.channels_last))
        bias = torch.nn.Parameter(torch.zeros(4))
        optimizer = torch.optim.SGD([weight, bias], lr=0.1, momentum=0.9)
        for grad in grads:
            weight.grad, bias.grad = grad.to(memory_format=torch.channels_last), torch.ones(4)
            if guarded:
                step_unless_nonfinite(optimizer, torch.tensor(True), optimizer.step)
            else:
                optimizer.step()
        assert weight.is_contiguous(memory_format=torch.channels_last)
        results.append((weight.detach().clone(), bias.detach().clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


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
