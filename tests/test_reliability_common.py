"""Helpers of the reliability tests (test_reliability_*.py): tiny data, tiny models, and the error contract.

The contract checked everywhere: exit status 2, exactly one ``carbseg COMMAND: error: ...`` line on
stderr that names the file or key, no traceback, and no half-written output.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import yaml

from carbseg.config import Config, ModelConfig
from carbseg.data.classes import SYNTHETIC
from carbseg.data.synthetic import generate_synthetic_dataset
from carbseg.engine.checkpoint import save_model
from carbseg.models.segmenter import build_segmenter

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[")


def make_scenes(root: Path, train: int = 4, val: int = 2, size=(32, 64)) -> Path:
    generate_synthetic_dataset(root, "train", train, *size, seed=1, progress=False)
    generate_synthetic_dataset(root, "val", val, *size, seed=1, progress=False)
    return root


def make_checkpoint(path: Path, classes=SYNTHETIC) -> Path:
    cfg = Config(name="reliability")
    cfg.model = ModelConfig(backbone="tiny", pretrained="none", classifier="learned", head_channels=16,
                            aspp_dilations=[1, 2])
    torch.manual_seed(0)
    model = build_segmenter(cfg.model, classes.num_classes, load_pretrained=False)
    with torch.no_grad():  # spread the random classifier so that several classes win somewhere
        model.classifier.weight.mul_(20.0)
    return save_model(path, model, cfg, classes)


def tiny_train_config(path: Path, root: Path, **sections) -> Path:
    """A tiny CPU training config (simulated teacher, tiny backbone) with ``sections`` merged in."""
    cfg = {
        "name": "tiny", "seed": 7, "device": "cpu",
        "data": {"dataset": "synthetic", "root": str(root), "crop_size": [32, 64], "scale_size": [32, 64],
                 "ratio_range": [1.0, 1.5], "batch_size": 2, "num_workers": 0},
        "teacher": {"kind": "simulated", "grid_cell": 8, "noise": 0.3},
        "model": {"backbone": "tiny", "pretrained": "none", "classifier": "learned", "head_channels": 16,
                  "aspp_dilations": [1, 2]},
        "glv": {"patch_size": [16, 32]},
        "train": {"max_iters": 10, "warmup_iters": 2, "lr": 0.01, "eval_interval": 0, "log_interval": 1,
                  "checkpoint_interval": 100},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(cfg))
    return path


def error_line(err: str, command: str, *fragments: str) -> str:
    """Check the error contract on captured stderr and return the error line.

    Allowed besides the one error line: progress bars and log records (INFO/WARNING lines).
    """
    assert "Traceback" not in err, err
    lines = [seg.strip() for line in err.splitlines() for seg in line.split("\r") if seg.strip()]
    errors = [line for line in lines if line.startswith(f"carbseg {command}: error: ")]
    assert len(errors) == 1, err
    others = [line for line in lines if line not in errors and not _PROGRESS.search(line)
              and not line.startswith(("INFO ", "WARNING "))]
    assert others == [], others
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def all_files(root: Path) -> list[str]:
    """Every file below ``root`` (hidden ones included), relative, sorted."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def temporaries(root: Path) -> list[str]:
    return [name for name in all_files(root) if ".tmp" in os.path.basename(name)]


def png_bytes_equal(a: Path, b: Path) -> bool:
    from PIL import Image

    return np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
