"""Shared test fixtures. Real data lives in ../shared/data (beside the project root) and is optional."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import pytest
import tqdm

# On a CPU, precision "auto" is a timed probe's answer (carbseg.precision.cpu_choice): the suite pins
# it to fp32 so that its exact-value checks hold on every machine (CPU processes the tests start
# inherit this), and keeps any probe answer out of the user's cache. tests/test_precision.py unsets
# both to test the probe itself.
os.environ["CARBSEG_CPU_PRECISION"] = "fp32"
os.environ["CARBSEG_PRECISION_CACHE"] = os.path.join(tempfile.gettempdir(),
                                                     f"carbseg-tests-{os.getpid()}-precision.json")

# tqdm's lock, a per-process one: by default it includes a multiprocessing lock, shared by every process
# forked from this one. Mutation testing (docs/testing.md) forks the test process once per mutant and kills
# a child on timeout; a child killed inside a progress bar left that lock held, and every later child's
# progress bar waited forever.
tqdm.tqdm.set_lock(threading.RLock())

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests are skipped on machines without CUDA (they run in benchmarks/gpu_check.py)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def camvid_root() -> Path:
    root = SHARED_DATA / "camvid"
    if not (root / "val").is_dir():
        pytest.skip("real CamVid sample (../shared/data/camvid) not present")
    return root


@pytest.fixture
def cityscapes_sample_root() -> Path:
    root = SHARED_DATA / "cityscapes-sample"
    if not (root / "leftImg8bit").is_dir():
        pytest.skip("real Cityscapes sample (../shared/data/cityscapes-sample) not present")
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models on a small shared CPU run faster than with competing threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict:
    """A tiny open_clip ViT with random weights, as ``teacher.*`` settings (a teacher that sees only
    pixels; its masks mean nothing)."""
    import open_clip
    import torch

    from carbseg.teacher.tiny import TINY_VIT_CONFIG, write_tiny_config

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    torch.save(open_clip.model.CLIP(**TINY_VIT_CONFIG).state_dict(), folder / "tiny.bin")
    write_tiny_config(folder / "tiny.json")
    return {"kind": "clip", "clip_model": str(folder / "tiny.json"), "clip_pretrained": str(folder / "tiny.bin"),
            "text_templates": "single", "cache_dir": str(folder / "cache")}
