"""Pseudo-masks per second of the CLIP teacher (ViT-B/16 value path) against a straightforward baseline.

baseline:      one image at a time, fp32: the full standard forward (``encode_image``: every block
               with its attention, CLS pooling), then a separate value-path pass (the trunk again,
               the last block by the value path), scores, upsampling, -inf restriction, argmax.
               Both baselines run open_clip's own modules (conv1, each block's forward).
baseline-hook: a stronger baseline: the same, but the value path reuses the tokens entering the
               last block, captured by a hook during the standard forward (one trunk).
carbseg:       ``CLIPTeacher``: batched, the patch embedding as one GEMM and the blocks' attention
               through SDPA (``DenseCLIP._tokens_before_last_block``), the last block's query-key
               attention never computed, at the precision ``--precision auto`` chooses
               (``carbseg.precision.teacher_precision``: bf16 on GPUs with native bf16, fp16 on older
               ones; on a CPU bf16 only where a timed probe of a ViT block measured it >= 1.2x faster).
carbseg-fp32:  ``carbseg`` in fp32 whatever ``--precision`` says: the row that shows whether ``auto``
               pays. Run by default only when ``auto`` (or ``--precision``) gives bf16 or fp16; otherwise it
               is the same computation as ``carbseg``.
carbseg-sclip, carbseg-clearclip, carbseg-naclip: the same teacher with ``teacher.dense`` set to
               the other dense forms of the last block (attention over all tokens comes back; NACLIP
               with sigma 5). Their masks are not MaskCLIP's by design, so their "identical pixels"
               column is left empty (on random weights any agreement would mean nothing).

Each mode runs in its own process so that peak memory (RSS on CPU, allocator peak on GPU) is
its own. With ``--rounds R`` the modes run in turn R times (baseline, ..., carbseg, baseline, ...) and
each images/s is the median over its rounds, so every ratio against the baseline compares runs taken
under the same load. The header names the machine (CPU model, the CPU's bf16 flag, torch, threads,
load average) and the precision ``auto`` chose and why. Weights are random (no CLIP weights here), text embeddings random unit vectors: the
speed is that of the real model, and agreement is measured on the same inputs in both modes.

    python benchmarks/bench_teacher.py                         # 1024x512, 8 images, batch 4
    python benchmarks/bench_teacher.py --size 512x256 --images 4 --batch 2   # smoke run
    python benchmarks/bench_teacher.py --size 1024x512 --images 2 --batch 2 --rounds 3   # interleaved rounds
    python benchmarks/bench_teacher.py --modes carbseg,carbseg-naclip        # a subset of the modes
    python benchmarks/bench_teacher.py --interleaved 5 --size 1024x512       # dense variants only

``--interleaved R`` compares the four dense variants in ONE process on one model: R rounds, each
timing every variant once in turn, median per variant. On a shared or throttling machine this
ranks the variants more reliably than separate processes run one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("baseline", "baseline-hook", "carbseg", "carbseg-fp32", "carbseg-sclip", "carbseg-clearclip",
         "carbseg-naclip")


def make_inputs(n: int, height: int, width: int, num_classes: int = 19, seed: int = 0):
    """Smooth random 'scenes' (low-frequency colour fields) and random image-level labels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 12, generator=g) * 255
    images = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 255)
    images = images + torch.randn(images.shape, generator=g) * 8
    labels = torch.rand(n, num_classes, generator=g) < 0.45
    labels[:, 0] = True
    return images.clamp(0, 255), labels


def build(device, variant: str = "maskclip"):
    import open_clip

    from carbseg.teacher.clip_dense import DenseCLIP

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval().to(device)
    model.requires_grad_(False)
    text = F.normalize(torch.randn(19, 512, generator=torch.Generator().manual_seed(1)), dim=-1).to(device)
    return model, DenseCLIP(model.visual, variant=variant), text


def variant_of(mode: str) -> str:
    """carbseg, carbseg-fp32 -> maskclip; carbseg-NAME -> NAME (the ``teacher.dense`` choice)."""
    return mode.split("-", 1)[1] if mode.startswith("carbseg-") and mode != "carbseg-fp32" else "maskclip"


