"""Dilated convolutions computed faster on a CPU, with the parameters of the ``nn.Conv2d`` they replace.

Output stride 8 (the paper's) makes the segmenter's late convolutions dilated: EfficientNet-Lite0's
depthwise ``conv_dw`` layers (dilation 2 and 4) and the DeepLab-v2 ASPP branches (dilation 6-24).
PyTorch's CPU kernels handle both poorly, so on a CPU each is rewritten as an exact reformulation:

- :class:`PhaseSplitDepthwiseConv2d`: a dilated depthwise convolution as an undilated one on the
  d x d phases of its input ("space to batch");
- :class:`PaddingSkippingConv2d`: a dilated dense convolution as one matrix product per kernel tap,
  each over the output pixels whose input for that tap lies inside the image, so the products with
  the zero padding (most of them for the ASPP's large dilations on a small feature map) are skipped.

Both compute the same products as the convolution they replace; only the order of floating-point sums
differs (outputs and gradients agree to rounding: tests/test_dilated.py). On other devices (cuDNN
is fast there) and during ONNX export each is the plain convolution; under CPU autocast the phase split
still runs, in fp32 like every depthwise convolution (:mod:`carbseg.models.depthwise`), and the padding
skip gives way to the dense bf16 convolution (in input-channel chunks where oneDNN's bf16 kernel is slow).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from carbseg.models.depthwise import Fp32DepthwiseConv2d, is_depthwise

# A tap restricted to its valid region costs more than the convolution's time per product on a CPU
# (one matrix product per tap plus the slicing, worse for the thin windows of large dilations). At one
# thread, 320 -> 512 channels (the ASPP of EfficientNet-Lite0), forward + backward: first measured on
# 4x320x{30x40, 15x20} maps, shares up to 60% ran 1.4-3.5x faster except 15x20 at dilation 6 (59%:
# 0.96x), 71-96% ran 0.65-0.96x (30x40 at 78%: 1.17x). benchmarks/bench_fastpaths.py, twice, on a loaded
# 2-core AMD EPYC: 30x40 at dilation 12 (59%) lost both times (0.71x, 0.66x), 16x32 at dilation 12
# (38%) lost once and won once (0.90x, 1.10x); 28% (30x40, dilation 24) won both times (1.26x, 1.30x)
# and 17% (16x32, dilation 24) by 2.2-4.1x. The limit sits between the largest share that always won
# and the smallest that ever lost: the dense convolution where unsure.
PADDING_SKIP_MAX_VALID_SHARE = 0.35

# Under CPU bf16 autocast oneDNN's dilated 3x3 convolution falls off a cliff above 1024 input channels
# (a 2-core AMX Xeon, 2048 -> 512 channels on 64x128, inference: dilation 2 126 ms, dilation 4-24 512-1913 ms,
# where fp32 takes 367-420 ms; with 1024 or fewer input channels bf16 is 3x faster than fp32 at every
# dilation). Summed over input-channel chunks of this size the same convolution takes 118-177 ms.
CPU_BF16_MAX_INPUT_CHANNELS = 1024


def _plain_convolution_wanted(x: torch.Tensor) -> bool:
    return x.device.type != "cpu" or torch.onnx.is_in_onnx_export()


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format to return results in: the input's, so a channels-last network stays
    channels-last (both reformulations work in (B, H, W, C) memory anyway) and an NCHW one NCHW."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class PhaseSplitDepthwiseConv2d(Fp32DepthwiseConv2d):
    """A dilated depthwise convolution computed, on a CPU, as an undilated one on the d x d phases.

    Why: PyTorch's CPU backward of a dilated depthwise convolution (EfficientNet-Lite0's 3x3 / 5x5
    ``conv_dw`` at dilation 2 and 4 once stages are dilated for output stride 8) is many times slower
    than the undilated one (benchmarks/RESULTS.md: 1.3 s for one 1152-channel 5x5 layer of a batch of
    4 at 240x320). A stride-1 convolution with dilation d only ever combines pixels whose coordinates
    agree modulo d, so it equals the undilated convolution applied to each of the d x d sub-grids
    ``x[..., i::d, j::d]`` ("space to batch"), interleaved back. The products and their sums are the
    same, only the order of floating-point sums differs (outputs and gradients agree with the dilated
    convolution's to rounding). The phases are laid out channels-last (the copy that makes them is
    needed anyway): oneDNN's depthwise backward is 1.2-2.4x faster in that layout on these shapes, and
    the layer's forward + backward 1.2-2.3x faster than with NCHW phases (one thread, 4x{672, 1152}x30x40).
    Parameters and state-dict names are those of the ``nn.Conv2d`` it replaces; under CPU autocast it
    computes in fp32, as every depthwise convolution (:class:`Fp32DepthwiseConv2d`).
    """

    def depthwise(self, x: torch.Tensor) -> torch.Tensor:
        dh, dw = self.dilation
        if (dh, dw) == (1, 1) or _plain_convolution_wanted(x):
            return super().depthwise(x)
        b, c, h, w = x.shape
        # Work on (b, h, w, c) memory: the transposes to and from it are fast, and every gather below
        # then moves whole channel vectors (a direct 6-d permute of NCHW moved single floats, 3-5x slower).
        pixels = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        # Zero rows/columns up to a multiple of d lie where the dilated convolution's own zero padding is.
        ph, pw = (-h) % dh, (-w) % dw
        if ph or pw:
            pixels = nn.functional.pad(pixels, (0, 0, 0, pw, 0, ph))
        hh, ww = (h + ph) // dh, (w + pw) // dw
        # (b, hh, dh, ww, dw, c) -> (b, dh, dw, hh, ww, c): phase (i, j) is x[..., i::d, j::d].
        phases = (pixels.reshape(b, hh, dh, ww, dw, c).permute(0, 2, 4, 1, 3, 5)
                  .reshape(b * dh * dw, hh, ww, c).permute(0, 3, 1, 2))
        # Each copy is dropped once the next exists (autograd keeps what a backward needs): without
        # gradients the layer then peaks at two maps of its size beside its input, not three or four.
        del pixels
        kh, kw = self.kernel_size
        y = nn.functional.conv2d(phases, self.weight, self.bias, 1, ((kh - 1) // 2, (kw - 1) // 2), 1, self.groups)
        del phases
        y = (y.permute(0, 2, 3, 1).reshape(b, dh, dw, hh, ww, c).permute(0, 3, 1, 4, 2, 5)
             .reshape(b, hh * dh, ww * dw, c))
        if ph or pw:
            y = y[:, :h, :w]
        return y.permute(0, 3, 1, 2).contiguous(memory_format=_layout_of(x))


def split_dilated_depthwise(module: nn.Module) -> int:
    """Make every dilated, stride-1, 'same'-padded depthwise ``nn.Conv2d`` of ``module`` a
    :class:`PhaseSplitDepthwiseConv2d` (in place: same parameters); returns how many."""
    count = 0
    for child in module.modules():
        if (type(child) in (nn.Conv2d, Fp32DepthwiseConv2d) and is_depthwise(child)
                and child.dilation != (1, 1) and _is_same_padded(child)):
            child.__class__ = PhaseSplitDepthwiseConv2d
            count += 1
    return count


def _is_same_padded(conv: nn.Conv2d) -> bool:
    """Stride 1, odd kernel, zero padding of d * (k - 1) / 2: the output has the input's size."""
    return (conv.stride == (1, 1) and conv.padding_mode == "zeros" and all(k % 2 == 1 for k in conv.kernel_size)
            and conv.padding == tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size)))


