"""The phases of ``benchmarks/gpu_check.py``, one per process (the orchestrator kills each one whole).

    python benchmarks/gpu_check_phases.py PHASE --device cuda|cpu --work DIR --result FILE.json

Every phase writes FILE.json: ``{"rows": [row, ...], "gpu_peak_gib": float | null}``, a row being
``{"check", "status": "met" | "failed" | "NOT TESTED", "result", "target", "why"}``. A phase that
cannot run what it checks says NOT TESTED and why; it never reports "met" for what it did not run.
The release's sizes (``configs/cityscapes_carb.yaml``): ResNet-50-V1c at output stride 8, 512x1024
crops, batch 4 per GPU, a ViT-B/16 CLIP teacher (random weights, no download), GLV, adaptive CARB,
bf16 and channels-last on the GPU, over 2048x1024 Cityscapes-layout frames. On a CPU (the rehearsal)
the per-image shapes stay the same, the batch is 1 and each phase takes 1-3 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cityscapes_layout import write_cityscapes_layout  # noqa: E402

CONFIG = ROOT / "configs" / "cityscapes_carb.yaml"
CROP = (512, 1024)  # (h, w): the release's training crop
FRAME = (1024, 2048)  # (h, w): a Cityscapes frame
MET, FAILED, NOT_TESTED = "met", "failed", "NOT TESTED"


def row(check: str, status: str, result: str, target: str, why: str = "") -> dict:
    return {"check": check, "status": status, "result": result, "target": target, "why": why}


class Sizes:
    """What one phase runs at on ``device``: the GPU plan, or the CPU rehearsal's smaller batch and steps."""

    def __init__(self, device: torch.device):
        gpu = device.type == "cuda"
        self.batch = 4 if gpu else 1
        self.workers = 4 if gpu else 1
        # steps, and warm-up steps not timed (the CPU rehearsal times its only step, warm-up included)
        self.train_steps, self.timed_after = (20, 4) if gpu else (1, 0)
        self.ddp_steps = 6 if gpu else 1  # the first one is not timed when there are more
        self.layout_reps, self.layout_warmup = (10, 3) if gpu else (1, 0)
        self.frames_train, self.frames_val = (16, 4) if gpu else (4, 1)  # a CPU's ViT-B/16 at 2560x1280: minutes
        # The text side only sets the (19, 512) class embeddings; the 85-template ensemble costs minutes
        # of a 2-core CPU through CLIP's text tower, so the rehearsal uses one template (same shapes).
        self.templates = "ensemble85" if gpu else "single"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def data_root(work: Path) -> Path:
    return work / "cityscapes"


