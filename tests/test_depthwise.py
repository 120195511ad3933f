"""Depthwise convolutions compute in fp32 under CPU autocast (carbseg.models.depthwise)."""

from __future__ import annotations

import torch
from torch import nn

from carbseg.models.depthwise import Fp32DepthwiseConv2d, is_depthwise, keep_depthwise_fp32


def _pair(**kwargs) -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(0)
    reference = nn.Conv2d(6, 6, 3, groups=6, **kwargs)
    module = Fp32DepthwiseConv2d(6, 6, 3, groups=6, **kwargs)
    module.load_state_dict(reference.state_dict())
    return reference, module


def test_only_plain_depthwise_convolutions_are_converted_with_their_parameters():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 1),                       # dense
        nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise
        nn.Conv2d(6, 6, 3, padding=1, groups=3),  # grouped, not depthwise
        nn.Conv2d(6, 12, 3, padding=1, groups=6), # depthwise multiplier 2: not depthwise here
        nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6),  # depthwise, strided
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert keep_depthwise_fp32(net) == 2
    assert [type(m) is Fp32DepthwiseConv2d for m in net] == [False, True, False, False, True]
    assert [is_depthwise(m) for m in net] == [False, True, False, False, True]
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert keep_depthwise_fp32(net) == 0  # already converted


def test_without_autocast_it_is_the_plain_convolution_bit_for_bit():
    reference, module = _pair(padding=1, stride=2)
    x = torch.randn(2, 6, 9, 11)
    assert torch.equal(module(x), reference(x))


def test_under_cpu_bf16_autocast_it_computes_in_fp32_forward_and_backward():
    """Output fp32, equal to the fp32 convolution of the (bf16) input cast up; the gradients reach the
    bf16 input in its dtype and the weights in fp32, equal to the fp32 computation's."""
    reference, module = _pair(padding=1)
    x = torch.randn(2, 6, 8, 8).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
        y_bf16 = reference(x)  # what autocast alone would do: a bf16 convolution
    assert y.dtype == torch.float32 and y_bf16.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_()
    expected = reference(x32)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(expected)
    (y * upstream).sum().backward()
    weight_grad, x_grad = module.weight.grad.clone(), x.grad.clone()
    reference.zero_grad()
    (expected * upstream).sum().backward()
    assert weight_grad.dtype == torch.float32 and x_grad.dtype == torch.bfloat16
    torch.testing.assert_close(weight_grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, x32.grad.bfloat16(), rtol=0, atol=0)


def test_without_gradients_it_follows_autocast():
    """Inference and validation: the bf16 forward alone is faster, so no cast up."""
    reference, module = _pair(padding=1)
    x = torch.randn(2, 6, 8, 8)
    for context in (torch.no_grad, torch.inference_mode):
        with context(), torch.autocast("cpu", dtype=torch.bfloat16):
            y, expected = module(x), reference(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    module.requires_grad_(False)  # a frozen layer on an input that needs no gradient: no backward either
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module(x).dtype == torch.bfloat16
        assert module(x.requires_grad_()).dtype == torch.float32  # the input's gradient goes through it
