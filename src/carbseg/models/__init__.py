"""The segmenter: dilated backbone, DeepLab-v2 ASPP head, CLIP text-embedding classifier."""
