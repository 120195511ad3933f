"""Two CPU cores for one training run: intra-op threads or processes? Time the demo's training iteration.

    python benchmarks/bench_parallel.py [--iters 5] [--rounds 3] [--config configs/demo.yaml] [key=value ...]

The iteration is the trainer's own (``Trainer.train_iteration``: teacher views, segmenter forward, CARB
objective, backward, optimizer step) on freshly generated demo scenes, at the demo config unless told
otherwise, right after its warm-up (CARB on, as in the last third of the demo). Three ways to use the
cores are timed, in one run so the ratios compare like with like:

- ``1 thread``: one process, one intra-op thread (the reference);
- ``2 threads``: one process, two intra-op threads (``carbseg demo``'s default on a 2-core machine);
  timed interleaved with ``1 thread`` (``--rounds`` rounds of ``--iters`` iterations each);
- ``2 processes``: data parallel, two processes of one thread each over gloo (as under ``torchrun
  --nproc_per_node 2``), each with half the batch, so the global batch is unchanged. Not the same
  computation: batch-norm statistics are per process (SyncBN is CUDA-only) and the gradient is
  averaged across processes.

Prints the machine (CPU model, bf16 flag), the precision the trainer chose, ms per iteration (median
over rounds) and each ratio against ``1 thread``. Run it on an idle machine: other jobs on the cores
distort the threaded rows most.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

DEMO_ITERATION = 1400  # after the demo's 1,300-iteration warm-up: the CARB terms are live


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="training config (default: the packaged demo config)")
    parser.add_argument("--scenes", type=int, default=24, help="training scenes to generate (the step's cost "
                        "does not depend on how many)")
    parser.add_argument("--iters", type=int, default=5, help="iterations per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (medians are reported)")
    parser.add_argument("--skip-processes", action="store_true", help="time the thread rows only")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_args()


def make_data(root: Path, scenes: int, cfg_overrides: list[str], config: str | None) -> list[str]:
    """Generate the scenes and their image-level labels; returns the overrides that point at them."""
    from carbseg.data.datasets import build_dataset
    from carbseg.data.labels import compute_image_labels, write_labels_json
    from carbseg.data.synthetic import generate_synthetic_dataset

    cfg = load(config, cfg_overrides)
    height, width = cfg.data.scale_size
    for split, count in (("train", scenes), ("val", 2)):
        generate_synthetic_dataset(root / "data", split, count, height, width, seed=0, progress=False)
    train_set = build_dataset("synthetic", root / "data", "train")
    write_labels_json(root / "labels.json", "synthetic", train_set.classes,
                      compute_image_labels(train_set, progress=False))
    return [f"data.root={(root / 'data').as_posix()}", f"data.labels={(root / 'labels.json').as_posix()}",
            "train.eval_interval=0", "data.num_workers=0"]


def load(config: str | None, overrides: list[str]):
    if config is None:
        from carbseg.demo import load_demo_config

        return load_demo_config(overrides)
    from carbseg.config import load_config

    return load_config(config, overrides=overrides)


def make_trainer(config: str | None, overrides: list[str], out: Path):
    from carbseg.engine.train import Trainer

    return Trainer(load(config, overrides), out, resume=False, progress=False)


def timed_rounds(trainer, batches: list[dict], iters: int, start: int) -> float:
    began = time.perf_counter()
    for i in range(iters):
        trainer.train_iteration([batches[(start + i) % len(batches)]], DEMO_ITERATION + start + i)
    return (time.perf_counter() - began) / iters


def first_batches(trainer, count: int) -> list[dict]:
    """The run's own first batches (its sample stream, augmentations included), loaded once, up front."""
    from carbseg.engine.train_data import training_loader

    loader = iter(training_loader(trainer.samples, 0, count, 0))
    return [next(loader) for _ in range(count)]


def thread_rows(args, overrides: list[str], work: Path) -> dict[str, list[float]]:
    trainer = make_trainer(args.config, overrides, work / "threads")
    batches = first_batches(trainer, args.iters * args.rounds + 2)
    print(f"precision chosen by the trainer: {describe(trainer.precision)}")
    torch.set_num_threads(1)
    timed_rounds(trainer, batches, 2, 0)  # untimed: first-call allocations and kernel choice
    times: dict[str, list[float]] = {"1 thread": [], "2 threads": []}
    for r in range(args.rounds):
        for name, threads in (("1 thread", 1), ("2 threads", 2)):
            torch.set_num_threads(threads)
            times[name].append(timed_rounds(trainer, batches, args.iters, 2 + r * args.iters))
    return times


def describe(precision: dict) -> str:
    return ", ".join(f"{k} {v.name} ({v.reason})" for k, v in precision.items() if v is not None)


def _process_row(rank: int, world: int, port: int, args, overrides: list[str], work: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from carbseg import distributed

    trainer = make_trainer(args.config, overrides, Path(work) / f"processes_{rank}")
    batches = first_batches(trainer, args.iters * args.rounds + 2)
    timed_rounds(trainer, batches, 2, 0)
    times = []
    for r in range(args.rounds):
        distributed.barrier()
        times.append(timed_rounds(trainer, batches, args.iters, 2 + r * args.iters))
    if rank == 0:
        queue.put(times)
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_row(args, overrides: list[str], work: Path, batch_size: int) -> list[float]:
    """Two processes of one thread, each with half the batch (the global batch is unchanged)."""
    if batch_size % 2:
        raise SystemExit(f"2 processes need an even batch size, the config has {batch_size}")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_process_row, args=(2, free_port(), args, overrides + [f"data.batch_size={batch_size // 2}"],
                                           str(work), queue), nprocs=2, join=True, start_method="spawn")
    return queue.get()


def main() -> None:
    args = parse_args()
    from carbseg.allocator import keep_freed_memory
    from carbseg.precision import machine_summary

    keep_freed_memory()  # as the carbseg command does (CARBSEG_ALLOCATOR=default: glibc's own thresholds)

    torch.set_num_threads(1)
    print(machine_summary("cpu"))
    with tempfile.TemporaryDirectory(prefix="bench_parallel_") as tmp:
        work = Path(tmp)
        overrides = make_data(work, args.scenes, args.overrides, args.config) + list(args.overrides)
        cfg = load(args.config, overrides)
        print(f"config: {args.config or 'the demo config'}; backbone {cfg.model.backbone}, batch {cfg.data.batch_size} "
              f"x {cfg.data.crop_size[0]}x{cfg.data.crop_size[1]}, GLV {cfg.glv.enabled}, CARB {cfg.carb.enabled}; "
              f"iteration {DEMO_ITERATION} onwards; {args.rounds} rounds of {args.iters} iterations")
        times = thread_rows(args, overrides, work)
        if not args.skip_processes:
            times["2 processes (1 thread each, half batch)"] = process_row(args, overrides, work,
                                                                          cfg.data.batch_size)
    base = statistics.median(times["1 thread"])
    print("\n| way to use the cores | ms per iteration (median) | per round (ms) | vs 1 thread |")
    print("|---|--:|---|--:|")
    for name, values in times.items():
        median = statistics.median(values)
        rounds = ", ".join(f"{1000 * v:.0f}" for v in values)
        print(f"| {name} | {1000 * median:.0f} | {rounds} | {base / median:.2f}x |")
    if hasattr(os, "getloadavg"):
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
