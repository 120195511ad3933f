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
``F.interpolate``). The products run outside autocast, in fp32 for fp32 logits and in bf16 for bf16
logits (below).

The products do not pay everywhere: their cost per output pixel grows with the input size
(``h + h * w / H`` multiply-adds, against a few for the interpolation kernel), and they hold an
(h, W) intermediate besides the output. At Cityscapes size (19 classes, 128x256 -> 1024x2048, batch
1 and 8) they were 1.6x slower than ``F.interpolate``, at the test-time scale 1.75 2.4x slower. So
they are taken only where :func:`matrix_products_pay` says so, a rule on the shapes and the element
size alone. bf16 logits (bf16 autocast) are upsampled by bf16 products: an fp32 result would take
twice the memory of ``F.interpolate``'s bf16 one, and PyTorch's bf16 bilinear kernel is the slowest
of all on a CPU (5-6x the products at the demo's and CamVid's shapes). The products accumulate in
fp32 and round the (h, W) intermediate and the result to bf16 (``F.interpolate`` rounds the result);
the weights are exact in bf16 where the logits are upsampled by a power of two (multiples of 1 / 2s),
otherwise rounded to bf16's 8 significant bits.

On a GPU, and while tracing for ONNX export, ``F.interpolate`` is used as it is: cuDNN's kernel is
fast, and the exported graph keeps a Resize node that works for any input size.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Multiply-adds per output pixel of the two products, ``h + h * w / H``, up to which they are taken.
# benchmarks/bench_fastpaths.py on an idle 2-core AMD EPYC with AVX512-BF16 (fp32, 1 and 2 threads;
# forward + backward where training): cost 16.25 (CamVid crops, output stride 16) 1.62-1.69x faster, 20 (the
# demo) 1.40-1.54x, 35 (CamVid crops, output stride 8) 1.32-1.41x; 52.5 (a whole CamVid frame at stride 8)
# 0.95-1.00x, even; 80 (Cityscapes 512x1024 crops) 1.04-1.09x, within noise of even; 160 (Cityscapes
# 128x256 -> 1024x2048) 0.58-0.83x and 280 (its test-time scale 1.75) 0.41-0.44x lose. The limit keeps
# the clear wins and leaves everything from the first even point up to F.interpolate: when unsure, the
# standard op.
MATRIX_PRODUCTS_MAX_COST_PER_PIXEL = 40
# The products may hold at most this multiple of what F.interpolate's output holds.
MATRIX_PRODUCTS_MAX_MEMORY_RATIO = 1.2


def matrix_products_cost_per_pixel(size_in: tuple[int, int], size_out: tuple[int, int]) -> float:
    """Multiply-adds per output pixel: widening costs h * w * W, then the rows H * h * W, over H * W."""
    (h, w), (height, _) = size_in, size_out
    return h + h * w / height


def matrix_products_memory(planes: int, size_in: tuple[int, int], size_out: tuple[int, int],
                           element_size: int, product_element_size: int = 4) -> tuple[int, int]:
    """(bytes the products allocate, bytes of F.interpolate's output) for ``planes`` = B x C planes whose
    elements take ``element_size`` bytes, the products computing in elements of ``product_element_size``
    bytes (4: fp32; 2: bf16 logits kept in bf16). The products: both weight matrices, the input widened
    (when the products' elements are wider), the (h, W) intermediate and the output (their backward holds
    the same intermediate's gradient). Measured peaks, fp32, 1 x 19 x 128x256 -> 1024x2048 and
    4 x 11 x 30x40 -> 240x320: 1.125x and 1.115x F.interpolate's, as this model says (1.13x, 1.13x)."""
    (h, w), (height, width) = size_in, size_out
    e = product_element_size
    products = e * (height * h + width * w) + e * planes * (h * width + height * width)
    if e != element_size:
        products += e * planes * h * w
    return products, planes * height * width * element_size


def matrix_products_pay(planes: int, size_in: tuple[int, int], size_out: tuple[int, int],
                        element_size: int = 4, product_element_size: int = 4) -> bool:
    """Whether the two products are taken on a CPU: cheap enough per output pixel
    (``MATRIX_PRODUCTS_MAX_COST_PER_PIXEL``) and within ``MATRIX_PRODUCTS_MAX_MEMORY_RATIO`` of
    F.interpolate's memory (``matrix_products_memory``: fp32 products of bf16 logits never are, as
    their fp32 output alone is twice bf16's; bf16 products of bf16 logits are)."""
    if matrix_products_cost_per_pixel(size_in, size_out) > MATRIX_PRODUCTS_MAX_COST_PER_PIXEL:
        return False
    products, interpolation = matrix_products_memory(planes, size_in, size_out, element_size,
                                                     product_element_size)
    return products <= MATRIX_PRODUCTS_MAX_MEMORY_RATIO * interpolation


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The products' dtype for logits of ``dtype``: bf16 stays bf16 (the memory of F.interpolate's
    bf16 output, and the fast bf16 matrix units), everything else is computed in fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


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

    On a CPU where :func:`matrix_products_pay`: two matrix products in ``product_dtype`` (bf16 for
    bf16 logits, else fp32, the result's dtype); elsewhere, and while exporting, ``F.interpolate`` itself.
    """
    if x.device.type != "cpu" or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        # ``size`` as given: while tracing, image.shape[-2:] are traced values (a dynamic ONNX export).
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    size_out = (int(size[0]), int(size[1]))
    product_size = torch.empty((), dtype=product_dtype(x.dtype)).element_size()
    if not matrix_products_pay(x.shape[0] * x.shape[1], tuple(x.shape[-2:]), size_out, x.element_size(),
                               product_size):
        return F.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    return upsample_by_matrix_products(x, size_out)


def upsample_by_matrix_products(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The bilinear upsampling of (B, C, h, w) ``x`` as R @ x @ C^T in ``product_dtype(x.dtype)``
    (any device; the result has that dtype: bf16 for bf16 ``x``, else fp32)."""
    height, width = int(size[0]), int(size[1])
    dtype = product_dtype(x.dtype)
    rows = interpolation_matrix(x.shape[-2], height).to(dtype)
    cols = interpolation_matrix(x.shape[-1], width).to(dtype)
    with torch.autocast("cpu", enabled=False):
        # Widen first: (h, w) -> (h, W) costs h*w*W products, then (H, W) costs H*h*W; for an
        # upsampling this order is cheaper than rows first, and the large output is written once.
        return torch.matmul(rows, torch.matmul(x.to(dtype), cols.t()))
