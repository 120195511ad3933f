"""The CPU forms of dilated convolutions (carbseg.models.dilated) against the plain convolution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from carbseg.models.aspp import ASPP
from carbseg.models.dilated import (
    PADDING_SKIP_MAX_VALID_SHARE,
    PaddingSkippingConv2d,
    PhaseSplitDepthwiseConv2d,
    skip_padding_products,
    split_dilated_depthwise,
    valid_share,
    valid_taps,
)


# ---------------------------------------------------------------- dilated depthwise convolutions: phase split
@pytest.mark.parametrize("kernel, dilation, size", [(3, 2, (12, 16)), (5, 4, (15, 22)), (5, 2, (7, 9)), (3, 4, (3, 5))])
def test_phase_split_depthwise_equals_the_dilated_convolution(kernel, dilation, size):
    """Space to batch: the d x d phases convolved undilated and interleaved back are the dilated
    convolution, sizes not divisible by d included; gradients equal up to the order of sums."""
    torch.manual_seed(0)
    reference = nn.Conv2d(6, 6, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, groups=6)
    split = nn.Sequential(nn.Conv2d(6, 6, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, groups=6))
    split.load_state_dict({f"0.{k}": v for k, v in reference.state_dict().items()})
    assert split_dilated_depthwise(split) == 1 and type(split[0]) is PhaseSplitDepthwiseConv2d
    assert split.state_dict().keys() == {"0.weight", "0.bias"}
    x = torch.randn(2, 6, *size)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = split(xa), reference(xb)
    assert ya.shape == yb.shape == (2, 6, *size)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-5)
    # An independent reference for one output pixel: the 3x3/5x5 taps d pixels apart, zero outside.
    r, c, k0 = size[0] // 2, size[1] // 2, (kernel - 1) // 2
    taps = [(r + dilation * (i - k0), c + dilation * (j - k0)) for i in range(kernel) for j in range(kernel)]
    expected = reference.bias[1] + sum(reference.weight[1, 0, i, j] * x[0, 1, y, z]
                                       for (y, z), (i, j) in zip(taps, [(i, j) for i in range(kernel) for j in range(kernel)])
                                       if 0 <= y < size[0] and 0 <= z < size[1])
    torch.testing.assert_close(ya[0, 1, r, c], expected, rtol=0, atol=1e-5)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[0].weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-4)


def test_phase_split_phases_are_channels_last():
    """The phases the undilated convolution sees are laid out channels-last (the faster depthwise
    backward on CPU), and the result is back in the input's NCHW layout."""
    conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4)
    split_dilated_depthwise(nn.Sequential(conv))
    seen = []
    original = nn.functional.conv2d

    def spy(x, *args, **kwargs):
        seen.append(x)
        return original(x, *args, **kwargs)

    nn.functional.conv2d = spy
    try:
        y = conv(torch.randn(2, 4, 6, 8))
    finally:
        nn.functional.conv2d = original
    assert len(seen) == 1 and seen[0].shape == (8, 4, 3, 4)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (2, 4, 6, 8) and y.is_contiguous()


def test_both_reformulations_keep_a_channels_last_input_channels_last():
    """A channels-last network stays channels-last through them (no conversion back to NCHW and
    forward again in the next layer), with the values and gradients of the NCHW call."""
    torch.manual_seed(0)
    depthwise = nn.Conv2d(6, 6, 5, padding=8, dilation=4, groups=6)
    split_dilated_depthwise(nn.Sequential(depthwise))
    dense = PaddingSkippingConv2d(6, 5, 3, padding=12, dilation=12)
    x = torch.randn(2, 6, 14, 18)
    for conv in (depthwise, dense):
        xa = x.clone().requires_grad_()
        xb = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        ya, yb = conv(xa), conv(xb)
        assert ya.is_contiguous() and not ya.is_contiguous(memory_format=torch.channels_last)
        assert yb.is_contiguous(memory_format=torch.channels_last) and not yb.is_contiguous()
        torch.testing.assert_close(yb, ya, rtol=0, atol=1e-6)
        grad = torch.randn_like(ya)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- dense dilated convolutions: padding skipped
