"""DeepLab-v2 ASPP head: parallel dilated 3x3 convolutions whose outputs are summed.

As in the authors' release (its ``ASPPHeadV2``), each branch is conv -> BatchNorm -> ReLU with
``head_channels`` (512) outputs, and the branches are *summed* (DeepLab-v2), not concatenated and
fused (DeepLab-v3). The summed 512-d feature feeds the text-embedding classifier directly.
On a CPU the branches skip the products with their zero padding where that is most of them
(:class:`carbseg.models.dilated.PaddingSkippingConv2d`; same parameters, same results to rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from carbseg.models.dilated import PaddingSkippingConv2d


class ASPPBranch(nn.Sequential):
    """One atrous branch: 3x3 conv with dilation d (padding d keeps the size), BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int):
        super().__init__(
            PaddingSkippingConv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.dilation = dilation


class ASPP(nn.Module):
    """sum over d in ``dilations`` of ReLU(BN(conv3x3_d(x)))."""

    def __init__(self, in_channels: int, out_channels: int = 512, dilations: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(ASPPBranch(in_channels, out_channels, d) for d in dilations)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not torch.onnx.is_in_onnx_export():
            # Each branch's convolution would cast the same input again (autocast casts per call): on a
            # 2-core CPU four copies of ResNet's 2048x64x128 map took ~290 ms of a 2.2 s inference.
            x = x.to(torch.get_autocast_dtype("cpu"))
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out