def val_frames(work: Path) -> int:
    """The frames of the generated val split (the data phase wrote them; a reused folder may hold more)."""
    return len(list((data_root(work) / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png")))


def train_overrides(work: Path, device: torch.device, sizes: Sizes, steps: int) -> list[str]:
    """configs/cityscapes_carb.yaml at the release's size, on the generated folder, with random weights
    (no download) and CARB from the first iteration (no 16k warm-up), so the adaptive c is exercised."""
    return [
        f"device={device}", f"data.root={data_root(work)}", "model.pretrained=none", "teacher.clip_pretrained=none",
        f"teacher.cache_dir={work / 'clip_cache'}", f"teacher.text_templates={sizes.templates}",
        f"data.batch_size={sizes.batch}",
        f"data.num_workers={sizes.workers}", f"train.max_iters={steps}", "train.warmup_iters=0",
        "train.eval_interval=0", f"train.checkpoint_interval={steps + 1}", f"train.log_interval={steps}",
    ]


def build_config(overrides: list[str]):
    from carbseg.config import load_config

    return load_config(str(CONFIG), overrides)


def rate(images_per_s: float) -> str:
    """Throughput with its digits: images/s, or s/image when below 0.1 images/s (a CPU at 2048x1024)."""
    if images_per_s >= 0.1:
        return f"{images_per_s:.2f} images/s"
    return f"{1 / images_per_s:.1f} s/image"


def cli(*argv: str) -> None:
    """A carbseg command in this process (so its GPU peak memory is this phase's); raises on failure."""
    from carbseg.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        raise RuntimeError(f"carbseg {argv[0]} exited with status {code}")


# ---------------------------------------------------------------- phases
def phase_data(args, device, sizes) -> list[dict]:
    """The generated Cityscapes-layout folder, its image-level labels and an untrained checkpoint."""
    from carbseg.config import load_config
    from carbseg.data.classes import CITYSCAPES
    from carbseg.engine.checkpoint import save_model
    from carbseg.models.segmenter import build_segmenter
    from carbseg.teacher.build import class_text_embeddings

    started = time.perf_counter()
    root = write_cityscapes_layout(data_root(args.work), {"train": sizes.frames_train, "val": sizes.frames_val},
                                   workers=min(os.cpu_count() or 1, 8))
    for split in ("train", "val"):
        cli("labels", "--dataset", "cityscapes", "--root", root, "--split", split,
            "--out", args.work / f"labels_{split}.json", "--no-progress")
    cfg = load_config(str(CONFIG), ["model.pretrained=none"])
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(CITYSCAPES.num_classes, cfg.model.embed_dim), dim=1)
    model = build_segmenter(cfg.model, CITYSCAPES.num_classes, class_embeddings=embeddings, load_pretrained=False)
    save_model(args.work / "model.safetensors", model, cfg, CITYSCAPES)
    # The random ViT-B/16's class text embeddings, cached once for every phase that builds the teacher.
    class_text_embeddings(CITYSCAPES, "ViT-B-16", "none", device, cache_dir=str(args.work / "clip_cache"),
                          templates=sizes.templates)
    frames = sizes.frames_train + sizes.frames_val
    return [row("data: Cityscapes layout, 2048x1024", MET,
                f"{frames} frames + labels + checkpoint + text embeddings in {time.perf_counter() - started:.1f} s",
                "written and read back by carbseg labels")]


def phase_train(args, device, sizes) -> list[dict]:
    """The trainer's own iteration (Trainer.train_iteration) from its real DataLoader, timed per step,
    and the loader alone over the same samples (item: can 4 workers per GPU feed the step?)."""
    from carbseg.engine.train import Trainer
    from carbseg.engine.train_data import training_loader

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 512x1024 crops: let cuDNN pick the dilated kernels
    cfg = build_config(train_overrides(args.work, device, sizes, sizes.train_steps))
    shutil.rmtree(args.work / "run_train", ignore_errors=True)  # a run of an earlier check is not resumed
    trainer = Trainer(cfg, args.work / "run_train", progress=False)
    print(trainer.setup_line(sizes.train_steps), flush=True)

    # The loader alone: samples/s of the workers decoding 2048x1024 PNGs, resizing and cropping.
    loader_batches = max(sizes.train_steps // 2, 2)
    loader = iter(training_loader(trainer.samples, 0, loader_batches + 1, cfg.data.num_workers))
    next(loader)  # worker start-up is not throughput
    started = time.perf_counter()
    for _ in range(loader_batches):
        next(loader)
    loader_ips = loader_batches * sizes.batch / (time.perf_counter() - started)
    del loader

    step_times, wait_times, values = [], [], {}
    batches = iter(training_loader(trainer.samples, 0, sizes.train_steps, cfg.data.num_workers))
    for iteration in range(sizes.train_steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        values = trainer.train_iteration([batch], iteration, log_terms=iteration == sizes.train_steps - 1)
        sync(device)
        t2 = time.perf_counter()
        trainer.iteration = iteration + 1
        if iteration >= sizes.timed_after:
            wait_times.append(t1 - t0)
            step_times.append(t2 - t1)
    step_s = statistics.median(step_times)
    step_ips = sizes.batch / step_s
    finite = math.isfinite(values.get("total", float("nan")))
    model = trainer.model
    channels_last = all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()
                        if p.dim() == 4)
    expected_amp = torch.bfloat16 if device.type == "cuda" else trainer.amp
    problems = [text for bad, text in ((not finite, f"loss {values.get('total')}"),
                                       (not channels_last, "weights not channels-last"),
                                       (trainer.amp != expected_amp, f"autocast {trainer.amp}, not bf16"))
                if bad]
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(trainer.amp, "fp32")
    name = (f"train: R50-V1c os8 {CROP[0]}x{CROP[1]} b{sizes.batch}, ViT-B/16 teacher, GLV, adaptive CARB, "
            f"{amp}, channels-last")
    return [
        row(name, FAILED if problems else MET,
            f"{step_s * 1e3:.0f} ms/step, {rate(step_ips)} (median of {len(step_times)}; "
            f"loss {values.get('total', float('nan')):.3f}, c {values.get('c', float('nan')):.2f})",
            "finite loss, bf16 on GPU, channels-last", "; ".join(problems)),
        row(f"train loader: {cfg.data.num_workers} workers, 2048x1024 PNG -> {CROP[0]}x{CROP[1]} crops",
            MET if loader_ips >= step_ips else FAILED,
            f"{rate(loader_ips)} alone vs step {rate(step_ips)}; "
            f"waited {1e3 * statistics.median(wait_times):.0f} ms/step in the loop",
            ">= the step's images/s"),
    ]


def phase_ddp(args, device, sizes) -> list[dict]:
    """DDP at world size 1 (train.ddp=always) through torchrun: NCCL + SyncBN on a GPU, gloo on a CPU."""
    import subprocess

    gpu = device.type == "cuda"
    check = "DDP at world size 1 (torchrun, train.ddp=always" + (", NCCL, SyncBN)" if gpu else ", gloo)")
    target = "runs, DDP + SyncBN in the model" if gpu else "runs, DDP over gloo (SyncBN is CUDA-only)"
    cfg = build_config([])
    if not hasattr(cfg.train, "ddp"):
        return [row(check, NOT_TESTED, "-", target,
                    "this carbseg has no train.ddp key: torchrun --nproc_per_node 1 takes the plain path")]
    out = args.work / "run_ddp"
    shutil.rmtree(out, ignore_errors=True)
    report = args.work / "ddp_worker.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
           str(29500 + os.getpid() % 1000), str(Path(__file__).resolve()), "ddp-worker", "--device", str(device),
           "--work", str(args.work), "--result", str(report)]
    started = time.perf_counter()
    code = subprocess.call(cmd, cwd=ROOT)
    seconds = time.perf_counter() - started
    if code != 0 or not report.is_file():
        return [row(check, FAILED, f"torchrun exited with status {code}", target)]
    worker = json.loads(report.read_text())
    problems = worker["problems"]
    return [row(check, FAILED if problems else MET,
                f"{worker['steps']} steps, {worker['ms_per_step']:.0f} ms/step (median"
                f"{' after the first' if worker['steps'] > 1 else ''}); "
                f"1 process; {worker['ddp']}, backend {worker['backend']}, "
                f"{worker['syncbn']} SyncBN layers ({seconds:.0f} s with start-up)",
                target, "; ".join(problems))], worker.get("gpu_peak")


def ddp_worker(args, device) -> None:
    """Inside torchrun: the Trainer with train.ddp=always; reports what it built and ran."""
    import torch.distributed as tdist

    from carbseg import distributed as dist
    from carbseg.engine.train import Trainer
    from carbseg.engine.train_data import training_loader

    sizes = Sizes(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = sizes.ddp_steps
    cfg = build_config(train_overrides(args.work, device, sizes, steps) + ["train.ddp=always"])
    trainer = Trainer(cfg, args.work / "run_ddp", progress=False)
    syncbn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules())
    batches = iter(training_loader(trainer.samples, 0, steps, cfg.data.num_workers))
    times, values = [], {}
    for iteration in range(steps):
        batch = next(batches)
        t0 = time.perf_counter()
        values = trainer.train_iteration([batch], iteration, log_terms=iteration == steps - 1)
        sync(device)
        if iteration or steps == 1:
            times.append(time.perf_counter() - t0)
        trainer.iteration = iteration + 1
    problems = []
    if trainer.ddp is None:
        problems.append("no DistributedDataParallel wrapper")
    if device.type == "cuda" and syncbn == 0:
        problems.append("no SyncBatchNorm on the GPU")
    if not math.isfinite(values.get("total", float("nan"))):
        problems.append(f"loss {values.get('total')}")
    backend = tdist.get_backend() if tdist.is_initialized() else "none"
    result = {"steps": steps, "ms_per_step": 1e3 * statistics.median(times), "syncbn": syncbn,
              "ddp": "DDP" if trainer.ddp is not None else "no DDP", "backend": backend, "problems": problems,
              "gpu_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    if dist.is_main_process():
        args.result.write_text(json.dumps(result))
    dist.shutdown()


@contextlib.contextmanager
def _no_tf32():
    """fp32 products in full fp32 on CUDA (TF32 off) for the duration; a no-op on a CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def phase_layout(args, device, sizes) -> list[dict]:
    """A real NCHW vs channels-last comparison: the same weights, forward + backward, with the layout of
    the first convolution's input checked (the segmenter converts every input to its own layout).

    BatchNorm runs on its running statistics: with batch statistics, a random network's first-layer
    gradient is so ill-conditioned that fp32 summation order alone moves it by several percent (fp64
    agrees to 1e-13 in both layouts), which would hide a layout bug in noise; a bug is an O(1) change."""
    from carbseg.config import load_config
    from carbseg.data.classes import CITYSCAPES
    from carbseg.models.segmenter import build_segmenter
    from carbseg.precision import autocast, segmenter_precision

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = load_config(str(CONFIG), ["model.pretrained=none"])
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(CITYSCAPES.num_classes, cfg.model.embed_dim), dim=1)
    model = build_segmenter(cfg.model, CITYSCAPES.num_classes, class_embeddings=embeddings,
                            load_pretrained=False).to(device).eval()
    amp = segmenter_precision(device).autocast_dtype
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(sizes.batch, 3, *CROP, generator=generator).mul(255).to(device)
    projection = torch.randn(sizes.batch, CITYSCAPES.num_classes, *CROP, generator=generator).to(device)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen: list[bool] = []
    hook = first_conv.register_forward_pre_hook(
        lambda _m, inputs: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)
                                       and not inputs[0].is_contiguous()))
    def forward_backward(dtype):
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            logits = model(images)
        (logits.float() * projection).mean().backward()
        return logits

    results = {}
    for name, fmt in (("NCHW", torch.contiguous_format), ("channels-last", torch.channels_last)):
        model.use_memory_format(fmt)
        seen.clear()
        # The comparison runs in fp32 (TF32 off): a layout bug is an O(1) change in any precision, while
        # bf16 rounds every layer's output and moved this random network's first-conv gradient by ~30%
        # between the layouts on a CPU, noise that would hide (or fake) a bug. The timing runs in `amp`.
        with _no_tf32():
            logits = forward_backward(None)
        compared = (logits.detach().float().cpu(), first_conv.weight.grad.detach().float().cpu().clone())
        times = []
        for rep in range(sizes.layout_warmup + sizes.layout_reps):
            sync(device)
            t0 = time.perf_counter()
            forward_backward(amp)
            sync(device)
            if rep >= sizes.layout_warmup:
                times.append(time.perf_counter() - t0)
        results[name] = (statistics.median(times), *compared, all(seen))
    hook.remove()
    (t_nchw, out_nchw, g_nchw, cl_nchw), (t_cl, out_cl, g_cl, cl_cl) = results["NCHW"], results["channels-last"]
    out_diff = ((out_nchw - out_cl).abs().max() / out_nchw.abs().max().clamp_min(1e-12)).item()
    grad_diff = ((g_nchw - g_cl).norm() / g_nchw.norm().clamp_min(1e-12)).item()
    # fp32 measured on a CPU at 512x1024: 2.3e-6 and 4.7e-3. cuDNN may pick Winograd / FFT kernels, whose
    # fp32 rounding is coarser (tests/test_gpu.py allows 1e-3 of the logits' scale): ten times that margin.
    logits_tol, grad_tol = (1e-3, 5e-2) if device.type == "cuda" else (1e-4, 2e-2)
    problems = []
    if cl_nchw or not cl_cl:
        problems.append(f"layouts not as asked (first conv input channels-last: NCHW run {cl_nchw}, "
                        f"channels-last run {cl_cl})")
    if out_diff > logits_tol or grad_diff > grad_tol:
        problems.append(f"the layouts disagree beyond {logits_tol:g} (logits) / {grad_tol:g} (gradient)")
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32")
    return [row(f"NCHW vs channels-last: R50-V1c os8 {CROP[0]}x{CROP[1]} b{sizes.batch} fwd+bwd, timed in {precision}, "
                "compared in fp32, BN on running statistics", FAILED if problems else MET,
                f"NCHW {t_nchw * 1e3:.0f} ms, channels-last {t_cl * 1e3:.0f} ms ({t_nchw / t_cl:.2f}x); "
                f"logits max rel. diff {out_diff:.1e}, first-conv gradient rel. diff {grad_diff:.1e}",
                f"both layouts really run; agree within {logits_tol:g} / {grad_tol:g}", "; ".join(problems))]


def phase_pseudo_masks(args, device, sizes) -> list[dict]:
    """carbseg pseudo-masks on 2048x1024 frames: ViT-B/16 (random weights), key smoothing, prompt
    denoising, multi-scale."""
    out = args.work / "pseudo_masks"
    shutil.rmtree(out, ignore_errors=True)
    frames = val_frames(args.work)
    started = time.perf_counter()
    cli("pseudo-masks", "--dataset", "cityscapes", "--root", data_root(args.work), "--split", "val",
        "--labels", args.work / "labels_val.json", "--out", out, "--clip-model", "ViT-B-16",
        "--clip-pretrained", "none", "--templates", sizes.templates, "--key-smoothing", "--prompt-denoising", "--scales", "0.75,1.0,1.25",
        "--cache-dir", args.work / "clip_cache", "--device", device, "--batch-size", str(sizes.batch),
        "--workers", str(min(sizes.workers, 2)), "--no-progress")
    seconds = time.perf_counter() - started
    from PIL import Image

    written = sorted(out.glob("*.png"))
    shapes = {Image.open(p).size for p in written}
    ok = len(written) == frames and shapes == {(FRAME[1], FRAME[0])}
    return [row("pseudo-masks: ViT-B/16 2048x1024, key smoothing, prompt denoising, scales 0.75/1/1.25",
                MET if ok else FAILED,
                f"{rate(frames / seconds)} ({frames} frames in {seconds:.1f} s, model build included)",
                "one 2048x1024 mask per frame", "" if ok else f"{len(written)} masks, sizes {shapes}")]


def phase_evaluate(args, device, sizes) -> list[dict]:
    report = args.work / "evaluate.json"
    frames = val_frames(args.work)
    started = time.perf_counter()
    cli("evaluate", "--dataset", "cityscapes", "--root", data_root(args.work), "--split", "val",
        "--checkpoint", args.work / "model.safetensors", "--device", device, "--json", report, "--no-progress")
    seconds = time.perf_counter() - started
    scores = json.loads(report.read_text())
    ok = scores.get("num_images") == frames and math.isfinite(scores.get("pixel_acc", float("nan")))
    return [row("evaluate: checkpoint, whole 2048x1024 frames through its loader", MET if ok else FAILED,
                f"{rate(frames / seconds)} ({frames} frames in {seconds:.1f} s, "
                f"load included); mIoU {scores.get('miou', float('nan')):.1f} (untrained)",
                "every frame scored")]


def phase_predict(args, device, sizes) -> list[dict]:
    from carbseg.engine.checkpoint import load_model
    from carbseg.engine.inference import predict_whole
    from carbseg.precision import segmenter_precision

    loaded = load_model(args.work / "model.safetensors", device=device)
    amp = segmenter_precision(device).autocast_dtype
    images = torch.rand(sizes.batch, 3, *FRAME, generator=torch.Generator().manual_seed(0)).mul(255).to(device)
    reps = 5 if device.type == "cuda" else 1
    if device.type == "cuda":
        predict_whole(loaded.model, images, amp=amp)  # warm-up (cuDNN plans, allocator); a CPU has none
        sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        labels = predict_whole(loaded.model, images, amp=amp)
    sync(device)
    ips = reps * sizes.batch / (time.perf_counter() - started)
    ok_shape = tuple(labels.shape[-2:]) == FRAME
    # The CLI end to end: PNG decode, inference, PNG + overlay writes.
    inputs = data_root(args.work) / "leftImg8bit" / "val"
    out = args.work / "predict"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    cli("predict", "--checkpoint", args.work / "model.safetensors", "--input", inputs, "--out", out,
        "--device", device, "--no-progress")
    frames = val_frames(args.work)
    cli_ips = frames / (time.perf_counter() - started)
    written = len(list(out.glob("*.png")))
    ok = ok_shape and written == frames
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32")
    return [row(f"inference: whole 2048x1024, b{sizes.batch}, {precision}; carbseg predict end to end",
                MET if ok else FAILED,
                f"{rate(ips)} model; {rate(cli_ips)} predict CLI (load + PNGs included)",
                "a 2048x1024 label map per frame", "" if ok else f"shape {tuple(labels.shape)}, {written} files")]


def phase_onnx(args, device, sizes) -> list[dict]:
    from carbseg.engine.checkpoint import load_model
    from carbseg.engine.export import onnx_parity

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return [row("ONNX export + onnxruntime parity on a 2048x1024 frame", NOT_TESTED, "-", "max abs diff <= 1e-3",
                    "onnxruntime is not installed (pip install -e '.[onnx]')")]
    path = args.work / "model.onnx"
    started = time.perf_counter()
    # Free sizes, traced at the crop size: the 2048x1024 frame below then runs through a graph that was
    # not traced at its shape (the stronger shape check), and a CPU saves one full-frame forward.
    cli("export-onnx", "--checkpoint", args.work / "model.safetensors", "--out", path,
        "--height", str(CROP[0]), "--width", str(CROP[1]), "--dynamic")
    export_s = time.perf_counter() - started
    loaded = load_model(args.work / "model.safetensors", device="cpu")  # onnxruntime's side is the CPU
    images = torch.rand(1, 3, *FRAME, generator=torch.Generator().manual_seed(0)).mul(255)
    started = time.perf_counter()
    diff = onnx_parity(loaded.model, path, images)
    parity_s = time.perf_counter() - started
    ok = diff <= 1e-3
    return [row("ONNX export (free sizes, traced at 512x1024) + onnxruntime parity on a 2048x1024 frame "
                "(fp32, CPU runtime)", MET if ok else FAILED,
                f"max abs diff {diff:.1e}; export {export_s:.1f} s, parity {parity_s:.1f} s",
                "max abs diff <= 1e-3")]


def phase_resume(args, device, sizes) -> list[dict]:
    """Exact resume: a run of 2 iterations against one stopped after 1 and resumed with --resume."""
    from safetensors.torch import load_file

    from carbseg.engine.train import Trainer

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    steps = 2
    cfg = build_config(train_overrides(args.work, device, sizes, steps) + ["train.checkpoint_interval=1"])
    straight, stopped = args.work / "run_resume_straight", args.work / "run_resume_stopped"
    for path in (straight, stopped):
        shutil.rmtree(path, ignore_errors=True)

    class KeepFirstCheckpoint(Trainer):
        def save_checkpoint(self):
            path = super().save_checkpoint()
            if self.iteration == 1:  # the state a run stopped after one iteration leaves behind
                stopped.mkdir(parents=True)
                shutil.copy(path, stopped / path.name)
                shutil.copy(self.run_dir.config, stopped / self.run_dir.config.name)
            return path

    KeepFirstCheckpoint(cfg, straight, progress=False).run(steps)
    resumed = Trainer(cfg, stopped, resume=True, progress=False)
    resumed.run(steps)
    a = load_file(straight / "model.safetensors")
    b = load_file(stopped / "model.safetensors")
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    exact = device.type == "cpu"
    tolerance = 0.0 if exact else 1e-4  # CUDA's bilinear backward accumulates with atomics
    ok = diff <= tolerance
    return [row("exact resume: 2 iterations vs 1 + --resume 1 (release size)", MET if ok else FAILED,
                f"max abs weight diff {diff:.1e}", "bit-identical" if exact else f"<= {tolerance:g} (CUDA atomics)")]


def phase_gpu_tests(args, device, sizes) -> list[dict]:
    """The ``gpu``-marked tests; each skipped test is a NOT TESTED row, never a met one."""
    import subprocess

    check = "pytest -m gpu (every test marked gpu under tests/)"
    if device.type != "cuda":
        return [row(check, NOT_TESTED, "-", "all pass", "no CUDA device")]
    junit = args.work / "gpu_tests.xml"
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
                            f"--junitxml={junit}", "tests"], cwd=ROOT)
    return pytest_rows(junit, code, check)


def pytest_rows(junit: Path, code: int, check: str) -> list[dict]:
    """Rows from a pytest JUnit XML report: one summary row (met only when something passed and nothing
    failed or errored; NOT TESTED when nothing ran) and one NOT TESTED row per skipped test, with its reason."""
    import xml.etree.ElementTree as ET

    if not junit.is_file():
        return [row(check, FAILED, f"pytest exited with status {code}, no report", "all pass")]
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    passed, failed, skipped = [], [], []
    for case in cases:
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append((name, case.find("skipped").get("message", "skipped")))
        else:
            passed.append(name)
    counts = f"{len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped"
    if failed or code not in (0, 5):  # 5: pytest collected nothing
        rows = [row(check, FAILED, counts, "all pass", "; ".join(failed) or f"pytest exit status {code}")]
    elif not passed:  # nothing ran: not a pass
        rows = [row(check, NOT_TESTED, counts, "all pass", "no test ran")]
    else:
        rows = [row(check, MET, counts, "all pass")]
    rows += [row(f"  {name}", NOT_TESTED, "skipped", "runs", why) for name, why in skipped]
    return rows


PHASES = {"data": phase_data, "train": phase_train, "ddp": phase_ddp, "layout": phase_layout,
          "pseudo-masks": phase_pseudo_masks, "evaluate": phase_evaluate, "predict": phase_predict,
          "onnx": phase_onnx, "resume": phase_resume, "gpu-tests": phase_gpu_tests}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=[*PHASES, "ddp-worker"])
    p.add_argument("--device", required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    if args.phase == "ddp-worker":
        ddp_worker(args, device)
        return 0
    sizes = Sizes(device)
    args.work.mkdir(parents=True, exist_ok=True)
    gpu_peak = None
    try:
        rows = PHASES[args.phase](args, device, sizes)
        if isinstance(rows, tuple):  # a phase whose GPU work ran in a child reports that child's peak
            rows, gpu_peak = rows
    except Exception as err:  # a crash is this phase's failed row, with the traceback in its log
        traceback.print_exc()
        rows = [row(args.phase, FAILED, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                    "runs")]
    if device.type == "cuda":
        gpu_peak = max(gpu_peak or 0, torch.cuda.max_memory_allocated(device))
    tmp = args.result.with_name(args.result.name + ".tmp")
    tmp.write_text(json.dumps({"rows": rows, "gpu_peak_bytes": gpu_peak}, indent=1))
    tmp.replace(args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
