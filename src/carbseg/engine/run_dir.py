"""A training run's folder: its file names, starting and resuming rules, and log pruning.

``carbseg train --out DIR`` writes, and nothing else reads or writes there:

- ``config.yaml``: the resolved config (every key, after overrides);
- ``checkpoint_last.pt``: the full training state (weights, optimizer, CARB loss queue, AMP scaler,
  RNG state, iteration) that ``--resume`` continues from;
- ``model.safetensors``: the final weights with the config and class set embedded;
- ``log.jsonl``: one JSON line per logged iteration; ``tb/``: the same scalars for TensorBoard;
- ``.carbseg.lock`` while a run writes there (``FolderLock``; ``pseudo-masks --out`` and ``demo --out``
  take the same lock on their folders).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from carbseg.config import Config, config_to_dict, load_saved_config
from carbseg.errors import UserError
from carbseg.io import check_output_dir, remove_stale_temporaries, write_error, write_text_atomic

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "checkpoint_last.pt"
MODEL_FILE = "model.safetensors"
LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tb"
LOCK_FILE = ".carbseg.lock"


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
        if self.path.exists() and any(p.name != LOCK_FILE for p in self.path.iterdir()) \
                and not self.holds_no_training():
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


# ---------------------------------------------------------------- one process per output folder
class FolderLock:
    """``DIR/.carbseg.lock``: the one process that writes ``DIR`` (a run, pseudo-masks, a demo).

    Two processes writing one folder would interleave their outputs (one ``log.jsonl`` holding every
    iteration twice, two TensorBoard event files), so the second is refused with one line naming the
    holder. The lock file holds the holder's pid, host, start time and command; it is published
    complete with a hard link (atomic, and refused when the name exists), so no reader sees it half
    written. A lock whose holder no longer runs (``kill -9``, a power loss; only decidable for a holder
    on this host) is taken over with a warning. Under torchrun only rank 0 takes it (``takes_lock``).
    """

    def __init__(self, folder: str | os.PathLike, command: str, option: str = "--out", what: str = "folder"):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_FILE
        self.command = command
        self.option = option
        self.record: dict | None = None
        self._created_folder = False

    def acquire(self) -> FolderLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.folder}: is a file, not a {self.what}; choose another {self.option}")
        check_output_dir(self.folder, self.option)  # nor below a file
        self._created_folder = not self.folder.exists()
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": self.command}
        text = json.dumps(record) + "\n"
        for _ in range(10):  # another process may take the lock over between two tries
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                published = self._publish(text)
            except OSError as err:
                raise write_error(self.path, err) from None
            if published:
                self.record = record
                self._remove_dead_leftovers()
                return self
            holder_text = self._read()
            if holder_text is None:
                continue  # released meanwhile
            holder = _parse_lock(holder_text)
            if holder is not None and not _is_stale(holder):
                self._release_folder()
                raise UserError(
                    f"{self.folder}: in use by carbseg {holder.get('command', '?')} (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('started')}); wait for it to end or choose another "
                    f"{self.option}" + ("" if holder.get("host") == socket.gethostname() else
                                        f" (if that process is gone, delete {self.path})"))
            if self._take_over(holder_text):
                log.warning("%s: taking over the lock of carbseg %s (pid %s on %s, since %s), which no longer "
                            "runs", self.folder, (holder or {}).get("command", "?"), (holder or {}).get("pid"),
                            (holder or {}).get("host"), (holder or {}).get("started"))
        self._release_folder()
        raise UserError(f"{self.path}: could not take the folder's lock (other processes keep taking it); "
                        f"choose another {self.option}")

    def release(self) -> None:
        """Remove the lock if it is still this process's, and the folder if acquiring made it and it stayed empty."""
        if self.record is None:
            return
        text = self._read()
        if text is not None and _parse_lock(text) == self.record:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.record = None
        self._release_folder()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _release_folder(self) -> None:
        if self._created_folder:
            with contextlib.suppress(OSError):  # not empty (outputs were written), or gone
                self.folder.rmdir()

    def _publish(self, text: str) -> bool:
        tmp = self.folder / f"{LOCK_FILE}.{os.getpid()}.{time.monotonic_ns()}"
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _remove_dead_leftovers(self) -> None:
        """Files ``_publish`` and ``_take_over`` of a process killed mid-way left (their names hold its pid)."""
        for leftover in self.folder.glob(f"{LOCK_FILE}.*"):
            pid = leftover.name[len(LOCK_FILE) + 1:].removeprefix("stale.").split(".")[0]
            if pid.isdigit() and _is_stale({"host": socket.gethostname(), "pid": int(pid)}):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def _read(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def _take_over(self, stale_text: str) -> bool:
        """Move the stale lock aside; if another process replaced it meanwhile, put that one back."""
        aside = self.folder / f"{LOCK_FILE}.stale.{os.getpid()}.{time.monotonic_ns()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = aside.read_text(encoding="utf-8")
        if moved != stale_text:  # a live lock taken over by someone else: restore it
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink()
            return False
        aside.unlink()
        return True


def _parse_lock(text: str) -> dict | None:
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None  # not a lock this code wrote (it publishes complete files only): treated as stale
    return record if isinstance(record, dict) else None


def _is_stale(holder: dict) -> bool:
    """The holder ran on this host and its pid no longer exists (another host's process cannot be asked)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    except (KeyError, TypeError, ValueError, OverflowError):
        return True
    return False


def takes_lock() -> bool:
    """Whether this process takes its output folder's lock: the only one, or rank 0 under torchrun
    (read from the environment, so it can be decided before the process group exists)."""
    from carbseg import distributed

    if distributed.is_distributed():
        return distributed.is_main_process()
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str, option: str = "--out", what: str = "folder"):
    """Hold ``FolderLock(folder)`` for the block (nothing under torchrun's ranks other than 0)."""
    if not takes_lock():
        yield None
        return
    with FolderLock(folder, command, option, what) as lock:
        yield lock
