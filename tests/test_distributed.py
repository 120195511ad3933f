"""DDP: two CPU processes under torchrun (gloo) train one model and only rank 0 writes; ``train.ddp``
(always: DDP in a group of one process; never: a launch of several processes refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from carbseg.data.synthetic import generate_synthetic_dataset
from carbseg.engine.checkpoint import load_model, load_training_state

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # > 30 s on the shared 2-core machine (three interpreters importing torch and open_clip)
def test_two_cpu_processes_train_one_model(tmp_path):
    torch_distributed = pytest.importorskip("torch.distributed")
    if not torch_distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    scenes = tmp_path / "scenes"
    generate_synthetic_dataset(scenes, "train", 5, 64, 128, seed=2, progress=False)
    generate_synthetic_dataset(scenes, "val", 2, 64, 128, seed=2, progress=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(scenes, eval_interval=2)))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "carbseg", "train", "--config", str(config), "--out", str(out), "--max-iters", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("model written to") == 1  # only rank 0 reports and writes

    loaded = load_model(out / "model.safetensors")
    assert loaded.config.name == "ddp"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]  # one writer: no duplicated lines
    assert records[-1]["val_miou"] is not None
    # Iteration 1 is past the warm-up: the CARB queue holds the rank-averaged CE_cons / CE_incons,
    # the same numbers that were logged (also averaged over the two ranks).
    state = load_training_state(out / "checkpoint_last.pt")
    assert state["iteration"] == 2
    assert state["loss_queue"]["consistent"] == pytest.approx([records[1]["consistent"]], rel=1e-5)
    assert state["loss_queue"]["inconsistent"] == pytest.approx([records[1]["inconsistent"]], rel=1e-5)


# ---------------------------------------------------------------- train.ddp
def _tiny_config(scenes: Path, **train) -> dict:
    """The tiny simulated-teacher run of this file's DDP tests; ``train`` overrides train.* keys."""
    return {
        "name": "ddp", "seed": 3, "device": "cpu",
        "data": {"dataset": "synthetic", "root": str(scenes), "crop_size": [32, 64], "scale_size": [64, 128],
                 "batch_size": 2, "num_workers": 0},
        "teacher": {"kind": "simulated", "grid_cell": 8},
        "model": {"backbone": "tiny", "pretrained": "none", "classifier": "learned", "head_channels": 16,
                  "aspp_dilations": [1, 2, 3, 4]},
        "glv": {"patch_size": [16, 32]},
        "train": {"max_iters": 10, "warmup_iters": 1, "eval_interval": 0, "log_interval": 1, **train},
    }


def test_ddp_always_wraps_one_cpu_process_in_ddp_and_trains_the_plain_weights(tmp_path, monkeypatch,
                                                                              one_thread):
    from safetensors.torch import load_file
    from torch.nn.parallel import DistributedDataParallel

    from carbseg import distributed
    from carbseg.config import config_from_dict
    from carbseg.engine.train import Trainer, train

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    scenes = tmp_path / "scenes"
    generate_synthetic_dataset(scenes, "train", 4, 64, 128, seed=2, progress=False)

    plain = train(config_from_dict(_tiny_config(scenes)), tmp_path / "plain", max_iters=2, progress=False)
    assert not distributed.is_distributed()

    trainer = Trainer(config_from_dict(_tiny_config(scenes, ddp="always")), tmp_path / "ddp", progress=False)
    try:
        # A group of one process of its own (no torchrun), gloo on the CPU, and the model inside DDP.
        assert distributed.is_distributed() and distributed.world_size() == 1
        assert torch.distributed.get_backend() == "gloo"
        assert isinstance(trainer.ddp, DistributedDataParallel) and trainer.ddp.module is trainer.model
        assert "1 process (DDP)" in trainer.setup_line(2)
        wrapped = trainer.run(2)
    finally:
        distributed.shutdown()
    a, b = load_file(plain), load_file(wrapped)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a), "DDP at world size 1 must train the plain path's weights"


def test_ddp_never_refuses_a_launch_of_several_processes_with_one_line(monkeypatch):
    from carbseg import distributed
    from carbseg.errors import UserError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda **kw: pytest.fail("never must not join the group"))
    with pytest.raises(UserError, match=r"train.ddp = never, but 2 processes were launched.*train.ddp=auto"):
        distributed.init_from_env("cpu", mode="never")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: nothing to refuse, nothing joined
    distributed.init_from_env("cpu", mode="never")
    assert not distributed.is_distributed()


def test_ddp_always_joins_torchruns_group_of_one(monkeypatch):
    from carbseg import distributed

    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.setdefault("init", kw))
    distributed.init_from_env("cpu", mode="auto")
    assert seen == {}  # auto: one process is the plain path, as before
    distributed.init_from_env("cpu", mode="always")
    assert seen["init"]["backend"] == "gloo" and "store" not in seen["init"]  # torchrun's rendezvous (env://)


def test_ddp_always_on_one_gpu_binds_it_and_uses_nccl(monkeypatch):
    from carbseg import distributed

    seen = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.setdefault("set_device", device))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.setdefault("init", kw))
    distributed.init_from_env(torch.device("cuda", 1), mode="always")
    assert seen["set_device"] == torch.device("cuda", 1)
    init = seen["init"]
    assert init["backend"] == "nccl" and init["device_id"] == torch.device("cuda", 1)
    assert init["rank"] == 0 and init["world_size"] == 1 and init["store"] is not None
