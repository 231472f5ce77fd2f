"""Row 2: the Trainer with file-based trackers on (logging every 10 steps) against the same run with none."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from unittest import mock

from trainer_lib import Trainer, TrainerCallback, TrainingArguments

from .core import BATCH, LR, digits_dataset, new_model, paired

TRACKERS = ["tensorboard", "mlflow", "wandb", "dvclive", "codecarbon"]


class _Clock(TrainerCallback):
    """From the first step's start to the last step's end: steady-state throughput, tracker setup excluded."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.first = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.last = time.perf_counter()


def _run(steps: int, report_to: list[str], workdir: str, sink) -> float:
    out = tempfile.mkdtemp(dir=workdir)
    clock = _Clock()
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR, weight_decay=0.0,
        lr_scheduler_type="constant", max_grad_norm=0, logging_steps=10, save_strategy="no", eval_strategy="no",
        disable_tqdm=True, report_to=report_to, run_name="bench",
    )
    trainer = Trainer(new_model(), args, train_dataset=digits_dataset(), callbacks=[clock])
    with contextlib.redirect_stdout(sink):
        trainer.train()
    return steps / (clock.last - clock.first)


def compare(steps: int = 2000, repeats: int = 7) -> dict[str, float]:
    """Steady-state steps/s with and without trackers, alternated (tracker setup and teardown, a one-off cost of
    about a second for wandb's service and MLflow's run creation, are excluded)."""
    with tempfile.TemporaryDirectory() as work:
        env = {
            "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "WANDB_MODE": "offline", "WANDB_DIR": work,
            "WANDB_SILENT": "true", "CODECARBON_COUNTRY": "USA",
        }
        with mock.patch.dict(os.environ, env), open(os.devnull, "w") as sink:
            _run(100, TRACKERS, work, sink)  # warm-up: imports and first-use costs of every tracker
            _run(100, [], work, sink)
            r = paired(lambda: _run(steps, [], work, sink), lambda: _run(steps, TRACKERS, work, sink), repeats)
    return {"plain_steps_per_s": r["a"], "tracked_steps_per_s": r["b"], "ratio": r["ratio"],
            "ratio_min": r["ratio_min"], "ratio_max": r["ratio_max"]}