def test_valid_taps_by_hand():
    """A 3x3 tap at dilation 24 on a 30x40 map reads the image on rows 24..29 (tap above: output rows
    24..29 read input rows 0..5) or 0..5 (tap below), and on 16 columns sideways."""
    taps = {(i, j): (r, c, ir, ic) for i, j, r, c, ir, ic in valid_taps(30, 40, (3, 3), (24, 24))}
    assert len(taps) == 9
    assert taps[(0, 0)] == (slice(24, 30), slice(24, 40), slice(0, 6), slice(0, 16))
    assert taps[(2, 2)] == (slice(0, 6), slice(0, 16), slice(24, 30), slice(24, 40))
    assert taps[(1, 1)] == (slice(0, 30), slice(0, 40), slice(0, 30), slice(0, 40))
    # (30 + 2 * 6) rows x (40 + 2 * 16) columns of the 9 x 30 x 40 products touch the image
    assert valid_share(30, 40, (3, 3), (24, 24)) == pytest.approx(42 * 72 / (9 * 30 * 40))
    # A dilation of at least the map's height leaves only the middle row of the kernel.
    assert {(i, j) for i, j, *_ in valid_taps(15, 20, (3, 3), (18, 18))} == {(1, 0), (1, 1), (1, 2)}
    # Dilation 1 on 5x5: each off-centre row/column of taps reads 4 of the 5 rows/columns.
    assert valid_share(5, 5, (3, 3), (1, 1)) == pytest.approx((5 + 2 * 4) ** 2 / (9 * 25))


def _pair(in_channels, out_channels, dilation, kernel=3, bias=False):
    torch.manual_seed(0)
    reference = nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel - 1) // 2,
                          dilation=dilation, bias=bias)
    skipping = PaddingSkippingConv2d(in_channels, out_channels, kernel, padding=dilation * (kernel - 1) // 2,
                                     dilation=dilation, bias=bias)
    skipping.load_state_dict(reference.state_dict())
    return reference, skipping


