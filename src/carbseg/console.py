"""What the commands show while they run: bars on a terminal, plain lines everywhere else.

Progress bars are for a terminal. Written into a log file or a pipe (a cluster job, ``nohup``,
``| tee``), their carriage-return redraws become megabytes of noise, so they are shown only when
stderr is a terminal. There, plain progress lines take their place instead (``progress_lines``):
training logs one line every ``train.log_interval`` iterations (``iteration_line``), the loops over
images one line every 30 s or tenth of the images (``ProgressLog``), all as INFO log records.
``--no-progress`` turns off both. Before an error line is printed, open bars are closed, so the
error starts a line of its own instead of running on from a bar.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from tqdm import tqdm


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def show_progress(progress: bool = True) -> bool:
    """Whether to draw progress bars: asked for (not ``--no-progress``) and stderr is a terminal."""
    return bool(progress) and _stderr_is_terminal()


def progress_lines(progress: bool = True) -> bool:
    """Whether to log plain progress lines instead: asked for, and stderr is not a terminal."""
    return bool(progress) and not _stderr_is_terminal()


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05`` (as tqdm shows times)."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# Loss terms in the order the line shows them (the CARB terms of ``carbseg.losses.carb.CARBTerms``).
_LOSS_TERMS = ("total", "global_ce", "patch_ce", "consistent", "inconsistent", "patch_consistent",
               "patch_inconsistent")


def iteration_line(done: int, stop: int, values: dict) -> str:
    """One training progress line from a logged iteration's values (already plain floats: no device sync).

    ``iteration 40/300: total 1.234 global_ce 0.612 ... c 0.87 lr 9.4e-03 1.52 it/s ETA 2:51``
    """
    terms = " ".join(f"{key} {values[key]:.3f}" for key in _LOSS_TERMS if values.get(key) is not None)
    parts = [f"iteration {done}/{stop}:", terms]
    if values.get("c") is not None:
        parts.append(f"c {values['c']:.2f}")
    if values.get("lr") is not None:
        parts.append(f"lr {values['lr']:.2e}")
    rate = values.get("iters_per_s")
    if rate:
        parts.append(f"{rate:.2f} it/s ETA {format_duration((stop - done) / rate)}")
    return " ".join(p for p in parts if p)


class ProgressLog:
    """Plain progress lines of a loop over ``total`` items where no bar is drawn (``progress_lines``).

    A line when ``every_s`` seconds passed since the last one or another tenth of the items is done,
    and one at the end: ``pseudo-masks: 120/367 images (32%), 3.1 img/s, ETA 1:19``. ``update`` only
    counts and reads a clock, so a loop may call it for every item.
    """

    def __init__(self, logger: logging.Logger, desc: str, total: int, enabled: bool = True,
                 every_s: float = 30.0, unit: str = "images", rate_unit: str = "img"):
        self.logger, self.desc, self.total, self.enabled = logger, desc, int(total), bool(enabled) and total > 0
        self.every_s, self.unit, self.rate_unit = every_s, unit, rate_unit
        self.done = 0
        self.started = self.last = time.perf_counter()
        self.next_mark = self._mark_after(0)

    def _mark_after(self, done: int) -> int:
        tenth = max(self.total // 10, 1)
        return (done // tenth + 1) * tenth

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        now = time.perf_counter()
        if self.done >= self.total or self.done >= self.next_mark or now - self.last >= self.every_s:
            self.last = now
            self.next_mark = self._mark_after(self.done)
            self.logger.info("%s", self.line(now))
            if self.done >= self.total:
                self.enabled = False  # the last line is written; a later close() adds nothing

    def line(self, now: float | None = None) -> str:
        elapsed = max((time.perf_counter() if now is None else now) - self.started, 1e-9)
        rate = self.done / elapsed
        head = f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done // self.total}%)"
        if self.done >= self.total:
            return f"{head} in {format_duration(elapsed)}, {rate:.2f} {self.rate_unit}/s"
        eta = f", ETA {format_duration((self.total - self.done) / rate)}" if rate > 0 else ""
        return f"{head}, {rate:.2f} {self.rate_unit}/s{eta}"


def close_progress_bars() -> None:
    """Close every bar still open (an exception left its loop): each ends its line before an error."""
    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a broken bar must never hide the error being reported
            bar.close()