def precision_of(mode: str, used: str) -> str:
    """The precision a mode runs at: the baselines and carbseg-fp32 in fp32, the others at ``used``."""
    return used if mode.startswith("carbseg") and mode != "carbseg-fp32" else "fp32"


def header(args, choice) -> str:
    """The machine and the precision choice, printed above every table."""
    from carbseg.precision import machine_summary

    return (f"{machine_summary(args.device)}\n"
            f"carbseg precision {args.precision} -> {choice.name} ({choice.reason})")


@torch.no_grad()
def run_baseline(dense, text, images, labels, device, reuse_trunk: bool):
    from carbseg.teacher.clip_teacher import CLIP_MEAN, CLIP_STD
    from carbseg.teacher.pseudo_masks import cosine_scores, masks_from_scores

    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1) * 255
    last = dense.visual.transformer.resblocks[-1]
    out = []
    captured = {}
    hook = last.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))
    for i in range(images.shape[0]):
        x = (images[i: i + 1].to(device) - mean) / std
        dense.encode_image(x)  # the full standard forward, attention in every block
        # baseline: a separate pass through the trunk for the value path; baseline-hook: reuse it.
        if reuse_trunk:
            tokens = captured["x"][:, 1:]
        else:
            tokens = dense._tokens_before_last_block(x, reference=True)[0][:, 1:]
        feats = dense.project(dense.value_path(tokens))  # separate value-path pass
        gh, gw = dense.grid_of(*x.shape[-2:])
        feats = feats.transpose(1, 2).reshape(1, -1, gh, gw)
        masks = masks_from_scores(cosine_scores(feats, text), labels[i: i + 1].to(device), tuple(x.shape[-2:]))
        out.append(masks.cpu())
    hook.remove()
    return torch.cat(out)


@torch.no_grad()
def run_fast(dense, text, images, labels, device, batch, precision):
    from carbseg.teacher.clip_teacher import CLIPTeacher

    teacher = CLIPTeacher(dense, text, precision=precision)
    out = []
    for i in range(0, images.shape[0], batch):
        out.append(teacher(images[i: i + batch].to(device), labels[i: i + batch].to(device)).cpu())
    return torch.cat(out)


def child(args) -> None:
    device = torch.device(args.device)
    height, width = _hw(args.size)
    images, labels = make_inputs(args.images, height, width)
    _, dense, text = build(device, variant_of(args.mode))
    warm = images[: min(args.batch, args.images)]
    if args.mode.startswith("carbseg"):
        def fn(ims, lbs):
            return run_fast(dense, text, ims, lbs, device, args.batch, precision_of(args.mode, args.precision))
    else:
        def fn(ims, lbs):
            return run_baseline(dense, text, ims, lbs, device, reuse_trunk=args.mode == "baseline-hook")
    fn(warm, labels[: warm.shape[0]])  # warm-up (allocator, kernels, cached positional embedding)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    masks = fn(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    np.save(args.masks_out, masks.to(torch.uint8).numpy())
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"mode": args.mode, "seconds": seconds, "images_per_s": args.images / seconds,
                      "peak_mib": peak}))


def interleaved(args) -> None:
    """Median seconds per image of each dense variant, timed in turn over ``args.interleaved`` rounds."""
    from carbseg.precision import teacher_precision
    from carbseg.teacher.clip_dense import DENSE_VARIANTS

    device = torch.device(args.device)
    choice = teacher_precision(args.precision, device)
    height, width = _hw(args.size)
    images, labels = make_inputs(args.images, height, width)
    model, dense, text = build(device)
    denses = {v: type(dense)(model.visual, variant=v) for v in DENSE_VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in DENSE_VARIANTS}
    for round_ in range(args.interleaved + 1):  # round 0 warms up
        for variant, d in denses.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run_fast(d, text, images, labels, device, args.batch, choice.name)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[variant].append((time.perf_counter() - start) / args.images)
    used = choice.name
    print(header(args, choice))
    grid = dense.grid_of(height, width)
    print(f"dense variants, ViT-B/16, {args.size} ({grid[0]}x{grid[1]} patches), {args.images} images, batch "
          f"{args.batch}, device {args.device}, torch threads {torch.get_num_threads()}, precision {used}, "
          f"{args.interleaved} interleaved rounds")
    print("| dense | s/image (median) | min | max | vs maskclip |")
    print("|---|---|---|---|---|")
    base = float(np.median(times["maskclip"]))
    for variant, t in times.items():
        med = float(np.median(t))
        print(f"| {variant} | {med:.3f} | {min(t):.3f} | {max(t):.3f} | {med / base:.2f}x |")


