"""A training step that is not logged reads nothing back from the device.

Every ``.item()``, ``float()`` or ``bool()`` of a tensor is ``aten::_local_scalar_dense``: on a GPU the
host waits there until the device has finished everything queued before it, so the CPU cannot run
ahead and queue the next kernels (the step's launch latency is no longer hidden). On a CPU the same
op shows where such a wait would be. The NaN/Inf guard's decision, the CARB loss queue and the
logged terms stay on the device and are read at the logged iterations only. On a GPU (marker
``gpu``) CUDA's own check (``torch.cuda.set_sync_debug_mode("error")``) guards the same iterations,
and ``train.ddp: always`` runs NCCL and SyncBN on the one GPU.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from carbseg.data.synthetic import generate_synthetic_dataset
from carbseg.engine.train import Trainer
from carbseg.engine.train_data import training_loader
from test_cuda_paths import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

HOST_READS = ("aten._local_scalar_dense", "aten.item")
#: Tensor methods that copy values to the host without such an op (``tolist`` reads the memory
#: directly; on a GPU each is a device-to-host copy the host waits for).
HOST_METHODS = ("tolist", "numpy", "cpu")
#: Host reads that are no device read on any machine: the GLV patch is drawn from a CPU generator.
CPU_BY_DESIGN = ("sample_local_patch",)


def _carbseg_frames() -> list[traceback.FrameSummary]:
    return [f for f in traceback.extract_stack() if "carbseg" in f.filename and "tests" not in f.filename]


class HostReads(TorchDispatchMode):
    """Records every op or method that copies a tensor's value to the host, with where it was called
    from (reads of CPU generator draws, ``CPU_BY_DESIGN``, excepted)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self._patched: list[tuple[str, object]] = []

    def _record(self, what: str) -> None:
        frames = _carbseg_frames()
        if frames and frames[-1].name in CPU_BY_DESIGN:
            return
        where = " <- ".join(f"{f.filename.split('src/')[-1]}:{f.lineno}" for f in reversed(frames[-3:]))
        self.reads.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(HOST_READS):
            self._record(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in HOST_METHODS:
            original = getattr(torch.Tensor, name)

            def recorded(tensor, *args, _name=name, _original=original, **kwargs):
                self._record(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            self._patched.append((name, original))
            setattr(torch.Tensor, name, recorded)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched:
            setattr(torch.Tensor, name, original)
        self._patched = []
        return super().__exit__(*exc)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_synthetic_dataset(root, "train", 4, 64, 128, seed=5, progress=False)
    return root


@pytest.mark.parametrize(("amp", "grad_accum"), [("off", 1), ("bf16", 2)])
def test_an_unlogged_iteration_reads_nothing_from_the_device(scenes, tiny_clip, tmp_path, amp, grad_accum):
    # The CLIP teacher online, GLV, adaptive CARB: iterations 0-1 warm-up, 2-4 after it.
    cfg = tiny_config(scenes, teacher=tiny_clip, train={"max_iters": 10, "warmup_iters": 2, "amp": amp,
                                                         "grad_accum": grad_accum, "log_interval": 100})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert trainer.teacher is not None and cfg.glv.enabled and cfg.carb.fixed_coefficient is None
    # What a GPU runs: a non-finite step undone on the device (a CPU reads its flag at once instead).
    trainer.undo_nonfinite_on_device = True
    batches = list(training_loader(trainer.samples, 0, 6, 0))
    for iteration in range(5):
        micro_batches = batches[iteration * grad_accum:(iteration + 1) * grad_accum]
        with HostReads() as recorder:
            assert trainer.train_iteration(micro_batches, iteration, log_terms=False) is None
        assert recorder.reads == [], f"iteration {iteration}: {recorder.reads}"
    assert [i for i, _ in trainer.nonfinite.pending] == [0, 1, 2, 3, 4]  # the NaN/Inf flags, not read yet
    # The queue holds the micro-steps after the warm-up, and a logged iteration reads its terms.
    assert len(trainer.objective.queue) == min(3 * grad_accum, 5)
    logged = trainer.train_iteration(batches[5 * grad_accum:6 * grad_accum], 5, log_terms=True)
    if grad_accum == 1:  # (with micro-batches the logged c is their mean)
        assert logged["c"] == pytest.approx(float(trainer.objective.queue.coefficient()))
    assert logged["nonfinite_skipped"] == 0.0 and logged["total"] > 0


def test_clip_statistics_are_made_once_per_device(tiny_clip, monkeypatch):
    from carbseg.data.classes import SYNTHETIC
    from carbseg.teacher.build import build_teacher
    from carbseg.teacher.clip_teacher import CLIP_MEAN, CLIP_STD

    teacher_cfg = tiny_config(Path("."), teacher=tiny_clip).teacher
    teacher = build_teacher(teacher_cfg, SYNTHETIC, "cpu", precision="fp32")
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0
    images = (mean + std).expand(2, 3, 4, 5).clone()  # one std above CLIP's mean colour: 1.0 everywhere
    torch.testing.assert_close(teacher._normalise(images), torch.ones(2, 3, 4, 5))
    # Once made for a device, a call builds nothing (on a GPU each build was a host-to-device copy).
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("statistics built again"))
    torch.testing.assert_close(teacher._normalise(images - std), torch.zeros(2, 3, 4, 5))


@pytest.mark.parametrize("reads_ground_truth", [False, True])
def test_frames_and_ground_truth_go_only_to_the_teacher_that_reads_them(scenes, reads_ground_truth):
    import numpy as np

    from carbseg.data.datasets import build_dataset
    from carbseg.data.frames import FrameMaps
    from carbseg.data.transforms import TrainAugmentation
    from carbseg.engine.step import batch_to_device, teacher_views
    from carbseg.engine.train_data import BatchKey, TrainingSamples, collate

    cfg = tiny_config(scenes)
    dataset = build_dataset("synthetic", str(scenes), "train")
    labels = np.ones((len(dataset), dataset.classes.num_classes), dtype=bool)
    samples = TrainingSamples(dataset, labels, TrainAugmentation(cfg.data), seed=0, batch_size=2,
                              read_gt=reads_ground_truth)
    batch = batch_to_device(collate([samples[BatchKey(0, 0, s)] for s in range(2)]), torch.device("cpu"))
    assert ("masks" in batch) == reads_ground_truth  # CLIP's batches carry no all-ignore mask
    seen = []

    class Recording:
        def __init__(self):
            self.reads_ground_truth = reads_ground_truth

        def __call__(self, images, image_labels, gt=None, valid=None, frames=None):
            seen.append((gt, frames))
            return torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.long)

    teacher_views(Recording(), batch, cfg, torch.Generator().manual_seed(0), single_path=False)
    assert len(seen) == 2  # the global view and the GLV patch
    for gt, frames in seen:
        if reads_ground_truth:  # the simulated teacher: ground truth and frame maps of each view
            assert gt is not None and gt.dtype == torch.long and isinstance(frames, FrameMaps)
        else:
            assert gt is None and frames is None


