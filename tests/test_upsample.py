"""The CPU upsampling of the logits (two matrix products) against PyTorch's bilinear interpolation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from carbseg.models.upsample import interpolation_matrix, upsample_bilinear


def reference(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_interpolation_matrix_by_hand():
    # 2 -> 4, align_corners=False: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (upper tap clamped to 1).
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    assert torch.equal(interpolation_matrix(2, 4), expected)
    # 3 -> 2 (a downsampling): sources 0.25, 1.75.
    assert torch.equal(interpolation_matrix(3, 2), torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.25, 0.75]]))
    assert torch.equal(interpolation_matrix(1, 3), torch.ones(3, 1))  # both taps on the only input
    assert torch.allclose(interpolation_matrix(17, 130).sum(dim=1), torch.ones(130))


@pytest.mark.parametrize("size_in,size_out", [((16, 32), (128, 256)), ((30, 40), (240, 320)), ((5, 7), (33, 50)),
                                              ((64, 64), (16, 20)), ((9, 13), (9, 13)), ((1, 1), (4, 4))])
def test_forward_and_gradient_equal_pytorchs_interpolation(size_in, size_out):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size_in, dtype=torch.float64).float().requires_grad_()
    grad = torch.randn(2, 3, *size_out)
    ours = upsample_bilinear(x, size_out)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    theirs = reference(x, size_out)
    (theirs_grad,) = torch.autograd.grad(theirs, x, grad)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, rtol=0, atol=2e-6)  # fp32 rounding: sums in another order
    assert torch.allclose(ours_grad, theirs_grad, rtol=1e-5, atol=1e-4)


def test_under_bf16_autocast_the_result_is_fp32_and_closer_than_bf16_interpolation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 16).bfloat16()
    exact = reference(logits.double(), (64, 128))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = upsample_bilinear(logits, (64, 128))
        theirs = reference(logits, (64, 128))
    assert ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16
    assert (ours.double() - exact).abs().max() < 1e-6
    assert (theirs.double() - exact).abs().max() > 1e-3  # bf16's rounding of the output, gone here


def test_a_matrix_first_built_in_inference_mode_serves_a_backward_later():
    interpolation_matrix.cache_clear()
    with torch.inference_mode():
        upsample_bilinear(torch.randn(1, 2, 3, 5), (11, 13))
    x = torch.randn(1, 2, 3, 5, requires_grad=True)
    upsample_bilinear(x, (11, 13)).sum().backward()  # raised "Inference tensors cannot be saved" before
    assert torch.allclose(x.grad.sum(), torch.tensor(11.0 * 13 * 2), rtol=1e-5)


def test_tracing_keeps_pytorchs_interpolation(monkeypatch):
    calls, interpolate = [], F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k) or interpolate(*a, **k))
    x = torch.randn(1, 2, 4, 4)
    upsample_bilinear(x, (8, 8))
    assert calls == []  # on a CPU: the matrix products
    torch.jit.trace(lambda t: upsample_bilinear(t, (8, 8)), (x,), check_trace=False)
    assert [call["mode"] for call in calls] == ["bilinear"]  # exported graphs keep a Resize node
