"""A stand-in for OpenAI's CLIP release files (``ViT-B-16.pt``), at the size of the tiny test ViT.

The real archives are *traced* TorchScript modules of OpenAI's own module layout (not open_clip's
classes), stored mostly in fp16 (OpenAI's ``convert_weights``: convolutions, linear layers, attention
projections, ``proj`` and ``text_projection``; LayerNorms and embeddings stay fp32), with three extra
integer entries in the state dict: ``input_resolution``, ``context_length``, ``vocab_size``. This
module builds such an archive from random weights, written here from that description.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from carbseg.teacher.tiny import TINY_VIT_CONFIG


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)),
                                              ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])


class _Visual(nn.Module):
    def __init__(self, resolution: int, patch: int, width: int, layers: int, heads: int, out: int):
        super().__init__()
        grid = resolution // patch
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out) * width**-0.5)


class OpenAIStyleCLIP(nn.Module):
    """OpenAI's ``model.CLIP`` parameter layout (ViT image tower), randomly initialised."""

    def __init__(self, cfg: dict = TINY_VIT_CONFIG):
        super().__init__()
        v, t, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
        self.visual = _Visual(v["image_size"], v["patch_size"], v["width"], v["layers"],
                              v["width"] // v["head_width"], embed)
        self.transformer = _Transformer(t["width"], t["layers"], t["heads"])
        self.token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        self.positional_embedding = nn.Parameter(torch.randn(t["context_length"], t["width"]) * 0.01)
        self.ln_final = nn.LayerNorm(t["width"])
        self.text_projection = nn.Parameter(torch.randn(t["width"], embed) * t["width"] ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        # The archive's metadata entries (buffers, so they are part of state_dict()).
        self.register_buffer("input_resolution", torch.tensor(v["image_size"]))
        self.register_buffer("context_length", torch.tensor(t["context_length"]))
        self.register_buffer("vocab_size", torch.tensor(t["vocab_size"]))
        for block in [*self.visual.transformer.resblocks, *self.transformer.resblocks]:
            for p in (block.ln_1, block.ln_2):  # non-trivial LayerNorms, so a mix-up would show
                nn.init.normal_(p.weight, 1.0, 0.1)
                nn.init.normal_(p.bias, 0.0, 0.1)

    def to_openai_precision(self) -> OpenAIStyleCLIP:
        """OpenAI's storage: fp16 for convolutions, linear layers, attention and the projections."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.half()
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_weight.data = m.in_proj_weight.data.half()
                m.in_proj_bias.data = m.in_proj_bias.data.half()
        self.visual.proj.data = self.visual.proj.data.half()
        self.text_projection.data = self.text_projection.data.half()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding and projection only: enough to trace, every parameter is kept by the trace."""
        x = self.visual.conv1(images.to(self.visual.conv1.weight.dtype)).flatten(2).mean(-1)
        return x.float() @ self.visual.proj.float()


def write_openai_archive(path: str | Path, seed: int = 0) -> Path:
    """Trace an fp16 OpenAI-layout CLIP with random weights and save it as a TorchScript archive."""
    torch.manual_seed(seed)
    model = OpenAIStyleCLIP().to_openai_precision().eval()
    size = TINY_VIT_CONFIG["vision_cfg"]["image_size"]
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; the archives are TorchScript
        traced = torch.jit.trace(model, torch.zeros(1, 3, size, size))
        torch.jit.save(traced, str(path))
    return path
