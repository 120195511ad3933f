"""A training run's folder: its file names, starting and resuming rules, and log pruning.

``carbseg train --out DIR`` writes, and nothing else reads or writes there:

- ``config.yaml``: the resolved config (every key, after overrides);
- ``checkpoint_last.pt``: the full training state (weights, optimizer, CARB loss queue, AMP scaler,
  RNG state, iteration) that ``--resume`` continues from;
- ``model.safetensors``: the final weights with the config and class set embedded;
- ``log.jsonl``: one JSON line per logged iteration; ``tb/``: the same scalars for TensorBoard.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from carbseg.config import Config, config_to_dict, load_saved_config
from carbseg.errors import UserError
from carbseg.io import remove_stale_temporaries, write_text_atomic

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "checkpoint_last.pt"
MODEL_FILE = "model.safetensors"
LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tb"


@dataclass
class RunDir:
    """The files of one training run, and the rules for starting, resuming and cleaning it."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def model(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    def discard_after(self, iteration: int) -> None:
        """Make the run directory agree with a checkpoint at ``iteration`` before resuming from it.

        A run killed with SIGKILL (no chance to checkpoint) logged iterations past its last
        checkpoint and may have left a temporary file mid-write; resuming redoes those iterations,
        so their log lines (and a torn last line) are dropped instead of appearing twice.
        """
        remove_stale_temporaries(self.path, [CONFIG_FILE, CHECKPOINT_FILE, MODEL_FILE])
        if not self.log.is_file():
            return
        kept = []
        for line in self.log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line torn by the kill: nothing after it was written either
            if record.get("iteration", 0) <= iteration:
                kept.append(line + "\n")
        write_text_atomic(self.log, "".join(kept))

    def records(self) -> list[dict]:
        """The records of ``log.jsonl``, one per logged iteration in ascending order.

        A run resumed from a checkpoint redoes the iterations after it; where an iteration was
        logged twice (a run killed before ``discard_after`` could drop its lines) the last record
        wins. A line torn by a kill ends the reading, as in ``discard_after``.
        """
        return read_log(self.log)

    def holds_no_training(self) -> bool:
        """A folder left by a run that stopped before its first checkpoint: only config.yaml, log.jsonl
        and TensorBoard events, nothing trained to lose, so it may be started again."""
        ours = {CONFIG_FILE, LOG_FILE, TENSORBOARD_DIR}
        return (self.path.is_dir() and self.config.is_file()
                and all(p.name in ours or p.name.startswith(".") for p in self.path.iterdir())
                and (not self.tensorboard.exists()
                     or all(p.name.startswith("events.out.tfevents.") for p in self.tensorboard.iterdir())))

    def check(self, resume: bool) -> bool:
        """Refuse to overwrite a run by accident, and to resume from nothing; returns whether to load
        the checkpoint (False when ``resume`` meets a run that never reached its first checkpoint)."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: is a file, not a run directory; choose another --out")
        if resume:
            if self.checkpoint.is_file():
                return True
            if self.holds_no_training():
                log.info("%s: the earlier run stopped before its first checkpoint; starting again from "
                         "iteration 0", self.path)
                return False
            raise UserError(
                f"{self.checkpoint}: no checkpoint to resume from; start without --resume "
                "(or point --out to the run directory of the run to continue)"
            )
        if self.path.exists() and any(self.path.iterdir()) and not self.holds_no_training():
            raise UserError(
                f"{self.path}: run directory is not empty; pass --resume to continue that run, "
                "or choose another --out"
            )
        return False

    def clear_leftovers(self) -> None:
        """Drop the log lines and TensorBoard events of a run that stopped before its first checkpoint."""
        self.log.unlink(missing_ok=True)
        if self.tensorboard.is_dir():
            for events in self.tensorboard.glob("events.out.tfevents.*"):
                events.unlink(missing_ok=True)


def read_log(path: str | Path) -> list[dict]:
    """The records of a run's ``log.jsonl`` (``RunDir.records``); an absent file has none."""
    path = Path(path)
    records: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line torn by a kill: nothing after it was written either
            records[int(record["iteration"])] = record
    return [records[i] for i in sorted(records)]


def warn_config_changes(saved: Path, cfg: Config) -> None:
    """Warn, naming each key, when a resumed run's config differs from the one it was started with
    (a ``config.yaml`` written before a key was renamed is read with the new name and order)."""
    before = config_to_dict(load_saved_config(saved))
    after = config_to_dict(cfg)
    changed = [
        f"{section}.{key}" if isinstance(after[section], dict) else section
        for section in after
        for key in (after[section] if isinstance(after[section], dict) else [None])
        if (before[section].get(key) if key is not None else before[section])
        != (after[section][key] if key is not None else after[section])
    ]
    if changed:
        log.warning("resuming with a config that differs from %s in: %s", saved, ", ".join(changed))
