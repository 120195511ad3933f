"""Time one training step of the method, split into its parts, for a plain fp32 step and an optimised one.

Parts: teacher on the global view, teacher on the zoomed GLV patch (zoom + teacher + resize back),
segmenter forward, CARB loss, backward, optimizer step. Each part is timed with a device
synchronisation around it (so the parts add up); the end-to-end step time is measured separately,
without the intermediate synchronisations, and gives the throughput.

The step is the trainer's own (``carbseg.engine.step.training_step``: teacher views with the GLV
patch, segmenter forward, CARB objective after warm-up with c = 1), so what is timed is what is trained.

- ``fp32``: the straightforward step: fp32 everywhere (teacher and segmenter), default memory format,
  every dilated convolution a plain ``nn.Conv2d`` (the step before ``carbseg.models.dilated``).
- ``optimised``: what ``carbseg train`` does: the teacher's blocks and the segmenter at the precision
  ``auto`` chooses (``carbseg.precision``: native bf16 on GPU; on a CPU a timed probe; ``--cpu-amp``
  forces bf16 on a CPU); channels-last weights and activations (``Segmenter.use_memory_format``); on a CPU
  the dilated convolutions of ``carbseg.models.dilated`` (depthwise ones split into channels-last phases,
  the ASPP's skipping their zero-padding products).
- ``optimised-dense-aspp``: ``optimised`` with the ASPP branches as dense convolutions (the optimised
  step skips their zero-padding products on CPU: ``carbseg.models.dilated.PaddingSkippingConv2d``).
- ``optimised-nchw``: ``optimised`` in the (B, C, H, W) layout, as ``carbseg train`` ran on a CPU before it
  went channels-last (a measurement). ``fp32`` runs in that layout too: it is the step before.
- ``optimised-os16``: ``optimised`` at output stride 16 (a config choice: ``model.output_stride=16``,
  as the CamVid study config; coarser logits, so not the same model).
- ``optimised-fp32`` / ``optimised-bf16``: ``optimised`` with the segmenter (and a CLIP teacher) in fp32 /
  under bf16 autocast whatever ``auto`` chose: the rows that show, in the same run, whether ``auto``'s
  answer is the faster one.
- ``optimised-bf16-dw``: ``optimised-bf16`` with the depthwise convolutions in bf16 as well (a measurement:
  the model keeps them fp32 under CPU autocast, ``carbseg.models.depthwise``; this row shows why).

The variants are timed interleaved (one step of each in turn, ``--steps`` rounds, medians), so on a
shared machine every ratio compares steps taken under the same load. The header names the CPU, the
CPU's bf16 flag, the precision each path chose and why, torch, threads and the load average.

CPU, small (default):
    python benchmarks/bench_train_step.py
GPU, the authors' size (R50, 512x1024 crops, batch 4, CLIP ViT-B/16 teacher with random weights):
    python benchmarks/bench_train_step.py --device cuda --backbone resnet50 --height 512 --width 1024 \\
        --batch 4 --patch 512 256 --teacher clip --classifier text
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import resource
import statistics
import time

import numpy as np
import torch

from carbseg.allocator import keep_freed_memory
from carbseg.config import load_config
from carbseg.data.classes import CITYSCAPES
from carbseg.data.synthetic import render_scene
from carbseg.engine.step import batch_to_device, training_step
from carbseg.losses.carb import CARBObjective
from carbseg.models.depthwise import Fp32DepthwiseConv2d
from carbseg.models.dilated import PaddingSkippingConv2d, PhaseSplitDepthwiseConv2d
from carbseg.models.segmenter import build_segmenter
from carbseg.precision import machine_summary, segmenter_precision, teacher_precision
from carbseg.teacher.build import build_teacher

PARTS = ("teacher_global", "teacher_local", "forward", "loss", "backward", "optimizer")
VARIANTS = ("fp32", "optimised", "optimised-dense-aspp", "optimised-nchw", "optimised-os16", "optimised-fp32",
            "optimised-bf16", "optimised-bf16-dw")


class _PhaseSplitFollowingAutocast(PhaseSplitDepthwiseConv2d):
    """Measurement only (``optimised-bf16-dw``): the phase split computed at autocast's precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(x)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="tiny", choices=("tiny", "small", "resnet50_v1c", "resnet101_v1c", "resnet50", "resnet101", "efficientnet_lite0"))
    p.add_argument("--classifier", default="learned", choices=("learned", "text"))
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--patch", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    p.add_argument("--scale", type=float, nargs=2, default=(1.0, 1.0), metavar=("OFFSET", "RATE"))
    p.add_argument("--teacher", default="simulated", choices=("simulated", "clip"),
                   help="clip uses ViT-B/16 with random weights (clip_pretrained=none): same cost, no download")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--interop-threads", type=int, default=None, help="torch inter-op threads")
    p.add_argument("--output-stride", type=int, default=8)
    p.add_argument("--head-channels", type=int, default=None, help="ASPP width (default: the config's)")
    p.add_argument("--cpu-amp", action="store_true",
                   help="the optimised variants use bf16 autocast on CPU whatever precision auto chose")
    p.add_argument("--variants", default="fp32,optimised",
                   help=f"comma-separated: {', '.join(VARIANTS)} (fp32 is the baseline)")
    return p.parse_args()


