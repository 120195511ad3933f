"""``build_teacher``: the one way the trainer and ``carbseg pseudo-masks`` get a teacher."""

from __future__ import annotations

import logging

import torch

from carbseg.config import TeacherConfig
from carbseg.data.classes import ClassSet
from carbseg.errors import UserError
from carbseg.teacher.base import Teacher
from carbseg.teacher.simulated import SimulatedTeacher

# The CLIP modules import open_clip (seconds of start-up), so they are imported only when a CLIP
# teacher or text embeddings are asked for; the simulated teacher never pays for them.
__all__ = ["build_teacher", "class_text_embeddings"]

log = logging.getLogger(__name__)


def build_teacher(cfg: TeacherConfig, classes: ClassSet, device, precision: str = "auto",
                  seed: int = 0) -> Teacher:
    """A CLIP teacher (weights resolved first: MissingWeightsError before anything is written), or one
    of the two research instruments: the simulated teacher (reads ground truth) or the proxy teacher
    (frozen ImageNet features and a classifier fitted on a few labelled images)."""
    device = torch.device(device)
    if cfg.kind == "simulated":
        return SimulatedTeacher(classes, patch_size=cfg.grid_cell, noise=cfg.noise, seed=seed)
    if cfg.kind not in ("clip", "proxy"):
        raise UserError(f"teacher.kind = {cfg.kind!r} is not valid; choose clip, simulated or proxy")
    if any(s <= 0 for s in cfg.scales):
        raise UserError(f"teacher.scales must be positive, got {cfg.scales}")
    if cfg.kind == "proxy":
        from carbseg.teacher.proxy import load_proxy_teacher

        if not cfg.proxy_weights:
            raise UserError("teacher.kind = proxy needs teacher.proxy_weights=FILE (or --proxy-weights FILE); "
                            "write one with carbseg fit-proxy-teacher")
        return load_proxy_teacher(cfg.proxy_weights, classes, device, scales=cfg.scales,
                                  confidence_threshold=cfg.confidence_threshold)
    from carbseg.teacher.clip_dense import DenseCLIP
    from carbseg.teacher.clip_teacher import CLIPTeacher
    from carbseg.teacher.weights import load_clip

    model, _ = load_clip(cfg.clip_model, cfg.clip_pretrained, device, cfg.cache_dir)
    embeddings = class_text_embeddings(classes, cfg.clip_model, cfg.clip_pretrained, device,
                                       cache_dir=cfg.cache_dir, templates=cfg.text_templates, model=model)
    if embeddings.shape[1] != model.visual.output_dim:
        raise UserError("text embedding width does not match the CLIP image tower")
    dense = DenseCLIP(model.visual, variant=cfg.dense, naclip_sigma=cfg.naclip_sigma)
    del model.transformer, model.token_embedding  # only the image tower is needed from here on
    return CLIPTeacher(dense, embeddings, scales=cfg.scales, use_key_smoothing=cfg.key_smoothing,
                       use_prompt_denoising=cfg.prompt_denoising, confidence_threshold=cfg.confidence_threshold,
                       precision=precision)


def class_text_embeddings(*args, **kwargs) -> torch.Tensor:
    """Re-export of ``carbseg.teacher.text_embeddings.class_text_embeddings`` (the trainer takes it from here)."""
    from carbseg.teacher.text_embeddings import class_text_embeddings as compute

    return compute(*args, **kwargs)