# ---------------------------------------------------------------- on a real GPU (marker gpu)
@pytest.mark.gpu
def test_unlogged_iterations_on_a_gpu_never_synchronise(scenes, tiny_clip, tmp_path):
    """CUDA's own sync check: any device-to-host wait in an unlogged iteration raises."""
    # A fixed GLV zoom (scale_rate 0): no new shapes after the first iteration, so cuDNN's autotuner
    # has nothing left to time inside the checked iterations.
    cfg = tiny_config(scenes, device="cuda", teacher=tiny_clip,
                      glv={"scale_offset": 1.5, "scale_rate": 0.0},
                      train={"max_iters": 10, "warmup_iters": 3, "log_interval": 100})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert trainer.undo_nonfinite_on_device and torch.backends.cudnn.benchmark
    batches = list(training_loader(trainer.samples, 0, 6, 0))
    trainer.train_iteration([batches[0]], 0, log_terms=False)  # first shapes: allocations, autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for iteration in range(1, 6):  # 1-2 in the warm-up, 3-5 after it (adaptive c, queue on the GPU)
            assert trainer.train_iteration([batches[iteration]], iteration, log_terms=False) is None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(trainer.objective.queue) == 3 and trainer.nonfinite.flush() == []


@pytest.mark.gpu
def test_ddp_always_on_one_gpu_runs_nccl_and_syncbn(scenes, tmp_path, monkeypatch):
    from torch.nn.parallel import DistributedDataParallel

    from carbseg import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    cfg = tiny_config(scenes, device="cuda", train={"ddp": "always", "max_iters": 2})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    try:
        assert torch.distributed.get_backend() == "nccl" and distributed.world_size() == 1
        assert isinstance(trainer.ddp, DistributedDataParallel)
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules())
        trainer.run(2)
        state = trainer.state_dict()
        assert state["iteration"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                              if v.is_floating_point())
    finally:
        distributed.shutdown()
