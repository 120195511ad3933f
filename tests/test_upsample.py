"""The CPU upsampling of the logits (two matrix products) against PyTorch's bilinear interpolation, and
the size rule that decides where the products are taken."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from carbseg.models.upsample import (
    interpolation_matrix,
    matrix_products_cost_per_pixel,
    matrix_products_memory,
    matrix_products_pay,
    upsample_bilinear,
    upsample_by_matrix_products,
)


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
    ours = upsample_by_matrix_products(x, size_out)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    theirs = reference(x, size_out)
    (theirs_grad,) = torch.autograd.grad(theirs, x, grad)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, rtol=0, atol=2e-6)  # fp32 rounding: sums in another order
    assert torch.allclose(ours_grad, theirs_grad, rtol=1e-5, atol=1e-4)


def test_bf16_logits_are_upsampled_by_bf16_products_as_close_as_bf16_interpolation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 16).bfloat16()
    exact = reference(logits.double(), (64, 128))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = upsample_by_matrix_products(logits, (64, 128))
        theirs = reference(logits, (64, 128))
        assert torch.equal(upsample_bilinear(logits, (64, 128)), ours)  # the rule takes bf16 products here
    assert ours.dtype == torch.bfloat16 and theirs.dtype == torch.bfloat16  # F.interpolate's memory
    # Both round to bf16 (8 significant bits; |values| < 4 here, so an ulp is at most 2 ** -6); the
    # products round their intermediate too, and their weights (multiples of 1/16) are exact.
    ulp = 2.0 ** -6
    assert (theirs.double() - exact).abs().max() <= ulp / 2
    assert (ours.double() - exact).abs().max() <= ulp
    x = logits.float().requires_grad_()
    (grad,) = torch.autograd.grad(upsample_by_matrix_products(x.bfloat16(), (64, 128)).float().sum(), x)
    assert torch.allclose(grad, torch.full_like(grad, 64 * 128 / (8 * 16)), rtol=1e-2)  # each input's weights


# (planes = batch x classes, logits size, image size): the shapes the rule was measured on.
DEMO = (4 * 19, (16, 32), (128, 256))
CAMVID_CPU = (4 * 11, (15, 20), (240, 320))  # output stride 16, 240x320 crops
CAMVID_OS8 = (4 * 11, (30, 40), (240, 320))
CITYSCAPES = (8 * 19, (128, 256), (1024, 2048))
CITYSCAPES_1_75 = (19, (224, 448), (1792, 3584))  # the test-time scale 1.75, batch 1


def test_cost_and_memory_of_the_products_by_hand():
    # h + h * w / H multiply-adds per output pixel.
    assert matrix_products_cost_per_pixel((16, 32), (128, 256)) == 20.0
    assert matrix_products_cost_per_pixel((15, 20), (240, 320)) == 16.25
    assert matrix_products_cost_per_pixel((128, 256), (1024, 2048)) == 160.0
    assert matrix_products_cost_per_pixel((224, 448), (1792, 3584)) == 280.0
    # Demo, fp32: weights 4 * (128 * 16 + 256 * 32) + planes * 4 * (16 * 256 + 128 * 256) against
    # planes * 4 * 128 * 256 (1.129x); bf16 logits in fp32 products: plus the input widened to fp32,
    # against half the output (2.3x); in bf16 products: every term at 2 bytes (1.129x again).
    assert matrix_products_memory(*DEMO, 4) == (40_960 + 76 * 4 * 36_864, 76 * 4 * 32_768)
    assert matrix_products_memory(*DEMO, 2) == (40_960 + 76 * 4 * (36_864 + 512), 76 * 2 * 32_768)
    assert matrix_products_memory(*DEMO, 2, 2) == (20_480 + 76 * 2 * 36_864, 76 * 2 * 32_768)


@pytest.mark.parametrize("shape,element_size,product_size,expected", [
    (DEMO, 4, 4, True),  # cost 20, memory 1.13x
    (CAMVID_CPU, 4, 4, True),  # cost 16.25, memory 1.07x
    (CAMVID_OS8, 4, 4, True),  # cost 35, memory 1.13x
    ((11, (45, 60), (360, 480)), 4, 4, False),  # a whole CamVid frame at stride 8: cost 52.5, even
    ((4 * 19, (64, 128), (512, 1024)), 4, 4, False),  # Cityscapes crops: cost 80, within noise of even
    (CITYSCAPES, 4, 4, False),  # cost 160: 1.6x slower
    ((19, (128, 256), (1024, 2048)), 4, 4, False),  # batch 1, as slow per pixel
    (CITYSCAPES_1_75, 4, 4, False),  # cost 280: 2.4x slower
    (DEMO, 2, 4, False),  # bf16 logits in fp32 products: an fp32 output is 2.3x bf16 F.interpolate's memory
    (DEMO, 2, 2, True),  # bf16 logits in bf16 products: 1.13x
    (CITYSCAPES, 2, 2, False),  # cost 160, whatever the dtype
    ((2, (3, 5), (11, 13)), 4, 4, False),  # tiny: the weight matrices alone are half the output
])
def test_the_products_are_taken_only_where_they_pay(shape, element_size, product_size, expected):
    assert matrix_products_pay(*shape, element_size, product_size) is expected


def test_upsample_bilinear_follows_the_rule(monkeypatch):
    calls, interpolate = [], F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(a[0].shape) or interpolate(*a, **k))
    demo = torch.randn(1, 19, 16, 32)
    assert torch.allclose(upsample_bilinear(demo, (128, 256)), reference(demo, (128, 256)), atol=2e-6)
    assert calls == [demo.shape]  # only the reference: the demo's shape takes the products
    calls.clear()
    cityscapes = torch.randn(1, 1, 128, 256)  # one plane at Cityscapes size: cost 160
    upsample_bilinear(cityscapes, (1024, 2048))
    assert calls == [cityscapes.shape]


def test_a_matrix_first_built_in_inference_mode_serves_a_backward_later():
    interpolation_matrix.cache_clear()
    with torch.inference_mode():
        upsample_by_matrix_products(torch.randn(1, 2, 3, 5), (11, 13))
    x = torch.randn(1, 2, 3, 5, requires_grad=True)
    upsample_by_matrix_products(x, (11, 13)).sum().backward()  # raised "Inference tensors cannot be saved" before
    assert torch.allclose(x.grad.sum(), torch.tensor(11.0 * 13 * 2), rtol=1e-5)


def test_tracing_keeps_pytorchs_interpolation(monkeypatch):
    calls, interpolate = [], F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k) or interpolate(*a, **k))
    x = torch.randn(1, 19, 16, 32)  # the demo's logits: the rule takes the products
    upsample_bilinear(x, (128, 256))
    assert calls == []  # on a CPU: the matrix products
    torch.jit.trace(lambda t: upsample_bilinear(t, (128, 256)), (x,), check_trace=False)
    assert [call["mode"] for call in calls] == ["bilinear"]  # exported graphs keep a Resize node