Tap = tuple[int, int, slice, slice, slice, slice]


def valid_taps(height: int, width: int, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> Iterator[Tap]:
    """The taps (i, j) of a 'same'-padded dilated convolution on a height x width map that read at
    least one pixel inside it, with the output rows/columns they contribute to and the input
    rows/columns those read: output (y, x) takes tap (i, j) from input (y + (i - k0) d, x + (j - k0) d)."""
    for i in range(kernel_size[0]):
        dy = (i - (kernel_size[0] - 1) // 2) * dilation[0]
        out_rows = slice(max(0, -dy), min(height, height - dy))
        if out_rows.stop <= out_rows.start:
            continue
        for j in range(kernel_size[1]):
            dx = (j - (kernel_size[1] - 1) // 2) * dilation[1]
            out_cols = slice(max(0, -dx), min(width, width - dx))
            if out_cols.stop <= out_cols.start:
                continue
            yield (i, j, out_rows, out_cols,
                   slice(out_rows.start + dy, out_rows.stop + dy), slice(out_cols.start + dx, out_cols.stop + dx))


def valid_share(height: int, width: int, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> float:
    """The share of a dense convolution's products that read the image, not its zero padding."""
    inside = sum((r.stop - r.start) * (c.stop - c.start) for _, _, r, c, _, _ in
                 valid_taps(height, width, kernel_size, dilation))
    return inside / (kernel_size[0] * kernel_size[1] * height * width)


class _PaddingSkippingConvolution(torch.autograd.Function):
    """sum over valid taps t of x[input window of t] @ W_t^T, accumulated into the output window of t,
    in a (B, H, W, C) layout so that every tap is one matrix product over its window's pixels."""

    @staticmethod
    def forward(ctx, x, weight, bias, dilation):
        b, _, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).contiguous()
        out = pixels.new_zeros(b, h, w, weight.shape[0])
        for i, j, out_rows, out_cols, in_rows, in_cols in valid_taps(h, w, weight.shape[2:], dilation):
            out[:, out_rows, out_cols] += pixels[:, in_rows, in_cols] @ weight[:, :, i, j].t()
        if bias is not None:
            out += bias
        ctx.save_for_backward(pixels, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        return out.permute(0, 3, 1, 2).contiguous(memory_format=_layout_of(x))

    @staticmethod
    def backward(ctx, grad_out):
        pixels, weight = ctx.saved_tensors
        b, h, w, c = pixels.shape
        grads = grad_out.permute(0, 2, 3, 1).contiguous()
        grad_x = torch.zeros_like(pixels) if ctx.needs_input_grad[0] else None
        # Taps that read only padding get no gradient, as in the dense convolution.
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for i, j, out_rows, out_cols, in_rows, in_cols in valid_taps(h, w, weight.shape[2:], ctx.dilation):
            g = grads[:, out_rows, out_cols].reshape(-1, weight.shape[0])
            if grad_w is not None:
                grad_w[:, :, i, j] = g.t() @ pixels[:, in_rows, in_cols].reshape(-1, c)
            if grad_x is not None:
                grad_x[:, in_rows, in_cols] += (g @ weight[:, :, i, j]).view(
                    b, out_rows.stop - out_rows.start, out_cols.stop - out_cols.start, c)
        grad_b = grads.sum((0, 1, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (grad_x.permute(0, 3, 1, 2) if grad_x is not None else None), grad_w, grad_b, None


class PaddingSkippingConv2d(nn.Conv2d):
    """A dilated 'same'-padded convolution that, on a CPU, skips the products with its zero padding.

    Why: with output stride 8 the ASPP's dilations (6, 12, 18, 24) are a large part of a small feature
    map (30x40 for a 240x320 crop), so most of a dense 3x3 tap reads padding: at dilation 24 only 28%
    of the products touch the image. The dense kernel computes them all (the ASPP was the largest
    single cost of the CPU training step: benchmarks/RESULTS.md). Here each tap is one matrix product
    over the output pixels whose input lies inside the map, used when that keeps at most
    ``PADDING_SKIP_MAX_VALID_SHARE`` of the products; otherwise, and off the CPU, it is the plain
    convolution. Under CPU autocast it is the plain convolution in bf16, summed over chunks of
    ``CPU_BF16_MAX_INPUT_CHANNELS`` input channels where it has more (the ResNet ASPP's 2048).
    Parameters and state-dict names are those of the ``nn.Conv2d`` it replaces.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if _plain_convolution_wanted(x) or self.groups != 1:
            return super().forward(x)
        # Under CPU autocast (bf16 where the probe found it faster) the dense convolution runs in bf16,
        # faster than these fp32 taps, except on very many input channels (CPU_BF16_MAX_INPUT_CHANNELS).
        if torch.is_autocast_enabled("cpu"):
            return self._input_channel_chunks(x)
        # The taps assume stride 1 and 'same' zero padding; any other geometry is the plain convolution.
        if not _is_same_padded(self) or valid_share(h, w, self.kernel_size, self.dilation) > PADDING_SKIP_MAX_VALID_SHARE:
            return super().forward(x)
        return _PaddingSkippingConvolution.apply(x, self.weight, self.bias, self.dilation)

    def _input_channel_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution under CPU autocast: dense, or for more than ``CPU_BF16_MAX_INPUT_CHANNELS``
        input channels the sum of the convolutions of input-channel chunks (the same products; the
        partial sums are added in fp32 and the result returned in autocast's dtype, as the dense one's)."""
        if self.in_channels <= CPU_BF16_MAX_INPUT_CHANNELS:
            return super().forward(x)
        total = part = None
        for start in range(0, self.in_channels, CPU_BF16_MAX_INPUT_CHANNELS):
            chunk = slice(start, start + CPU_BF16_MAX_INPUT_CHANNELS)
            part = nn.functional.conv2d(x[:, chunk], self.weight[:, chunk], None, self.stride, self.padding,
                                        self.dilation)
            total = part.float() if total is None else total + part
        if self.bias is not None:
            total = total + self.bias.view(-1, 1, 1)
        return total.to(part.dtype)


def skip_padding_products(module: nn.Module) -> int:
    """Make every dilated, 'same'-padded dense ``nn.Conv2d`` of ``module`` a
    :class:`PaddingSkippingConv2d` (in place: same parameters); returns how many."""
    count = 0
    for child in module.modules():
        if type(child) is nn.Conv2d and child.groups == 1 and child.dilation != (1, 1) and _is_same_padded(child):
            child.__class__ = PaddingSkippingConv2d
            count += 1
    return count
