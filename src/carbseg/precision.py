"""Which reduced precision a device runs fast, and the autocast of training and inference: the one
place the trainer, the teacher and inference ask.

bf16 is only fast where the hardware has it: NVIDIA GPUs from Ampere on (compute capability >= 8.0)
and CPUs with AVX512-BF16 / AMX. Elsewhere it is emulated -- on a V100, T4 or RTX 20xx PyTorch still
*accepts* bf16 (``torch.cuda.is_bf16_supported()`` is True there, by emulation) but convolutions
run several times slower than in fp32 -- so on those GPUs the mixed precision of choice is fp16
(with a GradScaler when training), and the CLIP teacher stays in fp32.
"""

from __future__ import annotations

import contextlib

import torch

AMPERE = (8, 0)


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 matrix products are native: CUDA of compute capability >= 8.0, or a CPU with
    AVX512-BF16/AMX (measured 7x slower than fp32 on an AVX2-only CPU; see benchmarks/RESULTS.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return tuple(torch.cuda.get_device_capability(device)) >= AMPERE
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def fast_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The automatic mixed precision for ``device``: bf16 where native, fp16 on older CUDA GPUs,
    none on a CPU without native bf16 (autocast would only slow it down)."""
    device = torch.device(device)
    if native_bf16(device):
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; no autocast at all for ``None`` (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def training_autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The segmenter's autocast in training for ``train.amp``. ``auto``: bf16 autocast on GPUs where
    bf16 is native (Ampere and newer), fp16 with the GradScaler on older ones (V100, T4, RTX 20xx
    emulate bf16, several times slower), nothing on CPU (it is slower there on most machines)."""
    from carbseg.errors import UserError

    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return fast_autocast_dtype(device)
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("train.amp = fp16 needs a CUDA GPU; use train.amp=bf16 or off on CPU")
        return torch.float16
    return torch.bfloat16


def inference_autocast_dtype(device: torch.device, amp: bool | torch.dtype | None = None) -> torch.dtype | None:
    """The autocast of inference: ``None`` (default) is the device's fast precision on CUDA (bf16 from
    Ampere on, fp16 on older GPUs where bf16 is emulated) and nothing on CPU (CPU bf16 is slow);
    ``True`` the fast precision (bf16 on a CPU); ``False`` none; a dtype exactly that dtype (the
    trainer's validation passes train.amp's, so fp16 stays fp16)."""
    if isinstance(amp, torch.dtype):
        return amp
    if amp is None:
        return fast_autocast_dtype(device) if device.type == "cuda" else None
    if amp:
        return fast_autocast_dtype(device) or torch.bfloat16
    return None