@pytest.mark.parametrize("size, dilation, kernel, bias", [
    ((12, 16), 9, 3, False),   # 12 rows: the vertical taps read 3 rows each
    ((15, 20), 18, 3, False),  # dilation >= height: the vertical taps read padding only
    ((9, 7), 4, 5, True),      # 5x5 kernel, bias, odd sizes
    ((1, 30), 24, 3, False),   # one row
])
def test_padding_skipping_equals_the_dense_convolution(size, dilation, kernel, bias):
    reference, skipping = _pair(5, 7, dilation, kernel, bias)
    assert valid_share(*size, (kernel, kernel), (dilation, dilation)) <= PADDING_SKIP_MAX_VALID_SHARE
    x = torch.randn(2, 5, *size)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = skipping(xa), reference(xb)
    assert ya.shape == yb.shape and ya.is_contiguous()
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-5)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(skipping.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(skipping.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-4)


def test_padding_skipping_runs_the_taps_only_when_they_save(monkeypatch):
    """The tap-wise path runs where at most PADDING_SKIP_MAX_VALID_SHARE of the products read the image;
    above it, under CPU autocast and in ONNX export the module is the plain convolution."""
    import carbseg.models.dilated as dilated

    calls = []
    original = dilated._PaddingSkippingConvolution.apply
    monkeypatch.setattr(dilated._PaddingSkippingConvolution, "apply",
                        lambda *args: calls.append(1) or original(*args))
    _, skipping = _pair(3, 4, dilation=2)
    skipping(torch.randn(1, 3, 40, 40))  # dilation 2 on 40x40: 90% of the products read the image
    assert calls == []
    _, skipping = _pair(3, 4, dilation=3)
    skipping(torch.randn(1, 3, 4, 4))  # 4x4 at dilation 3: (4 + 2 * 1)^2 / (9 * 16) = 25%
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        skipping(torch.randn(1, 3, 4, 4))
    assert calls == [1]


@pytest.mark.parametrize("size, dilation, share, taps", [
    ((16, 32), 24, 1 / 6, True),  # measured 2.2-4.1x faster
    ((30, 40), 24, 42 * 72 / (9 * 30 * 40), True),  # 28%: 1.26-1.30x
    ((16, 32), 12, 24 * 72 / (9 * 16 * 32), False),  # 38%: 0.90-1.10x, unsure: the dense convolution
    ((30, 40), 12, 66 * 96 / (9 * 30 * 40), False),  # 59%: 0.66-0.96x
])
def test_padding_skipping_is_taken_at_the_measured_shares_where_it_won(monkeypatch, size, dilation, share, taps):
    import carbseg.models.dilated as dilated

    assert valid_share(*size, (3, 3), (dilation, dilation)) == pytest.approx(share)
    calls = []
    original = dilated._PaddingSkippingConvolution.apply
    monkeypatch.setattr(dilated._PaddingSkippingConvolution, "apply",
                        lambda *args: calls.append(1) or original(*args))
    reference, skipping = _pair(3, 4, dilation)
    x = torch.randn(1, 3, *size)
    torch.testing.assert_close(skipping(x), reference(x), rtol=0, atol=1e-5)
    assert calls == ([1] if taps else [])


def test_padding_skipping_without_grad_and_in_inference_mode():
    reference, skipping = _pair(3, 4, dilation=6)
    x = torch.randn(1, 3, 8, 10)
    with torch.inference_mode():
        torch.testing.assert_close(skipping(x), reference(x), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(skipping(x), reference(x), rtol=0, atol=1e-5)


def test_aspp_branches_skip_padding_and_keep_their_state_dict_names():
    aspp = ASPP(16, 8, (6, 12))
    assert all(type(branch[0]) is PaddingSkippingConv2d for branch in aspp.branches)
    assert set(aspp.state_dict()) >= {"branches.0.0.weight", "branches.1.1.running_mean"}
    plain = nn.Sequential(nn.Conv2d(3, 3, 3, padding=2, dilation=2), nn.Conv2d(3, 3, 3, padding=1),
                          nn.Conv2d(3, 3, 3, padding=2, dilation=2, groups=3), nn.Conv2d(3, 3, 3, padding=1, dilation=2))
    assert skip_padding_products(plain) == 1  # dense, dilated, same-padded only
    assert [type(m) for m in plain] == [PaddingSkippingConv2d, nn.Conv2d, nn.Conv2d, nn.Conv2d]


def test_aspp_output_matches_its_dense_form():
    """The whole ASPP (BN in training mode, ReLU, sum) on a map where three of its four dilations
    take the tap-wise path equals the same ASPP with dense branches."""
    torch.manual_seed(0)
    aspp = ASPP(6, 8, (6, 12, 18, 24)).train()
    dense = ASPP(6, 8, (6, 12, 18, 24)).train()
    dense.load_state_dict(aspp.state_dict())
    for branch in dense.branches:
        branch[0].__class__ = nn.Conv2d
    x = torch.randn(2, 6, 30, 40)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = aspp(xa), dense(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    ya.square().mean().backward()
    yb.square().mean().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
    for a, b in zip(aspp.parameters(), dense.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_phase_split_still_splits_under_cpu_autocast_and_computes_in_fp32():
    """bf16 autocast (chosen on CPUs where it is faster) keeps the phase split, and the split
    convolution, depthwise, computes in fp32 (carbseg.models.depthwise): its output is fp32 and agrees
    with the dilated convolution computed in fp32 without autocast, to rounding."""
    torch.manual_seed(0)
    reference = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4)
    split = nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4))
    split.load_state_dict({f"0.{k}": v for k, v in reference.state_dict().items()})
    split_dilated_depthwise(split)
    seen = []
    original = nn.functional.conv2d

    def spy(x, *args, **kwargs):
        seen.append((tuple(x.shape), x.dtype, torch.is_autocast_enabled("cpu")))
        return original(x, *args, **kwargs)

    x = torch.randn(2, 4, 8, 8)
    nn.functional.conv2d = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ya = split(x.bfloat16())
    finally:
        nn.functional.conv2d = original
    yb = reference(x.bfloat16().float())
    assert seen == [((8, 4, 4, 4), torch.float32, False)]  # 2 images x 4 phases of 4x4, fp32, autocast off
    assert ya.dtype == torch.float32
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride, padding", [(2, 6), (1, 3)])
def test_padding_skipping_leaves_other_geometries_to_the_dense_convolution(stride, padding):
    """Built directly with a stride or a padding the taps do not model, the module is the dense
    convolution (same output shape and values), never a wrong tap-wise sum."""
    torch.manual_seed(0)
    reference = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=6)
    module = PaddingSkippingConv2d(3, 4, 3, stride=stride, padding=padding, dilation=6)
    module.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 8, 10)
    torch.testing.assert_close(module(x), reference(x), rtol=0, atol=0)


