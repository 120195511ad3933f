"""Depthwise convolutions compute in fp32 under CPU autocast when they will be trained through: bf16 only
where it is faster.

On a CPU with native bf16 (AVX512-BF16 / AMX), bf16 autocast makes the segmenter's dense and 1x1
convolutions and its ASPP 2-3x faster, but oneDNN's depthwise convolutions lose in bf16 once their
backward is counted: one layer's forward + backward, 4 x C x 30 x 40, measured on a 2-core AMX Xeon
(benchmarks/RESULTS.md, "bf16 on a CPU with AMX"): 1152 channels 5x5 dilation 4, phase split, fp32
67 ms / bf16 145 ms; 672 channels 5x5 dilation 2, 25 / 71 ms; undilated 96 channels 3x3 stride 2 at
120x160, 25 / 41 ms. Left in bf16 they cancelled most of the gain of a bf16 EfficientNet-Lite0 step
(1.15-1.24x of the plain fp32 step on that CPU; the issue measured 0.76x on another; with the depthwise
convolutions in fp32: 1.66-2.0x).

So under CPU autocast a depthwise convolution whose backward will run casts its input up and computes
in fp32; its output stays fp32 and the next 1x1 convolution casts it down again (autocast's own rule).
The parameters are fp32 in any case (autocast never casts them in place), so this only moves where
rounding happens. Without gradients (inference, validation) the forward alone is 2.7-3x *faster* in
bf16 (the 1152-channel layers at 720x960, phase split: 49 vs 132 ms), so there it follows autocast;
likewise without autocast, on GPUs (where cuDNN's bf16 depthwise kernels are fast) and in ONNX export.
"""

from __future__ import annotations

import torch
from torch import nn


def _cpu_autocast_active(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not torch.onnx.is_in_onnx_export()


def _backward_will_run(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in conv.parameters()))


def is_depthwise(conv: nn.Conv2d) -> bool:
    """One filter per channel: ``groups == in_channels == out_channels`` (> 1)."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


class Fp32DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` that computes in fp32 under CPU autocast when gradients will flow through
    it (same parameters and names).

    Subclasses change how the convolution is computed (:meth:`depthwise`), not this precision rule.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_autocast_active(x) and _backward_will_run(self, x):
            with torch.autocast("cpu", enabled=False):
                return self.depthwise(x.float())
        return self.depthwise(x)

    def depthwise(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def keep_depthwise_fp32(module: nn.Module) -> int:
    """Make every plain depthwise ``nn.Conv2d`` of ``module`` an :class:`Fp32DepthwiseConv2d` (in place:
    same parameters; subclasses of it, e.g. the phase-split dilated ones, are left as they are); returns
    how many."""
    count = 0
    for child in module.modules():
        if type(child) is nn.Conv2d and is_depthwise(child):
            child.__class__ = Fp32DepthwiseConv2d
            count += 1
    return count