def make_batch(args) -> dict:
    """A collated training batch (the keys of carbseg.engine.train_data), on the CPU."""
    scenes = [render_scene(1000 + i, args.height, args.width) for i in range(args.batch)]
    # Contiguous NCHW, as the trainer's collate stacks them: a permuted (channels-last) batch made every
    # variant here run channels-last, 20% faster than `carbseg train` on the demo's CPU step.
    images = torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2).contiguous()
    gt = torch.from_numpy(np.stack([s[1] for s in scenes])).long()
    labels = torch.zeros(args.batch, CITYSCAPES.num_classes, dtype=torch.bool)
    for i in range(args.batch):
        present = gt[i].unique()
        labels[i, present[present < CITYSCAPES.num_classes]] = True
    valid = torch.ones_like(gt, dtype=torch.bool)
    return {"images": images, "masks": gt, "image_labels": labels, "valid": valid}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str):
        if self.enabled:
            sync(self.device)
        start = time.perf_counter()
        yield
        if self.enabled:
            sync(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


def _class_in_variant(name: str, module: torch.nn.Module) -> type:
    """The class a segmenter module takes in variant ``name``: ``fp32`` is the step before
    ``carbseg.models.dilated`` (every dilated convolution a plain ``nn.Conv2d``); ``optimised-dense-aspp``
    has dense ASPP branches (to measure what skipping their padding products gives); ``optimised-bf16-dw``
    computes the depthwise convolutions at autocast's precision."""
    cls = type(module)
    if name == "fp32" and cls in (PhaseSplitDepthwiseConv2d, PaddingSkippingConv2d):
        return torch.nn.Conv2d
    if name == "optimised-dense-aspp" and cls is PaddingSkippingConv2d:
        return torch.nn.Conv2d
    if name == "optimised-bf16-dw":
        return {Fp32DepthwiseConv2d: torch.nn.Conv2d, PhaseSplitDepthwiseConv2d: _PhaseSplitFollowingAutocast}.get(cls, cls)
    return cls


def build_variant(name: str, args, device: torch.device, cpu_batch: dict):
    """The step function of one variant (its own model, optimizer, teacher and objective) and the
    precisions it runs at."""
    optimised = name.startswith("optimised")
    stride = 16 if name == "optimised-os16" else args.output_stride
    cfg = load_config(None, [
        f"model.backbone={args.backbone}", f"model.classifier={args.classifier}",
        "model.pretrained=none", f"model.output_stride={stride}",
        f"teacher.kind={args.teacher}", "teacher.clip_pretrained=none", "teacher.grid_cell=16",
        f"glv.patch_size=[{args.patch[0]},{args.patch[1]}]", f"glv.scale_offset={args.scale[0]}",
        f"glv.scale_rate={args.scale[1]}",
    ])
    if args.backbone in ("tiny", "small"):  # the demo's head (configs/demo.yaml)
        cfg.model.head_channels, cfg.model.aspp_dilations = 64, [1, 2, 3, 4]
    if args.head_channels:
        cfg.model.head_channels = args.head_channels
    torch.manual_seed(0)
    forced = (args.cpu_amp or name.startswith("optimised-bf16")) and device.type == "cpu"
    if name == "optimised-fp32":
        amp, teacher_prec = None, "fp32"
    elif optimised:  # as carbseg train: the precision auto chooses (or bf16 with --cpu-amp on a CPU)
        amp = torch.bfloat16 if forced else segmenter_precision(device).autocast_dtype
        teacher_prec = "bf16" if forced else "auto"
    else:
        amp, teacher_prec = None, "fp32"
    teacher = build_teacher(cfg.teacher, CITYSCAPES, device, precision=teacher_prec)
    embeddings = None
    if args.classifier == "text":
        embeddings = torch.nn.functional.normalize(torch.randn(CITYSCAPES.num_classes, cfg.model.embed_dim), dim=1)
    model = build_segmenter(cfg.model, CITYSCAPES.num_classes, class_embeddings=embeddings,
                            load_pretrained=False).to(device).train()
    for module in model.modules():
        module.__class__ = _class_in_variant(name, module)
    if name in ("fp32", "optimised-nchw"):
        model.use_memory_format(torch.contiguous_format)
    batch = batch_to_device(cpu_batch, device)  # NCHW; the segmenter brings it to its layout
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    objective = CARBObjective(warmup_iters=0, fixed_coefficient=1.0)  # CARB after warm-up, c = 1

    def step(timer: Timer, generator: torch.Generator) -> None:
        loss = training_step(model, teacher, batch, cfg, generator, iteration=0, objective=objective,
                             single_path=False, amp=amp, timer=timer.part)
        with timer.part("backward"):
            loss.total.backward()
        with timer.part("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    resolved = getattr(teacher, "resolved_precision", None)
    precision = {"segmenter": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32"),
                 "teacher": resolved(device).name if resolved else None}
    return step, precision


def run_interleaved(names: list[str], args, device: torch.device, cpu_batch: dict) -> dict:
    """Build every variant, then time them interleaved (``time_interleaved``)."""
    built = {name: build_variant(name, args, device, cpu_batch) for name in names}
    return time_interleaved(built, args.steps, args.warmup, device)


def peak_mib_of(device: torch.device, run) -> float | None:
    """The device's peak allocated memory (MiB) while ``run()`` runs; None off CUDA.

    The counter is reset right before, so the figure is this call's own peak, not an earlier one's:
    with the variants interleaved, one reset for all of them gave every row the largest variant's peak.
    It counts every tensor resident on the device, the other variants' weights and optimizer states too.
    """
    if device.type != "cuda":
        run()
        return None
    torch.cuda.reset_peak_memory_stats(device)
    run()
    return torch.cuda.max_memory_allocated(device) / 2**20


def time_interleaved(built: dict, steps: int, warmup: int, device: torch.device) -> dict:
    """Warm-up steps, then ``steps`` rounds of one step per variant in turn (parts timed with device
    synchronisation, each variant's peak memory taken over its own steps), then as many rounds of
    end-to-end steps without them; medians. ``built`` maps a variant's name to (step, precision)."""
    names = list(built)
    generators = {name: torch.Generator().manual_seed(0) for name in names}
    for _ in range(warmup):
        for name, (step, _) in built.items():
            step(Timer(device, False), generators[name])
    parts = {name: Timer(device, True) for name in names}
    peaks: dict[str, float | None] = {name: None for name in names}
    for _ in range(steps):
        for name, (step, _) in built.items():
            peak = peak_mib_of(device, functools.partial(step, parts[name], generators[name]))
            if peak is not None:
                peaks[name] = max(peak, peaks[name] or 0.0)
    step_times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(steps):
        for name, (step, _) in built.items():
            sync(device)
            start = time.perf_counter()
            step(Timer(device, False), generators[name])
            sync(device)
            step_times[name].append(time.perf_counter() - start)
    # On a CPU the process's maximum resident set: it cannot be reset, so it is cumulative over the variants.
    cpu_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {name: {"parts": {k: v / steps for k, v in parts[name].times.items()},
                   "step": statistics.median(step_times[name]), "steps": step_times[name],
                   "peak_mib": cpu_peak if peaks[name] is None else peaks[name], "precision": built[name][1]}
            for name in names}


def main() -> None:
    args = parse_args()
    keep_freed_memory()  # as the carbseg command does (CARBSEG_ALLOCATOR=default: glibc's own thresholds)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.interop_threads:
        torch.set_num_interop_threads(args.interop_threads)
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}")
    print(machine_summary(device))
    seg = segmenter_precision(device)
    line = f"precision auto on {device}: segmenter {seg.name} ({seg.reason})"
    if args.teacher == "clip":
        teacher = teacher_precision("auto", device)
        line += f"; teacher {teacher.name} ({teacher.reason})"
    print(line)
    if args.cpu_amp and device.type == "cpu":
        print("--cpu-amp: the optimised variants use bf16 autocast on CPU whatever auto chose")
    batch = make_batch(args)
    results = run_interleaved(names, args, device, batch)

    print(f"\ndevice {device}, backbone {args.backbone} (output stride {args.output_stride}), classifier "
          f"{args.classifier}, teacher {args.teacher}, batch {args.batch} x {args.height}x{args.width}, patch "
          f"{args.patch[0]}x{args.patch[1]} zoom [{args.scale[0]}, {args.scale[0] + args.scale[1]}), "
          f"{args.warmup} warm-up + {args.steps} timed rounds, variants interleaved")
    header = f"| {'variant':<14} | precision | " + " | ".join(f"{p:>14}" for p in PARTS) + \
        " | sum of parts | step (ms, median) | min-max (ms) | images/s | vs fp32 | teacher share | peak MiB |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    base = results["fp32"]["step"] if "fp32" in results else None
    for name, r in results.items():
        parts = r["parts"]
        total = sum(parts.values())
        teacher_share = (parts["teacher_global"] + parts["teacher_local"]) / total
        prec = r["precision"]["segmenter"] + (f"/{r['precision']['teacher']}" if r["precision"]["teacher"] else "")
        ratio = f"{base / r['step']:.2f}x" if base else "-"
        print(f"| {name:<14} | {prec:>9} | " + " | ".join(f"{1000 * parts[p]:>11.1f} ms" for p in PARTS)
              + f" | {1000 * total:>9.1f} ms | {1000 * r['step']:>17.1f} | "
              f"{1000 * min(r['steps']):.0f}-{1000 * max(r['steps']):.0f} | {args.batch / r['step']:>8.2f} | "
              f"{ratio:>7} | {100 * teacher_share:>12.1f}% | {r['peak_mib']:>8.0f} |")
    if device.type != "cuda":
        print("(CPU peak memory is the process's maximum resident set, cumulative over the variants)")
    if hasattr(os, "getloadavg"):
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
