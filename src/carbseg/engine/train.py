"""The training loop of the method: teacher in the loop, Global-Local View (GLV) and CARB.

One iteration, read like the paper:

1. an augmented global batch (images 0..255, validity of each pixel, image-level labels);
2. the teacher labels the global view (dual path), or the offline pseudo-masks, augmented jointly
   with the image, are the labels (single path, ``data.pseudo_masks``);
3. GLV: one local patch per step at a random position; the images are zoomed by s ~ U[offset,
   offset + rate), the teacher labels the zoomed patch, and its labels are resized back to the
   patch size (single path: the pseudo-mask is simply cut out, there is no teacher to zoom for);
4. the segmenter runs on the global batch only; its logits are cut out at the patch region;
5. CARB: plain cross-entropy during the warm-up (``train.warmup_iters``); afterwards the
   consistent / inconsistent split (teacher vs the segmenter's own label-restricted prediction),
   the inconsistent part scaled by the adaptive (or fixed) coefficient c;
6. backward, SGD step with the poly learning rate.

Everything random is a function of (seed, iteration, rank) -- data order, augmentation, the patch,
and the global torch generator, reseeded every iteration -- and everything stateful (weights,
optimizer, CARB loss queues, AMP scaler) is in ``checkpoint_last.pt``, so a run stopped at N and
resumed gives, on CPU, bit-identical weights to a run that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from carbseg import distributed as dist
from carbseg.config import Config, dump_config
from carbseg.console import show_progress
from carbseg.data.classes import ClassSet
from carbseg.devices import process_device
from carbseg.engine.guards import NonFiniteGuard
from carbseg.engine.run_dir import RunDir, warn_config_changes
from carbseg.engine.schedule import set_poly_lr
from carbseg.engine.seeds import derive_seed, numpy_rng_state, set_numpy_rng_state
from carbseg.engine.signals import StopSignal, TrainingInterrupted
from carbseg.engine.step import batch_to_device, training_step
from carbseg.engine.train_data import TrainingSamples, training_loader
from carbseg.errors import UserError
from carbseg.io import write_error, write_text_atomic
from carbseg.precision import (
    PrecisionChoice,
    precision_before_the_probe,
    recorded_precision,
    training_precision,
)

log = logging.getLogger(__name__)


def _agreed_precision(choices: dict[str, PrecisionChoice | None],
                      device: torch.device) -> dict[str, PrecisionChoice | None]:
    """Rank 0's precision choices on every process: each CPU process probes on its own, and processes
    that trained one model at different precisions would not compute one run (on GPUs the choice
    follows the device's capability, the same on every rank)."""
    if not dist.is_distributed() or device.type != "cpu":
        return choices
    shared = [choices]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


# ---------------------------------------------------------------- building the pieces
def _image_labels(cfg: Config, dataset) -> np.ndarray:
    """(N, C) bool image-level labels, the only supervision: from data.labels or derived from GT."""
    from carbseg.data.labels import compute_image_labels, labels_to_multi_hot, read_labels_json

    classes = dataset.classes
    if cfg.data.labels:
        labels = read_labels_json(cfg.data.labels, classes)
        missing = [i for i in dataset.ids if i not in labels]
        if missing:
            raise UserError(
                f"{cfg.data.labels}: no image-level labels for {len(missing)} training images "
                f"(first: {missing[0]}); regenerate it with carbseg labels for this split"
            )
    else:
        labels = compute_image_labels(dataset, min_pixels=1)
    return labels_to_multi_hot([labels[i] for i in dataset.ids], classes.num_classes).numpy()


def _without_proxy_fit_set(dataset, proxy_weights: str):
    """The training split less the images the proxy teacher was fitted on (their GT was used)."""
    from carbseg.data.base import WithoutIds
    from carbseg.teacher.proxy import read_fit_ids

    reduced = WithoutIds(dataset, read_fit_ids(proxy_weights))
    if reduced.excluded:
        log.warning("proxy teacher: its %d fit images are left out of training (%d images remain)",
                    len(reduced.excluded), len(reduced))
    return reduced


class TrainingInputs(NamedTuple):
    """What one process trains on: the training split, the online teacher (None in the single path)
    and the sample stream (augmented views with their image-level labels, keyed by iteration)."""

    train_set: object
    teacher: object | None
    samples: TrainingSamples


def build_training_inputs(cfg: Config, device: torch.device, teacher_precision: str = "auto",
                          rank: int = 0, world: int = 1) -> TrainingInputs:
    """The training split with its image-level labels (the only supervision), the teacher and the
    sample stream, exactly as ``carbseg train`` builds them (``studies/camvid/diagnose.py`` replays a
    run's own batches through this)."""
    from carbseg.data.datasets import build_dataset
    from carbseg.data.transforms import TrainAugmentation

    train_set = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.train_split, classes_file=cfg.data.classes)
    if cfg.teacher.kind == "proxy" and cfg.teacher.proxy_weights:
        train_set = _without_proxy_fit_set(train_set, cfg.teacher.proxy_weights)
    image_labels = _image_labels(cfg, train_set)

    # Teacher: online in the dual path; none in the single path (pseudo-masks come from disk).
    teacher = None
    if not cfg.data.pseudo_masks:
        from carbseg.teacher.build import build_teacher

        # The teacher's precision is its own, as in `carbseg pseudo-masks` (default auto: bf16 CLIP
        # blocks on GPUs with native bf16 and on CPUs where the probe measured bf16 faster, fp32
        # elsewhere), never train.amp's: the online masks then equal the offline ones.
        teacher = build_teacher(cfg.teacher, train_set.classes, device, seed=cfg.seed, precision=teacher_precision)
    read_gt = bool(teacher is not None and teacher.reads_ground_truth)
    if read_gt:
        log.warning("teacher.kind = simulated reads ground truth: a research instrument, not weak supervision")
    samples = TrainingSamples(
        train_set, image_labels, TrainAugmentation(cfg.data), seed=cfg.seed,
        batch_size=cfg.data.batch_size, grad_accum=cfg.train.grad_accum, rank=rank, world=world,
        read_gt=read_gt, pseudo_masks=cfg.data.pseudo_masks,
        cache_bytes=cfg.data.cache_mib * 2**20 // max(cfg.data.num_workers, 1),  # the budget is for all workers
    )
    return TrainingInputs(train_set, teacher, samples)


