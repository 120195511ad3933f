"""The CUDA paths on a real GPU (marker ``gpu``: skipped without CUDA; run by benchmarks/gpu_check.py).

Autocast bf16 and fp16 with the GradScaler, cuDNN channels-last against (B, C, H, W), resume
equality without any CUDA generator state, the teacher's bf16 path, the online teacher equal to the
offline one, inference and export on CUDA, and -- with two or more GPUs -- NCCL training with SyncBN
under torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from carbseg.config import ModelConfig
from carbseg.data.classes import SYNTHETIC
from carbseg.data.synthetic import generate_synthetic_dataset
from carbseg.precision import native_bf16
from test_cuda_paths import tiny_config

pytestmark = pytest.mark.gpu
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_synthetic_dataset(root, "train", 4, 64, 128, seed=5, progress=False)
    generate_synthetic_dataset(root, "val", 2, 64, 128, seed=5, progress=False)
    return root


@pytest.mark.parametrize("amp", ["auto", "bf16", "fp16", "off"])
def test_training_under_each_precision(scenes, tmp_path, amp):
    from carbseg.engine.checkpoint import load_training_state
    from carbseg.engine.train import train

    if amp == "bf16" and not native_bf16("cuda"):
        pytest.skip("bf16 is emulated on this GPU")
    cfg = tiny_config(scenes, train={"amp": amp, "max_iters": 6, "eval_interval": 6}, device="cuda")
    weights = load_file(train(cfg, tmp_path / "run", progress=False))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    state = load_training_state(tmp_path / "run" / "checkpoint_last.pt")
    assert "cuda" not in state["rng"]
    if amp == "fp16" or (amp == "auto" and not native_bf16("cuda")):
        assert state["scaler"]["scale"] > 0  # the GradScaler ran


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    diffs = {key: (a[key].double() - b[key].double()).abs().max().item() for key in a}
    key = max(diffs, key=diffs.get)
    return diffs[key], key


def test_resume_on_cuda_equals_an_uninterrupted_run(scenes, tmp_path, monkeypatch):
    """A run stopped at iteration 3 and resumed ends where an uninterrupted run does.

    Bit-equality cannot be asked of a GPU: the CUDA backward of bilinear interpolation (the segmenter's
    upsampling to the image size) accumulates with atomic adds in whatever order the threads finish,
    and ``torch.use_deterministic_algorithms`` has no deterministic kernel for it (strict mode raises).
    So every op that has a deterministic kernel is made to use it (``warn_only``: bilinear's backward
    only warns; cuDNN deterministic, cuBLAS with a fixed workspace), and the tolerance is measured, not
    guessed: a second uninterrupted run gives the noise floor of the remaining atomics, and the resumed
    run must be as close to the first as that, with a margin of 10 and 1e-6 absolute. A resume bug (a
    lost RNG, optimizer, scaler or schedule state) moves the weights by lr x gradient, orders above.
    """
    import warnings

    from carbseg.engine.train import train

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
            cfg = tiny_config(scenes, train={"amp": "off", "max_iters": 6}, device="cuda")
            straight = load_file(train(cfg, tmp_path / "a", progress=False))
            again = load_file(train(cfg, tmp_path / "again", progress=False))
            train(cfg, tmp_path / "b", max_iters=3, progress=False)
            resumed = load_file(train(cfg, tmp_path / "b", resume=True, progress=False))
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
    noise, _ = _largest_difference(straight, again)
    off, key = _largest_difference(straight, resumed)
    assert off <= 10 * noise + 1e-6, f"{key}: resumed differs by {off:.3g}; two straight runs by {noise:.3g}"


def test_cudnn_nchw_and_channels_last_agree():
    """cuDNN's (B, C, H, W) and channels-last kernels, dilated ones included (R50-V1c at output stride 8),
    give the same logits and gradients; each model's layout is asserted at every convolution
    (tests/test_memory_format.py, which runs the same comparison on the CPU). TF32 is off so that
    both compute in fp32 and the CPU test's tolerances hold."""
    from test_memory_format import compare_layouts

    # Every convolution, the classifier's 1x1 included, is cuDNN's; no matmul takes part. cuDNN may
    # choose Winograd or FFT kernels, whose fp32 rounding is coarser than the CPU's direct convolution:
    # the logits get 1e-3 of their scale (a layout that computes something else is off by O(1)).
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        gen = torch.Generator().manual_seed(0)
        compare_layouts((torch.rand(2, 3, 256, 512, generator=gen) * 255).cuda(), logit_tol=1e-3)


def test_depthwise_convolutions_follow_autocast_on_cuda():
    """The CPU rule (depthwise in fp32 under autocast) stays off the GPU: cuDNN's bf16 depthwise is fast."""
    from carbseg.models.depthwise import Fp32DepthwiseConv2d

    module = Fp32DepthwiseConv2d(6, 6, 3, padding=1, groups=6).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert module(torch.randn(1, 6, 8, 8, device="cuda")).dtype == torch.bfloat16


