"""The CUDA-only code paths, checked on CPU where the mechanism allows it.

SyncBN conversion (eval equality, every activation kept), the precision choice on a faked
pre-Ampere GPU, resume with fewer GPUs than the checkpoint saw, device-explicit collectives, the
pseudo-masks device under torchrun, export leaving the caller's model alone, the torch floor, the
current device of a process on cuda:1 and the trainer's cuDNN autotuner.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from carbseg import distributed
from carbseg.config import ModelConfig, config_from_dict

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def tiny_config(root: Path, device: str = "cpu", **sections):
    """A training config that runs in a fraction of a second per iteration on CPU."""
    data = {
        "name": "tiny", "seed": 7, "device": device,
        "data": {"dataset": "synthetic", "root": str(root), "crop_size": [32, 64], "scale_size": [64, 128],
                 "ratio_range": [0.75, 1.5], "batch_size": 2, "num_workers": 0},
        "teacher": {"kind": "simulated", "grid_cell": 8, "noise": 0.3},
        "model": {"backbone": "tiny", "pretrained": "none", "classifier": "learned", "head_channels": 16,
                  "aspp_dilations": [1, 2]},
        "glv": {"patch_size": [16, 32], "scale_offset": 1.0, "scale_rate": 1.0},
        "train": {"max_iters": 4, "warmup_iters": 1, "lr": 0.01, "eval_interval": 0, "log_interval": 1,
                  "checkpoint_interval": 100},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


# ---------------------------------------------------------------- SyncBN
def _lite0_segmenter():
    from carbseg.models.segmenter import build_segmenter

    cfg = ModelConfig(backbone="efficientnet_lite0", pretrained="none", classifier="learned", head_channels=16,
                      aspp_dilations=[1, 2])
    torch.manual_seed(0)
    model = build_segmenter(cfg, 3, load_pretrained=False)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial statistics, so that eval-mode BN does something
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def _applied_activations(model: nn.Module, images: torch.Tensor) -> list[str]:
    """The activations inside BatchNorms (timm's BatchNormAct2d) that actually run in a forward pass."""
    ran: list[str] = []
    hooks = [m.act.register_forward_hook(lambda mod, inp, out: ran.append(type(mod).__name__))
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and hasattr(m, "act")]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return ran


def test_sync_batchnorm_keeps_every_activation_and_equals_the_unconverted_model():
    from carbseg.models.segmenter import convert_sync_batchnorm

    model = _lite0_segmenter()
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        expected = model(images)
    before = _applied_activations(model, images)
    assert len(before) == 48 and before.count("ReLU6") == 32  # projections: BN without activation (Identity)
    keys = list(model.state_dict())

    converted = convert_sync_batchnorm(_lite0_segmenter()).eval()
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)  # ASPP's plain BNs too
    assert _applied_activations(converted, images) == before
    assert list(converted.state_dict()) == keys  # the saved model loads into the unconverted segmenter
    with torch.no_grad():
        assert torch.allclose(converted(images), expected, atol=1e-5, rtol=0)

    # What PyTorch's own converter does (the previous behaviour): every ReLU6 is lost.
    dropped = nn.SyncBatchNorm.convert_sync_batchnorm(_lite0_segmenter()).eval()
    assert _applied_activations(dropped, images) == []  # still attached, never called
    with torch.no_grad():
        assert (dropped(images) - expected).abs().max() > 1.0


# ---------------------------------------------------------------- precision choice
@pytest.mark.parametrize("capability, amp, teacher_bf16", [((7, 0), torch.float16, False),
                                                           ((7, 5), torch.float16, False),
                                                           ((8, 0), torch.bfloat16, True),
                                                           ((9, 0), torch.bfloat16, True)])
def test_precision_for_a_faked_gpu(monkeypatch, capability, amp, teacher_bf16):
    from carbseg.precision import inference_autocast_dtype, native_bf16
    from carbseg.precision import training_autocast_dtype as amp_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # PyTorch says yes to bf16 on a V100 too (emulation): the choice must not rely on it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cuda = torch.device("cuda", 0)
    assert native_bf16(cuda) is teacher_bf16
    assert amp_dtype("auto", cuda) == amp
    assert amp_dtype("off", cuda) is None
    assert amp_dtype("fp16", cuda) == torch.float16 and amp_dtype("bf16", cuda) == torch.bfloat16
    assert inference_autocast_dtype(cuda) == amp  # inference default
    assert inference_autocast_dtype(cuda, torch.float16) == torch.float16  # train.amp=fp16 stays fp16
    assert inference_autocast_dtype(cuda, False) is None  # no autocast