def build_model(cfg: Config, classes: ClassSet, device: torch.device, load_pretrained: bool = True,
                class_embeddings: torch.Tensor | None = None):
    """The segmenter; with the text classifier, the frozen CLIP class embeddings (given, e.g. the
    online teacher's own, or computed from ``cfg.teacher``'s CLIP model)."""
    from carbseg.models.segmenter import build_segmenter

    if cfg.model.classifier == "text" and class_embeddings is None:
        from carbseg.teacher.build import class_text_embeddings

        class_embeddings = class_text_embeddings(
            classes, cfg.teacher.clip_model, cfg.teacher.clip_pretrained, device,
            cache_dir=cfg.teacher.cache_dir, templates=cfg.teacher.text_templates,
        )
    return build_segmenter(cfg.model, classes.num_classes, class_embeddings=class_embeddings,
                           load_pretrained=load_pretrained)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.SGD:
    if hasattr(model, "param_groups"):
        groups = model.param_groups(cfg.train.lr)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.train.lr}]
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum,
                           weight_decay=cfg.train.weight_decay)


# ---------------------------------------------------------------- the trainer
class Trainer:
    """Holds the pieces of one run; ``run()`` trains from ``self.iteration`` to ``stop``."""

    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True):
        from carbseg.data.datasets import build_dataset
        from carbseg.losses.carb import CARBObjective

        self.cfg = cfg
        self.run_dir = RunDir(Path(out_dir))
        self.progress = progress
        self.device = process_device(cfg.device, option="device =")
        dist.init_from_env(self.device, mode=cfg.train.ddp)
        self.rank, self.world = dist.rank(), dist.world_size()
        # train.ddp = always: DDP (and SyncBN on GPUs) also in a group of one process.
        self.uses_ddp = dist.is_distributed() and (self.world > 1 or cfg.train.ddp == "always")
        self.is_main = dist.is_main_process()
        resume = self.run_dir.check(resume)  # every rank checks before rank 0 writes anything
        dist.barrier(self.device)
        self.single_path = bool(cfg.data.pseudo_masks)
        self._resumed_state = None  # read once: its precision entry now, the rest by load_state()
        if resume:
            from carbseg.engine.checkpoint import load_training_state

            self._resumed_state = load_training_state(self.run_dir.checkpoint)
        # train.amp = auto (and the CLIP teacher's auto) on a CPU is a timed probe's answer; a resumed
        # run keeps the answer its checkpoint recorded, so it computes as the run that never stopped.
        saved = None
        if self._resumed_state is not None:
            saved = self._resumed_state.get("precision", precision_before_the_probe())
        self.precision = _agreed_precision(training_precision(
            cfg.train.amp, self.device, clip_teacher=not self.single_path and cfg.teacher.kind == "clip",
            saved=saved), self.device)
        self.amp = self.precision["model"].autocast_dtype

        # Data, teacher and the training sample stream: the same pieces the study diagnostics rebuild.
        teacher_choice = self.precision["teacher"]
        inputs = build_training_inputs(cfg, self.device, teacher_choice.name if teacher_choice else "auto",
                                       rank=self.rank, world=self.world)
        self.train_set, self.teacher, self.samples = inputs.train_set, inputs.teacher, inputs.samples
        self.classes = self.train_set.classes

        # Model: the same initial weights on every rank (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.seed)
        # The CLIP teacher already holds the class text embeddings the text classifier is made of.
        teacher_embeddings = getattr(self.teacher, "text_embeddings", None)
        model = build_model(cfg, self.classes, self.device,
                            class_embeddings=None if teacher_embeddings is None else teacher_embeddings.cpu())
        if self.uses_ddp and self.device.type == "cuda":
            # SyncBN only when distributed (the release required it even on one GPU); PyTorch's
            # SyncBN is CUDA-only, so CPU (gloo) runs keep per-process BN statistics. timm's
            # converter keeps the activation inside BatchNormAct2d (EfficientNet-Lite0's ReLU6).
            from carbseg.models.segmenter import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)
        model.to(self.device)  # channels-last on every device (Segmenter.use_memory_format)
        self.model = model
        self.ddp = None
        if self.uses_ddp:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.collective_device(self.device).index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
            )
        self.optimizer = build_optimizer(model, cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.objective = CARBObjective.from_config(cfg.carb, cfg.train.warmup_iters)
        self.nonfinite = NonFiniteGuard()
        self.iteration = 0

        self.val_set = None
        if cfg.train.eval_interval > 0:
            self.val_set = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.val_split,
                                         classes_file=cfg.data.classes)
            if not self.val_set.has_masks:
                log.warning("data.val_split %r has no ground truth: no validation mIoU", cfg.data.val_split)
                self.val_set = None
        if resume:
            if self.run_dir.config.is_file():
                warn_config_changes(self.run_dir.config, cfg)
            self.load_state()
            if self.is_main:
                self.run_dir.discard_after(self.iteration)
        elif self.is_main:
            self.run_dir.clear_leftovers()
        # Written only once everything could be built, so a failed start leaves the folder reusable.
        if self.is_main:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir.config, dump_config(cfg))
        self.writer = None

    def setup_line(self, stop: int) -> str:
        """What this run uses, said once at the start: device, precision and why, threads, processes,
        and where the iterations start (a resumed run names the checkpoint's iteration)."""
        model = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(self.amp, "fp32")
        teacher = self.precision["teacher"]
        teacher_part = f", teacher {teacher.name}" if teacher is not None else ""
        why = f" ({self.precision['model'].reason}" + (f"; teacher: {teacher.reason}" if teacher else "") + ")"
        where = (f"resumed at iteration {self.iteration} from {self.run_dir.checkpoint}" if self.iteration
                 else "from iteration 0")
        return (f"training on {self.device} with {torch.get_num_threads()} CPU threads, "
                f"{self.world} process{'es' if self.world > 1 else ''}{' (DDP)' if self.uses_ddp else ''}; precision: model {model}{teacher_part}{why}; "
                f"{where} to {stop}")

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = {
            "iteration": self.iteration,  # the next iteration to run
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss_queue": self.objective.state_dict(),  # the CARB objective's running state: its queue
            "nonfinite": self.nonfinite.state_dict(),
            "scaler": self.scaler.state_dict(),
            # No CUDA generator state: every iteration reseeds all generators from (seed, iteration,
            # rank), so it is not needed, and restoring it would tie a resume to the number of GPUs.
            "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state()},
            "config": dump_config(self.cfg),
            # What train.amp = auto and the teacher's auto chose (a CPU probe's answer): kept on --resume.
            "precision": recorded_precision(self.precision, self.device),
        }
        return state

    def load_state(self) -> None:
        from carbseg.engine.checkpoint import load_training_state

        state, self._resumed_state = self._resumed_state, None
        if state is None:
            state = load_training_state(self.run_dir.checkpoint)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.objective.load_state_dict(state["loss_queue"])
            self.nonfinite.load_state_dict(state.get("nonfinite", {}))
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.iteration = int(state["iteration"])
            torch.set_rng_state(state["rng"]["torch"])
            set_numpy_rng_state(state["rng"]["numpy"])  # a "cuda" entry of older checkpoints is ignored
        except (KeyError, RuntimeError, ValueError) as err:
            raise UserError(
                f"{self.run_dir.checkpoint}: does not match this config's model or optimizer "
                f"({str(err).splitlines()[0]}); resume with the run's own config.yaml"
            ) from None

    def save_checkpoint(self) -> Path:
        from carbseg.engine.checkpoint import save_training_state

        if self.is_main:
            save_training_state(self.run_dir.checkpoint, self.state_dict())
        dist.barrier(self.device)
        return self.run_dir.checkpoint

    def save_model(self) -> Path:
        from carbseg.engine.checkpoint import save_model

        if self.is_main:
            save_model(self.run_dir.model, self.model, self.cfg, self.classes)
        dist.barrier(self.device)
        return self.run_dir.model

    # ---------------------------------------------------------------- step
    def micro_step(self, batch: dict, iteration: int, micro: int, last_micro: bool,
                   log_terms: bool = True) -> dict[str, float] | None:
        """Forward, CARB loss and backward of one micro-batch; None when the loss is NaN/Inf on any rank.
        ``log_terms=False``: this iteration's terms are not logged (a warm-up step may skip its regions)."""
        cfg = self.cfg
        batch = batch_to_device(batch, self.device)
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, iteration, micro, self.rank, 1))
        net = self.ddp if self.ddp is not None else self.model
        sync = contextlib.nullcontext() if (self.ddp is None or last_micro) else self.ddp.no_sync()
        with sync:
            out = training_step(net, self.teacher, batch, cfg, generator, iteration=iteration,
                                objective=self.objective, single_path=self.single_path, amp=self.amp,
                                log_terms=log_terms)
            if out is None:
                return None
            self.scaler.scale(out.total / cfg.train.grad_accum).backward()
        return out.scalars()

    def train_iteration(self, batches: list[dict], iteration: int, log_terms: bool = True) -> dict[str, float]:
        cfg = self.cfg
        # Anything that draws from the global generators (dropout, a stochastic teacher) draws the
        # same numbers at this iteration whether or not the run was resumed.
        torch.manual_seed(derive_seed(cfg.seed, iteration, self.rank, 0))
        lr = set_poly_lr(self.optimizer, iteration, cfg.train.max_iters, cfg.train.poly_power, cfg.train.min_lr)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro, batch in enumerate(batches):
            values = self.micro_step(batch, iteration, micro, last_micro=micro == len(batches) - 1,
                                     log_terms=log_terms)
            if values is None:
                break
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / len(batches)
        skipped = values is None
        self.nonfinite.record(skipped, iteration)  # raises DivergedError after too many in a row
        if skipped:
            # Skip the update: the gradients of earlier micro-batches are dropped with it.
            self.optimizer.zero_grad(set_to_none=True)
            totals = {"total": float("nan"), "c": float("nan")}
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        totals["nonfinite_skipped"] = float(self.nonfinite.skipped)
        totals["lr"] = lr
        return totals

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float | None] | None:
        """Validation scores (percent) on the ground truth, sharded over processes.

        Returns ``{"val_miou": ..., "val_iou.<class>": ...}`` (a class absent from both prediction
        and ground truth is ``None``): per-class IoU is logged because GLV's claim is about the
        small classes, which the mean hides.

        The evaluation of ``carbseg evaluate --checkpoint`` (``evaluate_checkpoint``: ``eval.mode``,
        ``eval.scales``, ``eval.flip``, ``eval.batch_size``, inference precision), on the first
        ``train.val_max_images`` images, each process scoring its share.
        """
        from carbseg.data.base import Subset
        from carbseg.engine.checkpoint import LoadedModel
        from carbseg.engine.inference import evaluate_checkpoint

        if self.val_set is None:
            return None
        count = len(self.val_set)
        if self.cfg.train.val_max_images is not None:
            count = min(count, self.cfg.train.val_max_images)
        shard = Subset(self.val_set, dist.shard(list(range(count))))
        try:
            confusion, _, _ = evaluate_checkpoint(shard, LoadedModel(self.model, self.cfg, self.classes),
                                                  device=self.device, progress=False, keep_samples=0)
        finally:
            self.model.train()
        confusion.reduce_(self.device)
        report = confusion.report(self.classes.names)
        return {"val_miou": report["miou"],
                **{f"val_iou.{name}": value for name, value in report["iou"].items()}}

    # ---------------------------------------------------------------- logging
    def log_scalars(self, iteration: int, values: dict[str, float]) -> None:
        if not self.is_main:
            return
        # A full disk or a vanished folder stops the run with one line naming the file (a torn last
        # line of log.jsonl is dropped on --resume); the last checkpoint stays the place to resume from.
        record = {"iteration": iteration, **{k: _json_number(v) for k, v in values.items()}}
        try:
            with open(self.run_dir.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise write_error(self.run_dir.log, err) from None
        try:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir.tensorboard))
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(_tensorboard_tag(key), value, iteration)
            self.writer.flush()
        except OSError as err:
            raise write_error(self.run_dir.tensorboard, err) from None

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if not dist.is_distributed():
            return values
        keys = sorted(values)
        packed = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                              device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce_mean_(packed)
        return dict(zip(keys, packed.tolist()))

    # ---------------------------------------------------------------- loop
    def run(self, stop: int) -> Path:
        cfg = self.cfg
        start = self.iteration
        loader = training_loader(self.samples, start, stop, cfg.data.num_workers)
        bar = tqdm(total=stop, initial=start, desc="train", unit="it", dynamic_ncols=True,
                   disable=not show_progress(self.progress and self.is_main))
        batches: list[dict] = []
        started = time.perf_counter()
        with StopSignal() as stop_signal, _event_writer_errors_reported_here():
            try:
                for batch in loader:
                    batches.append(batch)
                    if len(batches) < cfg.train.grad_accum:
                        continue
                    iteration = self.iteration
                    done = iteration + 1
                    evaluate_now = cfg.train.eval_interval > 0 and (
                        done % cfg.train.eval_interval == 0 or done == stop)
                    log_now = done % max(cfg.train.log_interval, 1) == 0 or done == stop or evaluate_now
                    values = self.train_iteration(batches, iteration, log_terms=log_now)
                    batches = []
                    self.iteration = done
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['total']:.3f}", c=f"{values['c']:.2f}")
                    if log_now:
                        values = self._mean_over_ranks(values)
                        values["epoch"] = float(self.samples.epoch_of(iteration))
                        values["iters_per_s"] = (done - start) / max(time.perf_counter() - started, 1e-9)
                        if evaluate_now:
                            values.update(self.evaluate() or {"val_miou": None})
                            if values["val_miou"] is not None:
                                log.info("iteration %d: val mIoU %.1f", done, values["val_miou"])
                        self.log_scalars(done, values)
                    if done % max(cfg.train.checkpoint_interval, 1) == 0 and done != stop:
                        self.save_checkpoint()
                    signum = stop_signal.any_rank_stopped(self.device)
                    if signum is not None and done != stop:
                        checkpoint = self.save_checkpoint()
                        raise TrainingInterrupted(done, checkpoint, signum)
            finally:
                bar.close()
                if self.writer is not None:
                    # Every record was flushed when logged; a failing close (full disk) has been reported.
                    with contextlib.suppress(OSError):
                        self.writer.close()
                    self.writer = None
        self.save_checkpoint()
        return self.save_model()


