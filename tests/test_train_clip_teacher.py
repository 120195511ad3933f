"""Training with the CLIP teacher in the loop (random tiny CLIP weights) and with DataLoader workers.

The online teacher's masks must equal what ``carbseg pseudo-masks`` makes of the same views (the
teacher at its own precision, whatever ``train.amp`` is), and a run with worker processes must
train exactly as one without them (every sample is a function of its key).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from carbseg.data.classes import SYNTHETIC
from carbseg.data.synthetic import generate_synthetic_dataset
from carbseg.engine import step as step_module
from carbseg.engine.train import train
from carbseg.teacher.build import build_teacher
from test_cuda_paths import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_synthetic_dataset(root, "train", 4, 64, 128, seed=3, progress=False)
    return root


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_online_teacher_masks_equal_the_offline_teacher_under_any_amp(scenes, tiny_clip, tmp_path, monkeypatch,
                                                                      amp):
    seen = []
    original = step_module.teacher_views

    def recording(teacher, batch, cfg, generator, single_path, **kwargs):
        out = original(teacher, batch, cfg, generator, single_path, **kwargs)
        seen.append((batch["images"].clone(), batch["image_labels"].clone(), batch["valid"].clone(),
                     out[0].clone()))
        return out

    monkeypatch.setattr(step_module, "teacher_views", recording)
    cfg = tiny_config(scenes, teacher=tiny_clip, train={"amp": amp, "max_iters": 2})
    assert train(cfg, tmp_path / "run", progress=False).is_file()
    assert len(seen) == 2
    # What `carbseg pseudo-masks` builds (its --precision default is auto) and calls, outside any autocast.
    offline = build_teacher(cfg.teacher, SYNTHETIC, "cpu", precision="auto")
    for images, labels, valid, online in seen:
        assert torch.equal(offline(images, labels, valid=valid), online)
        assert set(online.unique().tolist()) - {255} <= set(labels[0].nonzero().flatten().tolist()) | set(
            labels[1].nonzero().flatten().tolist())


def test_teacher_scores_stay_fp32_inside_a_callers_autocast(tiny_clip):
    cfg = tiny_config(Path("."), teacher=tiny_clip).teacher
    teacher = build_teacher(cfg, SYNTHETIC, "cpu", precision="fp32")
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0)) * 255
    plain = teacher.scores(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = teacher.scores(images)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)


def test_dataloader_workers_train_exactly_as_the_main_process(scenes, tmp_path):
    weights = {}
    for workers in (0, 2):
        cfg = tiny_config(scenes, data={"num_workers": workers}, train={"max_iters": 3})
        weights[workers] = load_file(train(cfg, tmp_path / f"w{workers}", progress=False))
    assert weights[0].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
