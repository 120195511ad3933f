"""A tiny open_clip ViT configuration for tests and offline pipeline checks (no real CLIP weights).

Same architecture family as ViT-B/16 (patch 16, 224 px, standard blocks) at a fraction of the
size, so the value path, weight formats and CLI run in milliseconds. Its masks mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_VIT_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    # The text tower keeps CLIP's vocabulary so that the real tokenizer can be used.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def write_tiny_config(path: str | Path, patch_size: int = 16) -> Path:
    """Write the tiny config as an open_clip model JSON (usable as ``--clip-model PATH``)."""
    cfg = json.loads(json.dumps(TINY_VIT_CONFIG))
    cfg["vision_cfg"]["patch_size"] = patch_size
    path = Path(path)
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return path
