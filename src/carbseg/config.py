"""Typed run configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

Unknown keys and wrong types are refused with the key's dotted name and the valid choices, so a
typo never silently trains with a default. The resolved config is saved in every run directory
and embedded in ``model.safetensors`` so evaluation and prediction need nothing else.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from carbseg.data.datasets import DATASET_NAMES
from carbseg.errors import UserError


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # cityscapes | camvid | wilddash2 | synthetic | folder
    root: str = "data/synthetic"
    classes: str | None = None  # classes file, only for the folder dataset
    train_split: str = "train"
    val_split: str = "val"
    labels: str | None = None  # image-level labels JSON; None = derive from GT masks at start-up
    pseudo_masks: str | None = None  # single path: folder of offline pseudo-masks instead of the online teacher
    # Joint augmentations (the authors' pipeline): resize to `resize` (w, h) times a ratio drawn from
    # `ratio_range`, random crop of `crop_size` (h, w) with at most `cat_max_ratio` of one class,
    # flip, photometric distortion, pad with ignore.
    resize: list[int] = field(default_factory=lambda: [2048, 1024])
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True
    batch_size: int = 4  # per process
    num_workers: int = 4


@dataclass
class TeacherConfig:
    # clip | simulated (a research instrument that reads ground truth) | proxy (a research instrument:
    # frozen ImageNet features + a classifier fitted on a few images' ground truth, see docs/teacher.md)
    kind: str = "clip"
    clip_model: str = "ViT-B-16"
    clip_pretrained: str = "openai"  # open_clip tag, local file, or none
    dense: str = "maskclip"  # last-block dense form: maskclip (the paper's) | sclip | clearclip | naclip
    naclip_sigma: float = 5.0  # NACLIP's Gaussian neighbourhood width, in patches
    text_templates: str = "ensemble85"  # ensemble85 | single | path to a text file, one template per line
    scales: list[float] = field(default_factory=lambda: [1.0])
    key_smoothing: bool = False
    prompt_denoising: bool = False
    confidence_threshold: float | None = None
    # Simulated teacher only
    patch_size: int = 16
    noise: float = 0.3
    # Proxy teacher only: the safetensors file written by `carbseg fit-proxy-teacher`
    proxy_weights: str | None = None
    cache_dir: str | None = None


@dataclass
class ModelConfig:
    backbone: str = "resnet50_v1c"  # resnet50_v1c | resnet101_v1c (the release's) | resnet50 | resnet101 | ...
    pretrained: str = "imagenet"  # imagenet | none | path or http(s) URL of a weights file
    output_stride: int = 8
    aspp_dilations: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    head_channels: int = 512
    classifier: str = "text"  # text: frozen CLIP text embeddings (1x1 conv, no bias) | learned
    embed_dim: int = 512  # width of the text embeddings the head projects to


@dataclass
class GLVConfig:
    """Global-Local View: a local patch of `patch_size` (h, w) zoomed by s ~ U[scale_offset, scale_offset + scale_rate)."""

    enabled: bool = True
    patch_size: list[int] = field(default_factory=lambda: [512, 256])
    scale_offset: float = 1.0
    scale_rate: float = 1.0


@dataclass
class CARBConfig:
    """Consistency-Aware Region Balancing: after warm-up, c * CE on teacher/model-inconsistent pixels."""

    enabled: bool = True
    queue_size: int = 5  # q: recent losses averaged for the adaptive coefficient
    coeff: float = 1.0
    fixed_coefficient: float | None = None  # set (e.g. 0.03) for the non-adaptive variant


@dataclass
class TrainConfig:
    max_iters: int = 30000
    warmup_iters: int = 16000  # CARB warm-up: plain cross-entropy on teacher masks before this
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    min_lr: float = 1e-4
    amp: str = "auto"  # auto (bf16 on Ampere+ GPUs, fp16 on older ones, CPU: a timed probe) | bf16 | fp16 | off
    grad_accum: int = 1
    eval_interval: int = 2000
    checkpoint_interval: int = 1000
    log_interval: int = 50
    val_max_images: int | None = None


@dataclass
class EvalConfig:
    mode: str = "whole"  # whole | slide
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])
    stride: list[int] = field(default_factory=lambda: [341, 683])
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    batch_size: int = 1


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    glv: GLVConfig = field(default_factory=GLVConfig)
    carb: CARBConfig = field(default_factory=CARBConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "data.dataset": DATASET_NAMES,
    "teacher.kind": ("clip", "simulated", "proxy"),
    "teacher.dense": ("maskclip", "sclip", "clearclip", "naclip"),
    "model.backbone": ("resnet50_v1c", "resnet101_v1c", "resnet50", "resnet101", "efficientnet_lite0", "small",
                       "tiny"),
    "model.classifier": ("text", "learned"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "eval.mode": ("whole", "slide"),
}


# Counts that have a floor: refused at load time with the key's name, not as a crash inside the loop.
MINIMUMS = {
    "data.batch_size": 1,
    "data.num_workers": 0,
    "train.max_iters": 1,
    "train.grad_accum": 1,
    "eval.batch_size": 1,
    "carb.queue_size": 1,
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


# YAML 1.1 (PyYAML) reads 1e-3 and 5e-3 as strings: a float needs a dot there (1.0e-3). Such
# strings are taken as the numbers a user means where the key is a float.
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value, tp, key: str, source: str):
    """Check ``value`` against the annotation ``tp``.

    Ints and numeric strings such as ``1e-3`` are accepted where floats are expected, and numbers
    where text is expected (``data.root=2024`` is the folder ``2024``).
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise UserError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        return float(value)
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if tp is str and isinstance(value, bool):
        raise UserError(f"{source}: {key} must be text, got {value!r}; quote the value (e.g. '{str(value).lower()}')")
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"{source}: {key} must be true or false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise UserError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            raise UserError(f"{source}: unknown key {dotted!r}; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted + ".", source)
        else:
            kwargs[key] = _coerce(value, tp, dotted, source)
            if dotted in MINIMUMS and kwargs[key] < MINIMUMS[dotted]:
                raise UserError(f"{source}: {dotted} = {kwargs[key]!r} is not valid; it must be at least "
                                f"{MINIMUMS[dotted]}")
            if dotted in CHOICES and kwargs[key] not in CHOICES[dotted]:
                raise UserError(
                    f"{source}: {dotted} = {kwargs[key]!r} is not valid; choose one of {', '.join(CHOICES[dotted])}"
                )
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=0.01", "glv.enabled=false"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. train.max_iters=1000)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:  # e.g. a !!python tag: safe_load refuses to construct it
            reason = str(err).strip().splitlines()[0]
            raise UserError(f"override {item!r}: the value is not a plain YAML scalar or list ({reason})") from None
        if isinstance(value, int | float) and _is_text_key(key.strip()):
            value = raw.strip()  # data.root=2024 or name=1.10: the text as typed, not a number
        _set_dotted(tree, key.strip(), value)
    return tree


def _is_text_key(dotted: str) -> bool:
    """Whether the config key ``dotted`` (e.g. ``data.root``) holds text (str or str | None)."""
    cls = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        tp = hints[part]
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        if i != len(parts) - 1:
            return False
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        return inner[0] is str
    return False


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict, source: str = "config") -> Config:
    return _build(Config, data or {}, "", source)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (safely: no Python objects) and apply ``key=value`` overrides."""
    data: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise UserError(f"{path}: config file not found; see configs/ for examples") from None
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if overrides:
        if not isinstance(data, dict):  # refused here with the file's name, not as a crash in _merge
            raise UserError(f"{source}: the config must be a mapping of sections, got {data!r}")
        data = _merge(data, parse_overrides(overrides))
        source += " (with overrides)"
    return config_from_dict(data, source)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
