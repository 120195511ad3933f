"""torchrun environment and main-process helpers; everything is a no-op in a single process."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from carbseg.errors import UserError

#: ``train.ddp``: ``auto`` runs DDP when torchrun launched several processes; ``always`` also at one
#: process (so one GPU exercises DDP, NCCL and SyncBN); ``never`` refuses a launch of several processes.
DDP_MODES = ("auto", "always", "never")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def _torchrun_env() -> bool:
    """Whether torchrun (or a launcher like it) described a process group, of any size."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: torch.device | str, timeout_s: float = 600.0, mode: str = "auto") -> None:
    """Join the process group that torchrun describes (NCCL on GPU, gloo on CPU); no-op otherwise.

    Each rank is bound to GPU ``LOCAL_RANK`` (``set_device`` and ``device_id``), so NCCL never
    guesses a device. The timeout bounds how long a rank waits for a peer that died, so one failing
    rank ends all.

    ``mode`` (``train.ddp``): ``auto`` joins only when torchrun launched more than one process;
    ``always`` also makes a group of one -- torchrun's at WORLD_SIZE=1, or this process's own when
    no launcher described one -- so DDP, NCCL and SyncBN run on a single GPU; ``never`` refuses a
    launch of several processes with one line (on every rank alike).
    """
    if mode not in DDP_MODES:
        raise ValueError(f"mode must be one of {DDP_MODES}, got {mode!r}")
    if mode == "never" and (launched_by_torchrun() or world_size() > 1):
        processes = os.environ.get("WORLD_SIZE") if launched_by_torchrun() else world_size()
        raise UserError(f"train.ddp = never, but {processes} processes were launched; run one process "
                        "(carbseg train without torchrun) or set train.ddp=auto")
    if is_distributed() or mode == "never" or (mode == "auto" and not launched_by_torchrun()):
        return
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if device.type == "cuda":
        if _torchrun_env():
            device = torch.device("cuda", local_rank())
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    if not _torchrun_env():
        # train.ddp = always in a process no launcher started: a group of one, its rendezvous in memory.
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def collective_device(preferred: torch.device | str | None = None) -> torch.device:
    """The device a collective's tensor must live on: the CPU for gloo; for NCCL the process's GPU.

    ``preferred`` (the caller's own device, e.g. the trainer's) wins when it is a GPU; otherwise
    torchrun's one-GPU-per-rank convention (``cuda:LOCAL_RANK``) is used, not the "current" device,
    which is still GPU 0 on every rank when the caller made the process group without ``set_device``.
    """
    if not is_distributed() or dist.get_backend() != "nccl":
        return torch.device("cpu")
    if preferred is not None and torch.device(preferred).type == "cuda":
        preferred = torch.device(preferred)
        return preferred if preferred.index is not None else torch.device("cuda", torch.cuda.current_device())
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", local_rank())
    return torch.device("cuda", torch.cuda.current_device())


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier(device: torch.device | str | None = None) -> None:
    """Wait for every process; under NCCL on the explicit GPU of this rank (see ``collective_device``)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        index = collective_device(device).index
        dist.barrier(device_ids=[index])
    else:
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (identity in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


def shard(items: list, shard_rank: int | None = None, num_shards: int | None = None) -> list:
    """The disjoint slice of ``items`` this process owns (strided, so shards stay balanced)."""
    r = rank() if shard_rank is None else shard_rank
    n = world_size() if num_shards is None else num_shards
    return items[r::n]
