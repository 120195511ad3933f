"""One way to name a device, shared by every command (``--device`` flags and the ``device`` config key).

``auto`` is the first CUDA GPU when one is visible, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` are
checked against what this machine has, so a typo or a missing GPU is one clear line (exit 2) before
any work starts, never a traceback from deep inside PyTorch.
"""

from __future__ import annotations

import torch

from carbseg.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def parse_device(name: str | torch.device, option: str = "--device") -> torch.device:
    """``name`` as a torch.device available here; ``option`` is how the user spelled the setting."""
    text = str(name).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"{option} {text!r} is not a device; choose {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{option} {text!r}: carbseg runs on {DEVICE_CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} {text!r} but no CUDA GPU is visible here (see `carbseg doctor`); "
                            f"use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{option} {text!r} but only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def process_device(name: str | torch.device, option: str = "--device") -> torch.device:
    """The device of this process: ``parse_device``, and under torchrun each rank's own GPU.

    ``cuda`` under torchrun is ``cuda:LOCAL_RANK`` (one GPU per process). A pinned ``cuda:N`` is
    refused with one line -- on every rank alike, so that no rank is left waiting for the others.
    A GPU named by its index becomes this process's current device before any CUDA work: what
    uses "the current device" (the DataLoader's pin-memory thread, a bare ``.cuda()``) would
    otherwise open a context on GPU 0 too, taking its memory from whoever runs there.
    """
    from carbseg import distributed

    device = parse_device(name, option=option)
    if device.type == "cuda" and distributed.launched_by_torchrun():
        if device.index is not None:
            raise UserError(f"{option} {str(name).strip()!r} under torchrun would put every rank on that GPU; "
                            "use cuda (each rank takes GPU LOCAL_RANK) or restrict CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", distributed.local_rank())
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device
