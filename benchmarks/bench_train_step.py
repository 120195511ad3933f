"""Time one training step of the method, split into its parts, for a plain fp32 step and an optimised one.

Parts: teacher on the global view, teacher on the zoomed GLV patch (zoom + teacher + resize back),
segmenter forward, CARB loss, backward, optimizer step. Each part is timed with a device
synchronisation around it (so the parts add up); the end-to-end step time is measured separately,
without the intermediate synchronisations, and gives the throughput.

The step is the trainer's own (``carbseg.engine.step.training_step``: teacher views with the GLV
patch, segmenter forward, CARB objective after warm-up with c = 1), so what is timed is what is trained.

- ``fp32``: the straightforward step: fp32 everywhere (teacher and segmenter), default memory format.
- ``optimised``: what ``carbseg train`` does: on GPU (or with ``--cpu-amp``) the teacher's blocks and
  the segmenter under bf16 autocast; channels-last on GPU.

CPU, small (default):
    python benchmarks/bench_train_step.py
GPU, the authors' size (R50, 512x1024 crops, batch 4, CLIP ViT-B/16 teacher with random weights):
    python benchmarks/bench_train_step.py --device cuda --backbone resnet50 --height 512 --width 1024 \\
        --batch 4 --patch 512 256 --teacher clip --classifier text
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import numpy as np
import torch

from carbseg.config import load_config
from carbseg.data.classes import CITYSCAPES
from carbseg.data.synthetic import render_scene
from carbseg.engine.step import batch_to_device, training_step
from carbseg.losses.carb import CARBObjective
from carbseg.models.segmenter import build_segmenter
from carbseg.teacher.build import build_teacher

PARTS = ("teacher_global", "teacher_local", "forward", "loss", "backward", "optimizer")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="tiny", choices=("tiny", "resnet50_v1c", "resnet101_v1c", "resnet50", "resnet101", "efficientnet_lite0"))
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
    p.add_argument("--cpu-amp", action="store_true", help="bf16 autocast for the segmenter on CPU too")
    p.add_argument("--variants", default="fp32,optimised")
    return p.parse_args()


def make_batch(args) -> dict:
    """A collated training batch (the keys of carbseg.engine.train_data), on the CPU."""
    scenes = [render_scene(1000 + i, args.height, args.width) for i in range(args.batch)]
    images = torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2)
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


def run_variant(name: str, args, device: torch.device, cpu_batch: dict) -> dict:
    optimised = name == "optimised"
    cfg = load_config(None, [
        f"model.backbone={args.backbone}", f"model.classifier={args.classifier}",
        "model.pretrained=none",
        f"teacher.kind={args.teacher}", "teacher.clip_pretrained=none", "teacher.grid_cell=16",
        f"glv.patch_size=[{args.patch[0]},{args.patch[1]}]", f"glv.scale_offset={args.scale[0]}",
        f"glv.scale_rate={args.scale[1]}",
    ])
    if args.backbone == "tiny":
        cfg.model.head_channels, cfg.model.aspp_dilations = 64, [1, 2, 3, 4]
    torch.manual_seed(0)
    use_amp = optimised and (device.type == "cuda" or args.cpu_amp)
    # As carbseg train: bf16 CLIP blocks on GPU or with AMP asked for; fp32 otherwise.
    teacher = build_teacher(cfg.teacher, CITYSCAPES, device, precision="bf16" if use_amp else "fp32")
    embeddings = None
    if args.classifier == "text":
        embeddings = torch.nn.functional.normalize(torch.randn(CITYSCAPES.num_classes, cfg.model.embed_dim), dim=1)
    model = build_segmenter(cfg.model, CITYSCAPES.num_classes, class_embeddings=embeddings,
                            load_pretrained=False).to(device).train()
    channels_last = optimised and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch = batch_to_device(cpu_batch, device, channels_last=channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    amp = torch.bfloat16 if use_amp else None
    objective = CARBObjective(warmup_iters=0, fixed_coefficient=1.0)  # CARB after warm-up, c = 1

    def step(timer: Timer, generator: torch.Generator) -> None:
        loss = training_step(model, teacher, batch, cfg, generator, iteration=0, objective=objective,
                             single_path=False, amp=amp, timer=timer.part)
        with timer.part("backward"):
            loss.total.backward()
        with timer.part("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    generator = torch.Generator().manual_seed(0)
    for _ in range(args.warmup):
        step(Timer(device, False), generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parts = Timer(device, True)
    for _ in range(args.steps):
        step(parts, generator)
    step_times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        step(Timer(device, False), generator)
        sync(device)
        step_times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"parts": {k: v / args.steps for k, v in parts.times.items()},
            "step": statistics.median(step_times), "peak_mib": peak}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = make_batch(args)
    results = {name: run_variant(name, args, device, batch) for name in args.variants.split(",")}

    print(f"\ndevice {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"threads {torch.get_num_threads()}, backbone {args.backbone}, classifier {args.classifier}, "
          f"teacher {args.teacher}, batch {args.batch} x {args.height}x{args.width}, patch {args.patch[0]}x"
          f"{args.patch[1]} zoom [{args.scale[0]}, {args.scale[0] + args.scale[1]}), {args.steps} steps")
    header = f"| {'variant':<10} | " + " | ".join(f"{p:>14}" for p in PARTS) + \
        " | sum of parts | step (ms) | images/s | teacher share | peak MiB |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, r in results.items():
        parts = r["parts"]
        total = sum(parts.values())
        teacher_share = (parts["teacher_global"] + parts["teacher_local"]) / total
        print(f"| {name:<10} | " + " | ".join(f"{1000 * parts[p]:>11.1f} ms" for p in PARTS)
              + f" | {1000 * total:>9.1f} ms | {1000 * r['step']:>9.1f} | {args.batch / r['step']:>8.2f} |"
              f" {100 * teacher_share:>12.1f}% | {r['peak_mib']:>8.0f} |")
    if "fp32" in results and "optimised" in results:
        print(f"\nthroughput optimised / fp32: {results['fp32']['step'] / results['optimised']['step']:.2f}x")
    if device.type != "cuda":
        print("(CPU peak memory is the process's maximum resident set, cumulative over both variants)")


if __name__ == "__main__":
    main()
