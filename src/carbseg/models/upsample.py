"""Bilinear upsampling of the segmenter's logits to the image size, fast on a CPU.

The segmenter predicts at output stride 8 or 16 and its logits are upsampled bilinearly
(``align_corners=False``) to the input size before the loss (the release does the same). On a CPU
PyTorch's ``upsample_bilinear2d`` is slow for this shape -- few, small input planes, large output --
and its backward slower still: on a 2-core Xeon, 4 x 19 logits from 16 x 32 to 128 x 256 took 2.2 ms
forward and 5.1 ms backward, about a tenth of the demo's training step (benchmarks/RESULTS.md).

Bilinear interpolation is separable and linear: out = R @ x @ C^T with R (H, h) and C (W, w) each
holding the two interpolation weights of an output row / column. As two matrix products the same
upsampling took 0.7 ms forward and 0.7 ms backward there. The weights are PyTorch's own
(``area_pixel_compute_source_index``: source = (out + 0.5) * in / out - 0.5, clamped at 0, both taps
clamped to the last input index), computed in fp32 as PyTorch computes them, so the two paths agree
to fp32 rounding (sums in a different order; tests/test_upsample.py checks them against
``F.interpolate``). The products run in fp32 whatever the autocast: under bf16 the result is fp32,
where ``F.interpolate`` rounded logits and their gradient to bf16.

On a GPU, and while tracing for ONNX export, ``F.interpolate`` is used as it is: cuDNN's kernel is
fast, and the exported graph keeps a Resize node that works for any input size.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=64)
def interpolation_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) fp32 weights of 1-D linear interpolation, ``align_corners=False``.

    Cached, so made outside inference mode: a matrix first built during an evaluation must still
    be usable by a training step's backward.
    """
    with torch.inference_mode(False):
        return _interpolation_matrix(size_in, size_out)


def _interpolation_matrix(size_in: int, size_out: int) -> torch.Tensor:
    scale = torch.tensor(float(size_in), dtype=torch.float32) / size_out  # a float32 division, as PyTorch's
    source = ((torch.arange(size_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    lower = source.floor().long().clamp(max=size_in - 1)
    upper = (lower + 1).clamp(max=size_in - 1)
    weight_upper = source - lower.float()
    rows = torch.arange(size_out)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float32)
    # accumulate: where both taps are the last input index their weights add up to 1.
    matrix.index_put_((rows, lower), 1.0 - weight_upper, accumulate=True)
    matrix.index_put_((rows, upper), weight_upper, accumulate=True)
    return matrix


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for (B, C, h, w) ``x``.

    On a CPU: two matrix products in fp32 (the result is fp32); elsewhere, and while exporting,
    ``F.interpolate`` itself.
    """
    if x.device.type != "cpu" or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        # ``size`` as given: while tracing, image.shape[-2:] are traced values (a dynamic ONNX export).
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    height, width = int(size[0]), int(size[1])
    rows = interpolation_matrix(x.shape[-2], height)
    cols = interpolation_matrix(x.shape[-1], width)
    with torch.autocast("cpu", enabled=False):
        # Widen first: (h, w) -> (h, W) costs h*w*W products, then (H, W) costs H*h*W; for an
        # upsampling this order is cheaper than rows first, and the large output is written once.
        return torch.matmul(rows, torch.matmul(x.float(), cols.t()))
