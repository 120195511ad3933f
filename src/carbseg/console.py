"""What the commands show on the terminal: progress bars only where a person watches them.

Progress bars are for a terminal. Written into a log file or a pipe (a cluster job, ``| tee``),
their carriage-return redraws become megabytes of noise, so they are shown only when stderr is a
terminal, and never with ``--no-progress``. Before an error line is printed, open bars are closed,
so the error starts a line of its own instead of running on from a bar.
"""

from __future__ import annotations

import contextlib
import sys

from tqdm import tqdm


def show_progress(progress: bool = True) -> bool:
    """Whether to draw progress bars: asked for (not ``--no-progress``) and stderr is a terminal."""
    try:
        return bool(progress) and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def close_progress_bars() -> None:
    """Close every bar still open (an exception left its loop): each ends its line before an error."""
    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a broken bar must never hide the error being reported
            bar.close()