def test_inference_autocast_on_cpu_only_when_asked_or_measured_faster(monkeypatch, tmp_path):
    """The CPU default is the probe's answer, whatever conftest pins for the rest of the suite: with the
    pin removed and the probe faked, no autocast where bf16 measured slower, bf16 where it measured faster."""
    from carbseg import precision
    from carbseg.precision import autocast, inference_autocast_dtype

    monkeypatch.delenv(precision.ENV_CHOICE, raising=False)
    monkeypatch.setenv(precision.ENV_CACHE, str(tmp_path / "cpu_precision.json"))
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    cpu = torch.device("cpu")
    for fp32, bf16, expected in ((0.1, 0.7, None), (2.0, 0.5, torch.bfloat16)):
        monkeypatch.setattr(precision, "_memo", {})
        (tmp_path / "cpu_precision.json").unlink(missing_ok=True)
        monkeypatch.setattr(precision, "measure", lambda workload, under_load=False, t=(fp32, bf16): {
            "fp32": t[0], "bf16": t[1]})
        assert inference_autocast_dtype(cpu) == expected
    assert not isinstance(autocast(cpu, None), torch.autocast)
    assert autocast(cpu, inference_autocast_dtype(cpu, True)).fast_dtype == torch.bfloat16
    assert autocast(cpu, inference_autocast_dtype(cpu, torch.bfloat16)).fast_dtype == torch.bfloat16
    assert inference_autocast_dtype(cpu, False) is None


# ---------------------------------------------------------------- resume on fewer GPUs
def test_resume_ignores_the_cuda_generator_state_of_more_gpus(tmp_path, monkeypatch):
    from carbseg.data.synthetic import generate_synthetic_dataset
    from carbseg.engine.checkpoint import load_training_state, save_training_state
    from carbseg.engine.train import Trainer, train

    root = tmp_path / "scenes"
    generate_synthetic_dataset(root, "train", 2, 64, 128, seed=1, progress=False)
    cfg = tiny_config(root)
    out = tmp_path / "run"
    train(cfg, out, max_iters=1, progress=False)
    state = load_training_state(out / "checkpoint_last.pt")
    assert "cuda" not in state["rng"]  # not saved any more: every iteration reseeds every generator
    # A checkpoint written by an older version on 8 GPUs, resumed where only 2 are visible.
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    save_training_state(out / "checkpoint_last.pt", state)

    def two_gpus_only(states):
        raise IndexError("list index out of range")

    # While the checkpoint is read, the machine looks like one with 2 GPUs (the data loader, which
    # would pin memory for a GPU, runs outside).
    original = Trainer.load_state

    def load_state_with_two_gpus(self):
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            m.setattr(torch.cuda, "device_count", lambda: 2)
            m.setattr(torch.cuda, "set_rng_state_all", two_gpus_only)
            original(self)

    monkeypatch.setattr(Trainer, "load_state", load_state_with_two_gpus)
    assert train(cfg, out, max_iters=2, resume=True, progress=False).is_file()
    assert load_training_state(out / "checkpoint_last.pt")["iteration"] == 2


# ---------------------------------------------------------------- device-explicit collectives
@pytest.fixture
def fake_nccl(monkeypatch):
    calls: list = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.distributed, "barrier", lambda **kw: calls.append(("barrier", kw)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return calls


def test_collectives_name_the_rank_gpu_not_the_current_device(fake_nccl, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.collective_device() == torch.device("cuda", 3)
    assert distributed.collective_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert distributed.collective_device("cpu") == torch.device("cuda", 3)  # a CPU tensor still goes to GPU 3
    distributed.barrier()
    distributed.barrier(torch.device("cuda", 5))
    assert fake_nccl == [("barrier", {"device_ids": [3]}), ("barrier", {"device_ids": [5]})]
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device(torch.device("cuda", 1)) == torch.device("cpu")


def test_init_binds_each_rank_to_its_gpu(monkeypatch):
    seen = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.setdefault("set_device", device))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.setdefault("init", kw))
    distributed.init_from_env("cuda")
    assert seen["set_device"] == torch.device("cuda", 1)
    assert seen["init"]["backend"] == "nccl" and seen["init"]["device_id"] == torch.device("cuda", 1)