@contextlib.contextmanager
def _event_writer_errors_reported_here():
    """TensorBoard writes events in a thread; an OSError there (a full disk) would print that thread's
    traceback. It is re-raised on the main thread by the next flush, and reported from there as one line."""
    previous = threading.excepthook

    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _json_number(value):
    if value is None:
        return None
    return value if math.isfinite(value) else None


def _tensorboard_tag(key: str) -> str:
    if key in ("lr", "epoch", "iters_per_s"):
        return f"train/{key}"
    if key.startswith("val"):
        return f"val/{key[4:] or key}"
    if key.endswith("_pixels") or key in ("c", "consistent_share", "warmup"):
        return f"carb/{key}"
    return f"loss/{key}"


# ---------------------------------------------------------------- public entry point
def train(cfg: Config, out_dir: str | Path, max_iters: int | None = None, resume: bool = False,
          progress: bool = True) -> Path:
    """Train the segmenter with GLV and CARB; returns the path of the final ``model.safetensors``.

    ``max_iters`` stops after that many iterations in total (the poly schedule still spans
    ``cfg.train.max_iters``, so a run can be continued later with ``resume=True``). On SIGTERM or
    SIGINT the current step is finished, ``checkpoint_last.pt`` written, and ``TrainingInterrupted`` raised.
    """
    stop = cfg.train.max_iters if max_iters is None else max_iters
    if stop <= 0:
        raise UserError(f"--max-iters must be positive, got {stop}")
    if stop > cfg.train.max_iters:
        raise UserError(
            f"--max-iters {stop} exceeds train.max_iters {cfg.train.max_iters}, the end of the poly schedule; "
            f"raise train.max_iters={stop} instead"
        )
    if cfg.train.grad_accum < 1:
        raise UserError(f"train.grad_accum must be >= 1, got {cfg.train.grad_accum}")
    joined_here = not dist.is_distributed()  # leave a process group the caller made alone
    try:
        trainer = Trainer(cfg, out_dir, resume=resume, progress=progress)
        if trainer.is_main:
            log.info("%s", trainer.setup_line(stop))
        if trainer.iteration >= stop:
            log.warning("checkpoint is already at iteration %d >= %d: nothing to train", trainer.iteration, stop)
            return trainer.save_model()
        return trainer.run(stop)
    finally:
        if joined_here:
            dist.shutdown()

