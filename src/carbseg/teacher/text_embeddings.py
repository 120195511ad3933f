"""Class text embeddings: the prompt ensemble per class name, cached on disk.

Each class name is written into every template; each prompt embedding is L2-normalised, the
prompts of one class are averaged, and the mean is normalised again (CLIP's zero-shot recipe).
The result is cached as ``<cache_dir>/text_embeddings/<key>.safetensors`` keyed by model,
weights, names and templates, so the text tower runs once per setting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from carbseg.data.classes import ClassSet
from carbseg.io import atomic_path
from carbseg.teacher.prompts import templates_from_spec
from carbseg.teacher.weights import WeightsSource, build_clip_model, model_config, resolve_weights

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CARBSEG_CACHE", Path.home() / ".cache" / "carbseg"))


def tokenizer_for(model: str):
    """open_clip's tokenizer for a model name; the plain CLIP BPE tokenizer for a JSON config."""
    if model.endswith(".json"):
        ctx = model_config(model).get("text_cfg", {}).get("context_length", 77)
        return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
    return open_clip.get_tokenizer(model)


def encode_class_names(model: nn.Module, tokenizer, names: Sequence[str], templates: Sequence[str],
                       device="cpu") -> torch.Tensor:
    """(C, D) L2-normalised prompt-ensemble embeddings, one row per name."""
    rows = []
    with torch.no_grad():  # a block, not a decorator: mutation testing skips decorated functions
        for name in names:
            tokens = tokenizer([t.format(name) for t in templates]).to(device)
            emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
            rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


def _cache_file(cache_dir: Path, source: WeightsSource, names: Sequence[str], templates: Sequence[str]) -> Path:
    blob = json.dumps({"weights": source.cache_key(), "names": list(names), "templates": list(templates)})
    return cache_dir / "text_embeddings" / (hashlib.sha256(blob.encode()).hexdigest()[:24] + ".safetensors")


def class_text_embeddings(classes: ClassSet, clip_model: str, clip_pretrained: str, device="cpu",
                          cache_dir=None, templates: str | Sequence[str] = "ensemble85",
                          model: nn.Module | None = None) -> torch.Tensor:
    """(C, D) L2-normalised text embeddings of ``classes.text_names`` (the segmenter's classifier too).

    ``model`` may pass an already built CLIP model (same weights) to avoid loading it twice.
    """
    from safetensors.torch import load_file, save_file

    template_list = templates_from_spec(templates) if isinstance(templates, str) else tuple(templates)
    source = resolve_weights(clip_model, clip_pretrained, None if cache_dir is None else str(cache_dir))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _cache_file(root, source, classes.text_names, template_list)
    if path.is_file():
        log.info("text embeddings from cache %s", path)
        return load_file(str(path))["embeddings"].to(device)
    if model is None:
        model = build_clip_model(source, device)
    emb = encode_class_names(model, tokenizer_for(clip_model), classes.text_names, template_list, device)
    try:
        with atomic_path(path) as tmp:
            save_file({"embeddings": emb.cpu().contiguous()}, str(tmp))
    except OSError as err:  # a read-only cache only costs time
        log.warning("could not cache text embeddings at %s: %s", path, err)
    return emb.to(device)