def test_teacher_bf16_path_on_cuda(tiny_clip):
    from carbseg.teacher.build import build_teacher

    cfg = tiny_config(Path("."), teacher=tiny_clip).teacher
    images = torch.rand(2, 3, 256, 512, device="cuda") * 255
    labels = torch.ones(2, SYNTHETIC.num_classes, dtype=torch.bool, device="cuda")
    fp32 = build_teacher(cfg, SYNTHETIC, "cuda", precision="fp32")
    auto = build_teacher(cfg, SYNTHETIC, "cuda", precision="auto")
    assert auto.scores(images).dtype == torch.float32
    agree = (fp32(images, labels) == auto(images, labels)).float().mean().item()
    assert agree > (0.9 if native_bf16("cuda") else 0.999999)


def test_online_teacher_on_cuda_equals_the_offline_one(scenes, tiny_clip, tmp_path, monkeypatch):
    from carbseg.engine import step as step_module
    from carbseg.engine import train as train_module
    from carbseg.teacher.build import build_teacher

    seen = []
    original = step_module.teacher_views

    def recording(teacher, batch, cfg, generator, single_path, **kwargs):
        out = original(teacher, batch, cfg, generator, single_path, **kwargs)
        seen.append((batch["images"].clone(), batch["image_labels"].clone(), batch["valid"].clone(), out[0].clone()))
        return out

    monkeypatch.setattr(step_module, "teacher_views", recording)
    cfg = tiny_config(scenes, teacher=tiny_clip, train={"amp": "auto", "max_iters": 2}, device="cuda")
    train_module.train(cfg, tmp_path / "run", progress=False)
    offline = build_teacher(cfg.teacher, SYNTHETIC, "cuda", precision="auto")
    for images, labels, valid, online in seen:
        assert torch.equal(offline(images, labels, valid=valid), online)


def test_inference_and_export_on_cuda(tmp_path):
    pytest.importorskip("onnx")
    from carbseg.config import Config
    from carbseg.engine.checkpoint import load_model, save_model
    from carbseg.engine.export import export_onnx
    from carbseg.engine.inference import predict_whole
    from carbseg.models.segmenter import build_segmenter

    cfg = Config(name="gpu")
    cfg.model = ModelConfig(backbone="tiny", pretrained="none", classifier="learned", head_channels=16,
                            aspp_dilations=[1, 2])
    model = build_segmenter(cfg.model, SYNTHETIC.num_classes, load_pretrained=False)
    path = save_model(tmp_path / "m.safetensors", model, cfg, SYNTHETIC)
    cpu, gpu = load_model(path, "cpu"), load_model(path, "cuda")
    images = torch.rand(2, 3, 64, 96) * 255
    on_gpu = predict_whole(gpu.model, images.cuda())
    assert on_gpu.dtype == torch.float32
    assert (on_gpu.argmax(1).cpu() == predict_whole(cpu.model, images).argmax(1)).float().mean() > 0.95
    onnx_path = export_onnx(gpu, tmp_path / "m.onnx", height=64, width=96)
    assert next(gpu.model.parameters()).device.type == "cuda"  # the caller's model stays on its GPU
    pytest.importorskip("onnxruntime")
    from carbseg.engine.export import onnx_parity

    gpu.model.train()
    assert onnx_parity(gpu.model, onnx_path, images[:1, :, :48, :80].cuda()) < 1e-4  # CUDA images, free size
    assert gpu.model.training and next(gpu.model.parameters()).device.type == "cuda"


def test_evaluation_ships_pinned_uint8_to_the_gpu(tmp_path):
    from carbseg.engine.evaluate import evaluation_batches
    from carbseg.engine.inference import evaluate_checkpoint
    from test_inference import TinyDataset, _tiny_checkpoint

    batches = list(evaluation_batches(TinyDataset(), batch_size=2, num_workers=2, pin_memory=True))
    assert [len(group) for group, _ in batches] == [2, 1]  # a stacked batch and a single image's view
    assert all(images.dtype == torch.uint8 and images.is_pinned() for _, images in batches)
    path = _tiny_checkpoint(tmp_path)
    on_gpu, _, _ = evaluate_checkpoint(TinyDataset(), path, device="cuda", batch_size=2, progress=False)
    on_cpu, _, _ = evaluate_checkpoint(TinyDataset(), path, device="cpu", batch_size=2, progress=False)
    assert on_gpu.num_images == 3 and on_gpu.matrix.sum() == on_cpu.matrix.sum()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL training needs two GPUs")
def test_torchrun_nccl_training_with_syncbn(scenes, tmp_path):
    import yaml

    from carbseg.config import config_to_dict

    cfg = tiny_config(scenes, model={"backbone": "efficientnet_lite0"}, train={"max_iters": 3}, device="cuda")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "carbseg",
                           "train", "--config", str(path), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
