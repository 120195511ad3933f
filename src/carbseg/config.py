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
from collections.abc import Sequence
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
    # Joint augmentations (the authors' pipeline): the image is rescaled, aspect kept, to fit into
    # `scale_size` (h, w) times a ratio drawn from `ratio_range` (mmseg's img_scale, there (w, h)),
    # random crop of `crop_size` (h, w) with at most `cat_max_ratio` of one class, flip,
    # photometric distortion, pad with ignore. Every size in the config is (h, w).
    scale_size: list[int] = field(default_factory=lambda: [1024, 2048])
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True
    batch_size: int = 4  # per process
    num_workers: int = 4
    # Decoded training frames (image + mask) kept in memory, MiB per training process, shared out over
    # its data-loading workers; 0 decodes every frame every time. Batches are identical either way.
    cache_mib: int = 1024


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
    # Simulated teacher only: the side, in pixels, of the square grid cell whose ground-truth
    # majority it takes (CLIP ViT-B/16 sees 16-pixel patches)
    grid_cell: int = 16
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
    # DDP: auto (when torchrun launched several processes) | always (also one process: DDP, NCCL and
    # SyncBN on one GPU) | never (refuse a launch of several processes)
    ddp: str = "auto"


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
    "train.ddp": ("auto", "always", "never"),
    "eval.mode": ("whole", "slide"),
}


# Counts that have a floor: refused at load time with the key's name, not as a crash inside the loop.
MINIMUMS = {
    "data.batch_size": 1,
    "data.num_workers": 0,
    "data.cache_mib": 0,
    "train.max_iters": 1,
    "train.grad_accum": 1,
    "eval.batch_size": 1,
    "carb.queue_size": 1,
    "teacher.grid_cell": 1,
}


@dataclass(frozen=True)
class RenamedKey:
    """A key of older configs and the key that replaced it; ``swapped``: its (w, h) pair is now (h, w)."""

    new: str
    swapped: bool


# Keys renamed so that names say what they are and every size is (h, w). A config a user writes with
# an old key is refused (one line naming the new key): silently reading a (w, h) pair as (h, w)
# would train on transposed images. A run's own saved config is translated (``upgrade_saved_config``).
RENAMED_KEYS = {
    "data.resize": RenamedKey("data.scale_size", swapped=True),
    "teacher.patch_size": RenamedKey("teacher.grid_cell", swapped=False),
}


def _is_pair(value) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2


def renamed_key_message(old: str, value, source: str) -> str:
    """The one line that refuses the old key ``old`` (set to ``value``) and says what to write instead."""
    renamed = RENAMED_KEYS[old]
    if not renamed.swapped:
        return (f"{source}: {old} was renamed {renamed.new} (same value, no order change); "
                f"set {renamed.new} to {value!r} instead")
    advice = (f"set {renamed.new} to {[value[1], value[0]]!r} instead of {old} {list(value)!r}" if _is_pair(value)
              else f"set {renamed.new} to [height, width] instead")
    return f"{source}: {old} (w, h) was renamed {renamed.new}, which is (h, w): {advice}"


def upgrade_saved_config(data: dict, source: str = "saved config") -> dict:
    """A config saved by an older carbseg (a run's ``config.yaml``, a model's embedded config) with its
    renamed keys under their new names, pairs reordered to (h, w): the exact same settings.

    Only for configs carbseg wrote itself; a config a user writes gets the one-line refusal instead.
    """
    if not isinstance(data, dict):
        return data
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    for old, renamed in RENAMED_KEYS.items():
        section, key = old.split(".")
        node = out.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        new_key = renamed.new.split(".")[1]
        if new_key in node:
            raise UserError(f"{source}: holds both {old} and {renamed.new}; keep only {renamed.new}")
        value = node.pop(key)
        node[new_key] = [value[1], value[0]] if renamed.swapped and _is_pair(value) else value
    return out


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
        if key not in names and dotted in RENAMED_KEYS:
            raise UserError(renamed_key_message(dotted, value, source))
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


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found; see configs/ for examples") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def _with_overrides(data, overrides: Sequence[str] | None, source: str) -> Config:
    if overrides:
        if not isinstance(data, dict):  # refused here with the file's name, not as a crash in _merge
            raise UserError(f"{source}: the config must be a mapping of sections, got {data!r}")
        data = _merge(data, parse_overrides(list(overrides)))
        source += " (with overrides)"
    return config_from_dict(data, source)


def load_config(path: str | Path | None, overrides: Sequence[str] | None = None) -> Config:
    """Load a YAML config (safely: no Python objects) and apply ``key=value`` overrides."""
    if path is None:
        return _with_overrides({}, overrides, "config")
    return _with_overrides(_read_yaml(path), overrides, str(path))


def config_from_yaml_text(text: str, overrides: Sequence[str] | None = None, source: str = "config") -> Config:
    """``load_config`` for YAML held as text (e.g. a config shipped inside the package); ``source``
    names it in errors."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
    return _with_overrides(data, overrides, source)


def load_saved_config(path: str | Path) -> Config:
    """A run's own saved ``config.yaml``, also one written before a key was renamed
    (``upgrade_saved_config``), so that such a run can still be resumed."""
    return config_from_dict(upgrade_saved_config(_read_yaml(path), str(path)), str(path))


def section_from_overrides(section: str, overrides: Sequence[str] = (), values: dict | None = None,
                           source: str = "overrides"):
    """One section of the config (e.g. ``teacher`` -> a ``TeacherConfig``) from ``key=value`` overrides
    of its keys, written with or without the ``section.`` prefix, the section's defaults elsewhere.

    ``values`` (key -> already typed value, e.g. from command-line flags) win over the overrides;
    both are checked exactly as ``carbseg train`` checks its config.
    """
    sections = [name for name, tp in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(tp)]
    prefixed = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. {section}.KEY=VALUE)")
        key = item.split("=", 1)[0].strip()
        head = key.split(".", 1)[0]
        if head in sections and head != section and "." in key:
            raise UserError(f"override {item!r}: only {section} settings apply here (e.g. {section}.KEY=VALUE "
                            "or KEY=VALUE)")
        prefixed.append(item if key.startswith(section + ".") else f"{section}.{item}")
    tree = parse_overrides(prefixed)
    tree.setdefault(section, {})
    if not isinstance(tree[section], dict):
        raise UserError(f"{source}: {section} must be a mapping of keys")
    tree[section].update({key: value for key, value in (values or {}).items()})
    return getattr(config_from_dict({section: tree[section]}, source), section)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
