"""The segmenter in (B, C, H, W) and in channels-last computes the same logits and gradients.

``build_segmenter`` returns a channels-last model by default and ``Segmenter.features`` brings every
input to the model's layout, so comparing a model with a channels-last copy of its input compares
channels-last with itself. Here one model is built in each layout (``memory_format``), with the same
weights, and a forward hook on every convolution asserts the layout each one actually ran in: the
comparison fails if the (B, C, H, W) model secretly runs channels-last. ResNet-50-V1c at output
stride 8, as the release: its layer3 and layer4 are dilated (2 and 4), and so are the ASPP branches.
The CUDA version (cuDNN) is in tests/test_gpu.py.

Both run in fp32 with BatchNorm in eval mode (its running statistics: the convolutions' forward and
backward kernels are those of training; batch statistics of 2 random-weight images at 64x96 are so
ill-conditioned that fp32 and fp64 gradients differ by 5% in either layout). Logits are compared
elementwise. Gradients are compared as vectors (norm of the difference over the norm): a ReLU whose
input lies within rounding of zero can switch between the two layouts (2 of 5.5 million did here,
none against fp64 in (B, C, H, W)), and passes or stops its whole gradient, which an elementwise
maximum reads as a 1% error although the gradient as a whole agrees to 2e-4. The logits, where a
switch changes nothing (ReLU is continuous), agreed to 1.6e-6 of their scale; the bounds leave room
for other CPUs' summation orders and still fail a layout that computes something else by far.
"""

from __future__ import annotations

import torch
from torch import nn

from carbseg.config import ModelConfig
from carbseg.models.segmenter import build_segmenter

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _in_layout(x: torch.Tensor, memory_format: torch.memory_format) -> bool:
    return x.is_contiguous(memory_format=memory_format)


def _segmenter(memory_format: torch.memory_format, device: str) -> nn.Module:
    cfg = ModelConfig(backbone="resnet50_v1c", pretrained="none", output_stride=8, classifier="learned",
                      head_channels=64, aspp_dilations=[6, 12])
    torch.manual_seed(0)
    return build_segmenter(cfg, 19, load_pretrained=False, memory_format=memory_format).to(device).eval()


def run_in_layout(name: str, images: torch.Tensor, target: torch.Tensor):
    """Logits, parameter gradients (by name) and the dilations that ran, for the model in layout ``name``.

    Asserts that every convolution's input, output and weight are in that layout.
    """
    memory_format = LAYOUTS[name]
    model = _segmenter(memory_format, images.device.type)
    wrong: list[str] = []
    dilations: set[int] = set()

    def check(module_name):
        def hook(module, inputs, output):
            dilations.add(module.dilation[0])
            for what, tensor in (("input", inputs[0]), ("output", output), ("weight", module.weight)):
                if not _in_layout(tensor, memory_format):
                    wrong.append(f"{module_name} {what}")
        return hook

    hooks = [m.register_forward_hook(check(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        logits = model(images)
    finally:
        for h in hooks:
            h.remove()
    assert not wrong, f"{name} model: {len(wrong)} convolution tensors in another layout, first {wrong[0]}"
    # A fixed random projection of the logits: every logit gets its own gradient.
    (logits.float() * target).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, dilations


def compare_layouts(images: torch.Tensor, logit_tol: float = 5e-5, grad_tol: float = 5e-3,
                    tensor_grad_tol: float = 2e-2) -> None:
    """Both layouts from the same weights and images: the largest logit difference within ``logit_tol``
    of the logits' scale; the whole gradient within ``grad_tol`` and each parameter's within
    ``tensor_grad_tol`` (relative norms). A layout that computes something else is off by O(1)."""
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(images.shape[0], 19, *images.shape[-2:], generator=gen).to(images.device)
    plain, plain_grads, dilations = run_in_layout("nchw", images, target)
    last, last_grads, _ = run_in_layout("channels_last", images, target)
    assert {2, 4, 6, 12} <= dilations  # the dilated backbone stages and ASPP branches took part
    assert (plain - last).abs().max().item() <= logit_tol * plain.abs().max().item()
    assert plain_grads.keys() == last_grads.keys() and len(plain_grads) > 100

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    whole = relative(torch.cat([g.flatten() for g in last_grads.values()]),
                     torch.cat([g.flatten() for g in plain_grads.values()]))
    assert whole <= grad_tol
    per_tensor = {key: relative(last_grads[key], grad) for key, grad in plain_grads.items()}
    worst = max(per_tensor, key=per_tensor.get)
    assert per_tensor[worst] <= tensor_grad_tol, f"{worst}: {per_tensor[worst]:.3g}"


def test_nchw_and_channels_last_agree_on_cpu():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ResNet-50 beside other jobs on a small CPU
    try:
        compare_layouts(torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255)
    finally:
        torch.set_num_threads(threads)


def test_build_segmenter_runs_channels_last_by_default():
    cfg = ModelConfig(backbone="tiny", pretrained="none", classifier="learned", head_channels=8, aspp_dilations=[1])
    model = build_segmenter(cfg, 3, load_pretrained=False)
    assert model.memory_format == torch.channels_last
    assert model.backbone.body[0].weight.is_contiguous(memory_format=torch.channels_last)
