"""What a training prints: one compact line per log event, short notices, and whether a live progress bar fits.

A console line is for a person watching: ``step``/``max_steps``, the epoch to 2 decimals, numbers to 4 significant
digits, metrics grouped by their prefix (``eval: loss 0.08  accuracy 0.97``). Timing keys (``*_runtime``,
``*_per_second``) and ``total_flos`` are left out of the line; they stay in ``state.log_history`` and the trackers.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .envvars import env_seconds

#: keys left out of console lines (the step and epoch lead the line instead)
HIDDEN_KEYS = frozenset({"total_flos", "epoch", "step"})
HIDDEN_SUFFIXES = ("_runtime", "_per_second")
#: metric prefixes shown as a group: evaluation, prediction and the end-of-training summary
GROUPED_PREFIXES = ("eval", "test", "train")
#: FLYTRAIN_PROGRESS: "auto" (a bar when stderr is a terminal or a notebook), "1" (always), "0" (never)
PROGRESS_ENV = "FLYTRAIN_PROGRESS"
#: FLYTRAIN_LOG_LINE_INTERVAL: without a progress bar, log lines arriving faster than this are written together
LINE_INTERVAL_ENV = "FLYTRAIN_LOG_LINE_INTERVAL"
DEFAULT_LINE_INTERVAL = 1.0


def format_value(value: Any, max_str_len: int = 100) -> str:
    """Floats to 4 significant digits; other values as text, strings cut at ``max_str_len``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (bool, int)):
        return str(value)
    return str(value)[:max_str_len]


def format_epoch(epoch: float) -> str:
    """``7`` for 7.0, ``7.25`` for 7.25: an epoch as a person would say it."""
    return f"{epoch:.2f}".rstrip("0").rstrip(".")


def format_log_line(logs: Mapping[str, Any], global_step: int, max_steps: int = 0, max_str_len: int = 100) -> str:
    """One console line for a log event, e.g. ``step  50/1710  epoch 0.88  loss 0.9313  learning_rate 0.000971``."""
    if max_steps > 0:
        parts = [f"step {global_step:>{len(str(max_steps))}}/{max_steps}"]
    else:
        parts = [f"step {global_step}"]
    epoch = logs.get("epoch")
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
        parts.append(f"epoch {epoch:.2f}")
    groups: dict[str, list[str]] = {}
    for key, value in logs.items():
        if key in HIDDEN_KEYS or key.endswith(HIDDEN_SUFFIXES):
            continue
        prefix, _, name = key.partition("_")
        if prefix in GROUPED_PREFIXES and name:
            items = groups.setdefault(prefix, [])
            # the loss leads its group, as it leads the training lines
            items.insert(0 if name == "loss" else len(items), f"{name} {format_value(value, max_str_len)}")
        else:
            parts.append(f"{key} {format_value(value, max_str_len)}")
    parts.extend(f"{prefix}: " + "  ".join(items) for prefix, items in groups.items())
    return "  ".join(parts)


def progress_mode() -> str:
    """``FLYTRAIN_PROGRESS`` read once per training: "auto", "on" or "off"; anything else is a ValueError."""
    raw = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "true", "yes", "on"):
        return "on"
    if raw in ("0", "false", "no", "off"):
        return "off"
    raise ValueError(f"environment variable {PROGRESS_ENV}={raw!r}: expected 1 (a progress bar), 0 (log lines only) "
                     "or auto (a bar when stderr is a terminal)")


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    ipython = shell.get_ipython() if hasattr(shell, "get_ipython") else None
    return type(ipython).__name__ == "ZMQInteractiveShell"


def wants_progress_bar() -> bool:
    """A live bar only where someone watches it: stderr is a terminal (or a notebook), unless FLYTRAIN_PROGRESS."""
    mode = progress_mode()
    if mode != "auto":
        return mode == "on"
    stream = sys.stderr
    try:
        interactive = stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        interactive = False
    return interactive or _in_notebook()


def notice(message: str) -> None:
    """A one-line status message on stderr (above a live progress bar, if one is drawn)."""
    if "tqdm" in sys.modules:  # a bar may be on screen: tqdm clears it, writes, and draws it again
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()
    else:
        print(message, file=sys.stderr, flush=True)


def line_interval() -> float:
    """``FLYTRAIN_LOG_LINE_INTERVAL`` (seconds, default 1; 0 writes every line at once); anything else is an error."""
    return env_seconds(LINE_INTERVAL_ENV, DEFAULT_LINE_INTERVAL, maximum=3600,
                       meaning=" (0 writes every log line at once)")


class LineWriter:
    """Log lines to stdout, at most one write per ``interval`` seconds while lines come faster than that.

    A line that comes after a quiet interval is written at once; lines that follow it within the interval are held
    and written together when it has passed (a timer thread writes them if no other line comes), so a pipe, a
    pod's log or a tracker capturing the console (W&B's default sends one record per write) gets one write per
    interval instead of one per line. ``flush`` writes what is held (the end of training, an error). ``emit``, if
    given, writes a batch of lines instead (e.g. above a progress bar, where each write redraws the bar).
    """

    def __init__(self, interval: float, emit: Callable[[list[str]], None] | None = None) -> None:
        self.interval = interval
        self._emit = emit
        self._held: list[str] = []
        self._last_write: float | None = None  # None: nothing written yet, so the first line goes out at once
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def write(self, line: str) -> None:
        with self._lock:
            self._held.append(line)
            now = time.monotonic()
            wait = 0.0 if self._last_write is None else self.interval - (now - self._last_write)
            if wait <= 0:
                self._write_held(now)
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._flush_from_timer)
                self._timer.daemon = True
                self._timer.name = "flytrain-log-lines"
                self._timer.start()

    def flush(self) -> None:
        with self._lock:
            if self._timer is not None:
                if self._timer is not threading.current_thread():
                    self._timer.cancel()
                self._timer = None
            if self._held:
                self._write_held(time.monotonic())

    def _flush_from_timer(self) -> None:
        try:
            self.flush()
        except (OSError, ValueError):  # stdout closed or gone (a closed pipe): the training thread will hear of it
            pass

    def _write_held(self, now: float) -> None:
        lines, self._held = self._held, []
        self._last_write = now
        (self._emit or write_lines)(lines)


def write_lines(lines: list[str]) -> None:
    """Lines to stdout in one write, flushed (a console capture such as W&B's sends one record per write)."""
    stream = sys.stdout
    if stream is None:
        return
    stream.write("".join(line + "\n" for line in lines))
    stream.flush()


def resume_notice(global_step: int, max_steps: int, epoch: float | None) -> str:
    """``resuming from checkpoint-280 (step 280 of 1200, epoch 7)``: checkpoints are named after their step."""
    where = f"step {global_step} of {max_steps}"
    if epoch is not None:
        where += f", epoch {format_epoch(epoch)}"
    return f"resuming from checkpoint-{global_step} ({where})"
