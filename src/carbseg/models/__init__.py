"""The segmenter: dilated backbone, DeepLab-v2 ASPP head, CLIP text-embedding classifier."""

from carbseg.models.segmenter import Segmenter, build_segmenter

__all__ = ["Segmenter", "build_segmenter"]
