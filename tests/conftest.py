"""Shared test fixtures. Real data lives in ../shared/data (beside the project root) and is optional."""

from __future__ import annotations

from pathlib import Path

import pytest

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
