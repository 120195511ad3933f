"""Every shipped config loads, and the dataset configs carry the release's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from carbseg.config import load_config
from carbseg.data.datasets import class_set_for

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_config_loads_and_real_datasets_use_the_clip_teacher():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert {p.name for p in paths} >= {"cityscapes_carb.yaml", "camvid_carb.yaml", "wilddash2_carb.yaml", "demo.yaml"}
    for path in paths:
        cfg = load_config(path)
        assert cfg.train.warmup_iters < cfg.train.max_iters, path
        if cfg.data.dataset == "synthetic":
            continue
        # The simulated teacher reads ground truth: never the default of a real-dataset config.
        assert cfg.teacher.kind == "clip" and cfg.model.classifier == "text", path
        assert cfg.teacher.clip_model == "ViT-B-16" and cfg.teacher.clip_pretrained == "openai", path


@pytest.mark.parametrize(
    ("name", "num_classes", "crop", "iters", "warmup", "scale"),
    [
        ("cityscapes_carb", 19, [512, 1024], 30000, 16000, (1.0, 1.0)),
        ("camvid_carb", 11, [720, 960], 12000, 4000, (0.5, 2.0)),
        ("wilddash2_carb", 25, [512, 1024], 30000, 16000, (1.0, 1.0)),
    ],
)
def test_dataset_configs_follow_the_release(name, num_classes, crop, iters, warmup, scale):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert class_set_for(cfg.data.dataset).num_classes == num_classes
    assert cfg.data.crop_size == crop
    assert (cfg.train.max_iters, cfg.train.warmup_iters) == (iters, warmup)
    assert (cfg.glv.scale_offset, cfg.glv.scale_rate) == scale and cfg.glv.patch_size == [512, 256]
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay) == (0.005, 0.9, 0.0005)
    assert (cfg.train.poly_power, cfg.train.min_lr) == (0.9, 1e-4)
    assert cfg.model.backbone == "resnet50_v1c" and cfg.model.aspp_dilations == [6, 12, 18, 24]
    assert cfg.carb.queue_size == 5 and cfg.carb.coeff == 1.0 and cfg.carb.fixed_coefficient is None
    if name == "camvid_carb":
        assert cfg.data.scale_size == [720, 960] and cfg.data.ratio_range == [1.0, 4.0]
    else:
        assert cfg.data.scale_size == [1024, 2048] and cfg.data.ratio_range == [0.5, 2.0]


def test_demo_config_is_small_and_offline():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.data.dataset == "synthetic" and cfg.teacher.kind == "simulated"
    assert cfg.model.backbone == "small" and cfg.model.pretrained == "none"
