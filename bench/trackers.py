"""Row 2: the Trainer with file-based trackers on (logging every 10 steps) against the same run with none.

Both sides are timed from the start of the first epoch to the end of training: the clock stops in ``on_train_end``
after every tracker's own ``on_train_end``, so the events a tracker held back (sent in bursts) and its final
flush are inside the window. Only the trackers' one-off setup (in ``on_train_begin``, before the first epoch) is outside it.
"""

from __future__ import annotations

import os
import tempfile
import time
from unittest import mock

from trainer_lib import Trainer, TrainingArguments

from .core import BATCH, LR, TrainClock, console, digits_dataset, new_model, paired

TRACKERS = ["tensorboard", "mlflow", "wandb", "dvclive", "codecarbon"]


class _EndClock(TrainClock):
    """TrainClock that also notes when the last optimizer step ended (what follows is flush and close)."""

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step = time.perf_counter()


def _run(steps: int, report_to: list[str], workdir: str, ends: list[float] | None = None) -> float:
    out = tempfile.mkdtemp(dir=workdir)
    clock = _EndClock()
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR, weight_decay=0.0,
        lr_scheduler_type="constant", max_grad_norm=0, logging_steps=10, save_strategy="no", eval_strategy="no",
        report_to=report_to, run_name="bench",
    )
    # user callbacks come after the report_to integrations, so the clock's on_train_end runs after theirs
    trainer = Trainer(new_model(), args, train_dataset=digits_dataset(), callbacks=[clock])
    trainer.train()
    if ends is not None:
        ends.append(clock.end - clock.last_step)
    return steps / clock.seconds


def compare(steps: int = 2000, repeats: int = 7) -> dict[str, float]:
    """Steps/s with and without trackers, alternated, each through the end of training (tracker setup, a one-off
    cost of about a second for wandb's service and MLflow's run creation, is excluded); ``end_s`` is the median
    time the tracked side spent after its last step (final flush and closing the runs)."""
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as work:
        env = {
            "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "WANDB_MODE": "offline", "WANDB_DIR": work,
            "WANDB_SILENT": "true", "CODECARBON_COUNTRY": "USA",
        }
        with mock.patch.dict(os.environ, env), console(terminal=False):
            _run(100, TRACKERS, work)  # warm-up: imports and first-use costs of every tracker
            _run(100, [], work)
            r = paired(lambda: _run(steps, [], work), lambda: _run(steps, TRACKERS, work, ends), repeats)
    ends.sort()
    return {"plain_steps_per_s": r["a"], "tracked_steps_per_s": r["b"], "ratio": r["ratio"],
            "ratio_min": r["ratio_min"], "ratio_max": r["ratio_max"], "end_s": ends[len(ends) // 2]}
