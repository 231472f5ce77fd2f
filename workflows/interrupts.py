"""Ctrl-C and SIGTERM in an entry point: a short notice saying where training stopped and what was kept, then the
conventional exit status (130 for SIGINT, 143 for SIGTERM) instead of a traceback.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

from trainer_lib import TrainerCallback


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A KeyboardInterrupt, so no ``except Exception`` swallows it and the Trainer
    closes its trackers as it does for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StepWatch(TrainerCallback):
    """Remembers the step a training was at when it began, ended or failed (no per-step cost)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.max_steps = 0
        self.finished = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.step, self.max_steps, self.finished = state.global_step, state.max_steps, False

    def on_train_end(self, args, state, control, **kwargs):
        self.step, self.finished = state.global_step, True

    def on_train_error(self, args, state, control, error=None, **kwargs):
        self.step = state.global_step


def raise_on_interrupt_signals() -> Callable[[], None]:
    """From now on SIGINT and SIGTERM raise Interrupted; returns the function that puts the previous handlers back.

    A second signal while winding down ends the process at once (the default action). Only the main thread may
    install handlers: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def interrupted_notice(watch: StepWatch, checkpoint_dir: str | None,
                       how_to_continue: str = "run the same command to continue") -> str:
    """``interrupted at step 431 of 1200; checkpoint-400 kept; run the same command to continue``."""
    if watch.step is None:
        return "interrupted before training started; run the same command to start again"
    if watch.finished:
        return f"interrupted after training finished (step {watch.step}); {how_to_continue}"
    where = f"interrupted at step {watch.step}" + (f" of {watch.max_steps}" if watch.max_steps else "")
    newest = None
    if checkpoint_dir and os.path.isdir(checkpoint_dir):
        from trainer_lib import checkpoint as ckpt

        newest = ckpt.latest_valid_checkpoint(checkpoint_dir)
    if newest is None:
        return f"{where}; no checkpoint written yet; run the same command to start again"
    return f"{where}; {os.path.basename(newest)} kept; {how_to_continue}"