def _hw(size: str) -> tuple[int, int]:
    width, height = (int(v) for v in size.lower().split("x"))
    return height, width


def main() -> None:
    from carbseg.allocator import keep_freed_memory

    keep_freed_memory()  # as the carbseg command does (CARBSEG_ALLOCATOR=default: glibc's own thresholds)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1024x512", help="WIDTHxHEIGHT of the views")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated modes to run (default: all; carbseg-fp32 only where carbseg runs bf16); "
                        "baseline is always run as the reference")
    p.add_argument("--rounds", type=int, default=1, metavar="R",
                   help="run the modes in turn R times (each in its own process); images/s is the median")
    p.add_argument("--interleaved", type=int, default=0, metavar="R",
                   help="only compare the dense variants, in one process, over R interleaved rounds")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--masks-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    parser_default = p.get_default("modes")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode:
        child(args)
        return
    if args.interleaved:
        interleaved(args)
        return
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        sys.exit(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    if args.rounds < 1:
        sys.exit("--rounds must be at least 1")
    from carbseg.precision import teacher_precision

    # Resolved once here (a CPU probe runs at most once); the children are told the answer, so every
    # carbseg row runs at the precision printed in the header.
    choice = teacher_precision(args.precision, torch.device(args.device))
    used = choice.name
    asked = args.modes.split(",")
    modes = ["baseline"] + [m for m in MODES if m != "baseline" and m in asked
                            and (m != "carbseg-fp32" or used != "fp32" or args.modes != parser_default)]
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for mode in modes:
                masks_file = str(Path(tmp) / f"{mode}.npy")
                cmd = [sys.executable, __file__, "--mode", mode, "--masks-out", masks_file, "--size", args.size,
                       "--images", str(args.images), "--batch", str(args.batch), "--precision", used,
                       "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if proc.returncode != 0:
                    sys.exit(f"{mode} failed:\n{proc.stderr}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                if round_ == 0:
                    result["masks"] = np.load(masks_file)
                runs[mode].append(result)
    results = {mode: {"images_per_s": float(np.median([r["images_per_s"] for r in rs])),
                      "peak_mib": max(r["peak_mib"] for r in rs), "masks": rs[0]["masks"]}
               for mode, rs in runs.items()}
    base_ips = results["baseline"]["images_per_s"]
    print(header(args, choice))
    print(f"CLIP teacher ViT-B/16, {args.size}, {args.images} images, device {args.device}, "
          f"torch threads {args.threads or torch.get_num_threads()}, carbseg precision {args.precision} -> {used}; "
          f"{args.rounds} round(s) of the modes in turn, each in its own process: images/s is the median over "
          "rounds, every ratio is against the baseline of this run")
    print("| mode | dense | batch | precision | images/s | speed-up | identical pixels | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in modes:
        r = results[mode]
        batch, prec = (args.batch if mode.startswith("carbseg") else 1), precision_of(mode, used)
        variant = variant_of(mode)
        same = "" if variant != "maskclip" else \
            f"{float((results['baseline']['masks'] == r['masks']).mean() * 100):.2f}%"
        print(f"| {mode} | {variant} | {batch} | {prec} | {r['images_per_s']:.3f} | "
              f"{r['images_per_s'] / base_ips:.2f}x | {same} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