def test_pseudo_masks_refuses_one_gpu_for_every_torchrun_rank(monkeypatch, tmp_path, capsys):
    from carbseg.cli import main

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    # Two GPUs as far as the device check can tell (none is touched before the refusal).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code = main(["pseudo-masks", "--dataset", "synthetic", "--root", str(tmp_path), "--split", "train",
                 "--labels", str(tmp_path / "labels.json"), "--out", str(tmp_path / "out"), "--device", "cuda:0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "LOCAL_RANK" in err[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- export
def test_export_leaves_the_callers_model_alone(tmp_path):
    pytest.importorskip("onnx")
    from carbseg.config import Config
    from carbseg.data.classes import CAMVID
    from carbseg.engine.checkpoint import LoadedModel, load_model, save_model
    from carbseg.engine.export import export_onnx
    from carbseg.models.segmenter import build_segmenter

    cfg = Config(name="export")
    cfg.model = ModelConfig(backbone="tiny", pretrained="none", classifier="learned", head_channels=8,
                            aspp_dilations=[1])
    model = build_segmenter(cfg.model, CAMVID.num_classes, load_pretrained=False)
    loaded = load_model(save_model(tmp_path / "m.safetensors", model, cfg, CAMVID))
    caller = loaded.model.double().train()  # stands for a model the caller keeps on its GPU in training
    export_onnx(LoadedModel(**{**vars(loaded), "model": caller}), tmp_path / "m.onnx", height=16, width=16)
    assert caller.training and next(caller.parameters()).dtype == torch.float64


# ---------------------------------------------------------------- torch version floor
# API used by the package -> the first torch release that has it.
TORCH_FEATURES = {
    r"torch\.amp\.GradScaler": (2, 3),
    r"dynamo=False": (2, 5),
    r"device_id\b": (2, 3),
    r"weights_only=True": (1, 13),
}
TORCHVISION_FOR_TORCH = {(2, 3): (0, 18), (2, 4): (0, 19), (2, 5): (0, 20), (2, 6): (0, 21)}


def _floor(requirement: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9.]+)", requirement)
    assert match, requirement
    return tuple(int(p) for p in match.group(1).split("."))


def test_torch_floor_covers_every_api_the_code_uses():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    by_name = {re.split(r"[<>=\s]", d, maxsplit=1)[0]: d for d in deps}
    torch_floor, vision_floor = _floor(by_name["torch"]), _floor(by_name["torchvision"])
    source = "\n".join(p.read_text(encoding="utf-8") for p in (PROJECT_ROOT / "src").rglob("*.py"))
    needed = max(version for pattern, version in TORCH_FEATURES.items() if re.search(pattern, source))
    assert needed == (2, 5)  # the patterns do find what the code uses
    assert torch_floor >= needed, f"pyproject allows torch {torch_floor}, the code needs {needed}"
    assert vision_floor >= TORCHVISION_FOR_TORCH[torch_floor[:2]]
    installed = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= torch_floor[:2]


# ---------------------------------------------------------------- one process on a GPU other than 0
def test_a_process_on_cuda_1_makes_it_the_current_device_first(monkeypatch):
    from carbseg.devices import process_device

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    assert process_device("cuda:1") == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]  # the pin-memory thread then pins for GPU 1, not GPU 0
    assert process_device("cpu") == torch.device("cpu") and process_device("cuda") == torch.device("cuda")
    assert current == [torch.device("cuda", 1)]  # "cuda" is the current device already: nothing to set


# ---------------------------------------------------------------- cuDNN autotuner
class _StopAfterDevice(Exception):
    pass


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_trainer_turns_on_the_cudnn_autotuner_on_a_gpu_only(monkeypatch, tmp_path, device):
    from carbseg.engine import train

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    monkeypatch.setattr(train, "process_device", lambda name, option="": torch.device(device))

    def stop(*args, **kwargs):
        raise _StopAfterDevice  # nothing after the device choice can run without a GPU

    monkeypatch.setattr(train.dist, "init_from_env", stop)
    with pytest.raises(_StopAfterDevice):
        train.Trainer(tiny_config(tmp_path, device="cpu"), tmp_path / "run", progress=False)
    assert torch.backends.cudnn.benchmark is (device == "cuda")
