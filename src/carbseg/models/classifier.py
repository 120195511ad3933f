"""Pixel classifiers on top of the ASPP features.

``TextEmbeddingClassifier`` is the paper's classifier: a 1x1 convolution without bias whose
weights are the frozen CLIP class text embeddings (C, D), so a logit is the dot product of a
pixel's feature with a class's text embedding. As in the authors' release, neither the features
nor the logits are normalised or scaled (the release convolves the raw ASPP sum with the stored
embeddings). The embeddings are a persistent buffer: saved in the state_dict, never trained.

``LearnedClassifier`` is the ordinary trainable 1x1 conv with bias (ablation / no CLIP text).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TextEmbeddingClassifier(nn.Module):
    def __init__(self, class_embeddings: torch.Tensor):
        super().__init__()
        if class_embeddings.dim() != 2:
            raise ValueError(f"class embeddings must be (C, D), got shape {tuple(class_embeddings.shape)}")
        self.register_buffer("class_embeddings", class_embeddings.detach().clone().float(), persistent=True)

    @property
    def num_classes(self) -> int:
        return self.class_embeddings.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.class_embeddings.shape[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight = self.class_embeddings.to(features.dtype)[:, :, None, None]
        return F.conv2d(features, weight)


class LearnedClassifier(nn.Conv2d):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes, kernel_size=1, bias=True)
