"""The segmenter: normalise -> dilated backbone -> DeepLab-v2 ASPP -> (projection) -> classifier -> upsample.

The logits are upsampled bilinearly to the image size (``carbseg.models.upsample``: two matrix
products in fp32 on a CPU, ``F.interpolate`` elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from carbseg.config import ModelConfig
from carbseg.errors import UserError
from carbseg.models.aspp import ASPP
from carbseg.models.backbones import build_backbone
from carbseg.models.classifier import LearnedClassifier, TextEmbeddingClassifier
from carbseg.models.upsample import upsample_bilinear


class Segmenter(nn.Module):
    """Maps float RGB images (B, 3, H, W) in 0..255 to class logits (B, C, H, W).

    ``projection`` is a learned 1x1 conv from the ASPP width to the text-embedding width, present
    only when they differ (the release uses 512 = 512, so no projection); otherwise Identity.
    """

    def __init__(
        self, backbone: nn.Module, head: ASPP, projection: nn.Module, classifier: nn.Module, num_classes: int
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.projection = projection
        self.classifier = classifier
        self.num_classes = num_classes
        mean = torch.tensor(getattr(backbone, "mean", (123.675, 116.28, 103.53)), dtype=torch.float32)
        std = torch.tensor(getattr(backbone, "std", (58.395, 57.12, 57.375)), dtype=torch.float32)
        # Non-persistent: a property of the backbone, not of training; keeps checkpoints portable.
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1), persistent=False)
        # The layout every convolution runs in (``use_memory_format``); build_segmenter sets channels-last.
        self.memory_format = torch.contiguous_format

    def use_memory_format(self, memory_format: torch.memory_format) -> Segmenter:
        """Run in ``memory_format``: the weights are laid out in it and every input is brought to it.

        Channels-last is what oneDNN (CPU) and cuDNN compute in natively; with (B, C, H, W) tensors oneDNN
        reorders the activations at every layer. Measured on a 2-core AMX Xeon (benchmarks/RESULTS.md):
        the demo's training step 1.13-1.16x and EfficientNet-Lite0's 1.5x faster, inference 1.35-1.9x. The
        values are the same up to the order of floating-point sums. Returns the module (like ``to``).
        """
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Head features at output stride (B, D, H/s, W/s), before the classifier."""
        x = ((images - self.pixel_mean) / self.pixel_std).contiguous(memory_format=self.memory_format)
        return self.projection(self.head(self.backbone(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(images))
        return upsample_bilinear(logits, images.shape[-2:])

    def param_groups(self, lr: float, head_lr_mult: float = 1.0) -> list[dict]:
        """Optimizer groups ``backbone`` and ``head`` (ASPP, projection, learned classifier).

        The authors' release trains every parameter with the same lr (its optimizer config has no
        per-module multiplier), so ``head_lr_mult`` defaults to 1; the DeepLab 10x head lr is
        available by passing 10. Frozen tensors (the text embeddings) are buffers, never here.
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [
            p
            for m in (self.head, self.projection, self.classifier)
            for p in m.parameters()
            if p.requires_grad
        ]
        return [
            {"name": "backbone", "params": backbone, "lr": lr},
            {"name": "head", "params": head, "lr": lr * head_lr_mult},
        ]


def build_segmenter(
    cfg: ModelConfig,
    num_classes: int,
    class_embeddings: torch.Tensor | None = None,
    load_pretrained: bool = True,
    memory_format: torch.memory_format = torch.channels_last,
) -> Segmenter:
    """The segmenter described by ``cfg`` for ``num_classes`` classes.

    ``classifier == "text"`` needs the (C, D) class text embeddings; with ``load_pretrained=False``
    and no embeddings, a zero placeholder (C, cfg.embed_dim) is created for a checkpoint to fill.
    ``load_pretrained=False`` reads and downloads no weights at all. ``memory_format`` is the layout
    it runs in (``Segmenter.use_memory_format``): channels-last, what training and inference use;
    ``torch.contiguous_format`` (B, C, H, W) to compare against it.
    """
    backbone = build_backbone(
        cfg.backbone, cfg.output_stride, cfg.pretrained, load_pretrained=load_pretrained
    )
    head = ASPP(backbone.out_channels, cfg.head_channels, cfg.aspp_dilations)
    if cfg.classifier == "text":
        if class_embeddings is None:
            if load_pretrained:
                raise UserError(
                    "model.classifier = 'text' needs the class text embeddings; compute them with the CLIP teacher "
                    "or set model.classifier=learned"
                )
            class_embeddings = torch.zeros(num_classes, cfg.embed_dim)
        if tuple(class_embeddings.shape) != (num_classes, cfg.embed_dim):
            raise UserError(
                f"class text embeddings have shape {tuple(class_embeddings.shape)}, expected "
                f"({num_classes}, model.embed_dim={cfg.embed_dim}); check the class set and model.embed_dim"
            )
        projection: nn.Module = (
            nn.Identity()
            if cfg.head_channels == cfg.embed_dim
            else nn.Conv2d(cfg.head_channels, cfg.embed_dim, 1, bias=False)
        )
        classifier: nn.Module = TextEmbeddingClassifier(class_embeddings)
    elif cfg.classifier == "learned":
        projection = nn.Identity()
        classifier = LearnedClassifier(cfg.head_channels, num_classes)
    else:
        raise UserError(f"model.classifier = {cfg.classifier!r} is not valid; choose one of text, learned")
    return Segmenter(backbone, head, projection, classifier, num_classes).use_memory_format(memory_format)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm of ``model`` as a SyncBatchNorm (statistics over all GPUs), activations kept.

    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` turns timm's ``BatchNormAct2d`` (a BatchNorm
    with its activation inside: all 48 of EfficientNet-Lite0's, each with its ReLU6) into a plain
    SyncBatchNorm that drops the activation; timm's converter makes ``SyncBatchNormAct`` instead and
    converts plain BatchNorms (ResNet's) exactly as PyTorch's does. Parameter and buffer names do
    not change, so the saved model loads into the unconverted segmenter.
    """
    from timm.layers import convert_sync_batchnorm as timm_convert

    return timm_convert(model)