def test_under_cpu_autocast_many_input_channels_are_summed_in_chunks(monkeypatch):
    """Above CPU_BF16_MAX_INPUT_CHANNELS (oneDNN's bf16 dilated kernel is several times slower there) the
    convolution is the sum over input-channel chunks: bf16 like the dense one, equal to the fp32
    convolution of the bf16-rounded input and weights up to the bf16 rounding of the result, and
    its gradients reach the fp32 weights."""
    import carbseg.models.dilated as dilated

    monkeypatch.setattr(dilated, "CPU_BF16_MAX_INPUT_CHANNELS", 4)
    torch.manual_seed(0)
    module = PaddingSkippingConv2d(10, 6, 3, padding=4, dilation=4, bias=True)  # chunks of 4, 4 and 2
    x = torch.randn(2, 10, 9, 11, requires_grad=True)
    seen, original = [], nn.functional.conv2d

    def spy(inputs, *args, **kwargs):
        seen.append(inputs.shape[1])
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(nn.functional, "conv2d", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    monkeypatch.setattr(nn.functional, "conv2d", original)
    assert seen == [4, 4, 2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = nn.functional.conv2d(x, module.weight, module.bias, 1, 4, 4)
    expected = nn.functional.conv2d(x.detach().bfloat16().float(), module.weight.detach().bfloat16().float(),
                                    module.bias.detach().bfloat16().float(), 1, 4, 4)
    assert y.dtype == dense.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)  # one bf16 rounding of the sum
    torch.testing.assert_close(y.float(), dense.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert module.weight.grad.dtype == torch.float32 and module.weight.grad.abs().sum() > 0
    grad_w = module.weight.grad.clone()
    module.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.conv2d(x, module.weight, module.bias, 1, 4, 4).float().sum().backward()
    torch.testing.assert_close(grad_w, module.weight.grad, rtol=2e-2, atol=5e-2)
    # At or below the limit it is the dense convolution itself.
    small = PaddingSkippingConv2d(4, 6, 3, padding=4, dilation=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(small(x[:, :4]), nn.functional.conv2d(x[:, :4], small.weight, small.bias, 1, 4, 4))


def test_the_aspp_casts_its_input_once_under_cpu_autocast_with_the_same_result():
    torch.manual_seed(0)
    aspp = ASPP(8, 6, dilations=(1, 2, 3)).eval()
    x = torch.randn(2, 8, 6, 7)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        once = aspp(x)
        per_branch = sum(branch(x) for branch in aspp.branches)
    assert torch.equal(once, per_branch)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_phase_split_without_gradients_peaks_at_two_maps_of_its_size():
    """Phases, their convolution and the interleaved output are each the layer's size; each copy is
    dropped once the next exists, so inference holds two of them, not four (measured with the peak of
    benchmarks/bench_fastpaths.py, in a child process: it changes glibc's thresholds)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fastpaths.py"
    code = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('bench', {str(script)!r})\n"
        "bench = sys.modules['bench'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)\n"
        "bench._return_freed_memory()\n"
        "from carbseg.models.dilated import PhaseSplitDepthwiseConv2d\n"
        "conv = PhaseSplitDepthwiseConv2d(64, 64, 5, padding=8, dilation=4, groups=64, bias=False)\n"
        "x = torch.randn(1, 64, 128, 256).contiguous(memory_format=torch.channels_last)\n"
        "with torch.no_grad():\n"
        "    conv(x)\n"
        "    print(max(bench.peak_bytes(lambda: conv(x)) for _ in range(2)) / (x.numel() * 4))\n"
    )
    maps = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert 1.9 <= maps <= 2.4, maps
