"""The built-in callbacks: default flow (when to log, evaluate, save), printing, progress bars, early stopping."""

from __future__ import annotations

import logging
import sys

from .arguments import IntervalStrategy, SaveStrategy
from .callback import TrainerCallback
from .console import (
    LineWriter,
    format_log_line,
    format_value,
    line_interval,
    notice,
    resume_notice,
    wants_progress_bar,
    write_lines,
)
from .state import ExportableState

logger = logging.getLogger(__name__)


class DefaultFlowCallback(TrainerCallback):
    """Decides, from the arguments' strategies, when the loop logs, evaluates and saves."""

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == 1 and args.logging_first_step:
            control.should_log = True
        if args.logging_strategy == IntervalStrategy.STEPS and step % state.logging_steps == 0:
            control.should_log = True
        if (
            args.eval_strategy == IntervalStrategy.STEPS
            and step % state.eval_steps == 0
            and args.eval_delay <= step
        ):
            control.should_evaluate = True
        if args.save_strategy == SaveStrategy.STEPS and state.save_steps > 0 and step % state.save_steps == 0:
            control.should_save = True

        if step >= state.max_steps:
            control.should_training_stop = True
            if args.save_strategy == SaveStrategy.STEPS:
                control.should_save = True
            if args.eval_strategy == IntervalStrategy.STEPS and args.eval_delay <= step:
                control.should_evaluate = True  # a final evaluation; a no-op change when step was an eval step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.logging_strategy == IntervalStrategy.EPOCH:
            control.should_log = True
        if args.eval_strategy == IntervalStrategy.EPOCH and args.eval_delay <= state.epoch:
            control.should_evaluate = True
        if args.save_strategy == SaveStrategy.EPOCH:
            control.should_save = True
        return control


class PrinterCallback(TrainerCallback):
    """Prints the logs as dicts, the reference's way (used instead of ProgressCallback when ``disable_tqdm``)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step > 0:
            notice(resume_notice(state.global_step, state.max_steps, state.epoch))

    def on_log(self, args, state, control, logs=None, **kwargs):
        _ = logs.pop("total_flos", None)
        if state.is_local_process_zero:
            print(logs)


class ProgressCallback(TrainerCallback):
    """What a training shows on screen: a live bar where someone watches, a compact line per log event.

    With stderr on a terminal (or in a notebook) a tqdm training bar (steps, ETA, it/s; the last loss and learning
    rate in its postfix) and a short evaluation bar are drawn, and log lines go above the bar. Without one (CI,
    Flyte pods, DVC logs) no bar is drawn. Either way one compact line per log event (``trainer_lib.console``);
    lines that come faster than one per ``FLYTRAIN_LOG_LINE_INTERVAL`` (1 s) are written together, at most one
    write per interval (a line after a quiet interval goes out at once; held lines within the interval, and all of
    them at the end of training or on an error). ``FLYTRAIN_PROGRESS=0`` / ``1`` turns the bar off / on whatever
    the stream.
    tqdm redraws at most every ``mininterval`` (0.1 s), so a step costs one counter update.
    """

    def __init__(self, max_str_len: int = 100):
        self.training_bar = None
        self.prediction_bar = None
        self.max_str_len = max_str_len
        self.current_step = 0
        self.use_bar = wants_progress_bar()  # read now, so a bad FLYTRAIN_PROGRESS fails when the Trainer is made
        self._lines = LineWriter(line_interval(), self._emit_lines)
        self._in_train = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.use_bar = wants_progress_bar()
        self._lines = LineWriter(line_interval(), self._emit_lines)
        self._in_train = True
        if state.is_world_process_zero and state.global_step > 0:
            notice(resume_notice(state.global_step, state.max_steps, state.epoch))
        if state.is_world_process_zero and self.use_bar:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True,
                                     unit="step", desc="train", file=sys.stderr)
        self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
            self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not (self.use_bar and state.is_world_process_zero) or eval_dataloader is None:
            return
        if not hasattr(eval_dataloader, "__len__"):
            return
        if self.prediction_bar is None:
            from tqdm.auto import tqdm

            self.prediction_bar = tqdm(total=len(eval_dataloader), leave=self.training_bar is None,
                                       dynamic_ncols=True, unit="batch", desc="eval", file=sys.stderr)
        self.prediction_bar.update(1)

    def _close_prediction_bar(self) -> None:
        if self.prediction_bar is not None:
            self.prediction_bar.close()
        self.prediction_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_prediction_bar()

    def on_predict(self, args, state, control, **kwargs):
        self._close_prediction_bar()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        line = format_log_line(logs, state.global_step, state.max_steps, self.max_str_len)
        # one write per line at most (print makes two), flushed: a pipe (DVC, a pod's log) shows the lines as they
        # come, lines that come faster than the interval together (above a bar each write clears and redraws it);
        # outside training at once
        lines = self._line_writer()
        lines.write(line)
        if not getattr(self, "_in_train", False):
            lines.flush()
        bar = self.training_bar
        if bar is not None and ("loss" in logs or "learning_rate" in logs):
            shown = {"loss": logs.get("loss"), "lr": logs.get("learning_rate")}
            bar.set_postfix_str(", ".join(f"{k}={format_value(v)}" for k, v in shown.items() if v is not None),
                                refresh=False)

    def _line_writer(self) -> LineWriter:
        if getattr(self, "_lines", None) is None:  # a subclass whose __init__ did not call ours
            self._lines = LineWriter(line_interval(), self._emit_lines)
        return self._lines

    def _emit_lines(self, lines: list[str]) -> None:
        bar = getattr(self, "training_bar", None)
        if bar is None:
            write_lines(lines)
        else:  # above the bar: tqdm clears it, writes, and draws it again, so once for all the held lines
            bar.write("\n".join(lines), file=sys.stdout)

    def _close_bars(self) -> None:
        self._in_train = False
        self._line_writer().flush()
        self._close_prediction_bar()
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None

    def on_train_end(self, args, state, control, **kwargs):
        self._close_bars()

    def on_train_error(self, args, state, control, error=None, **kwargs):
        self._close_bars()  # the bar stays as it was; what follows (a traceback, a notice) starts on a new line


class EarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stops training when ``metric_for_best_model`` has not improved for ``early_stopping_patience`` evaluations.

    An improvement must beat the best value so far by more than ``early_stopping_threshold``. The counter is
    saved in checkpoints and restored on resume.
    """

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float | None = 0.0):
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold or 0.0
        self.early_stopping_patience_counter = 0

    def check_metric_value(self, args, state, control, metric_value) -> None:
        best = state.best_metric
        if best is None:
            self.early_stopping_patience_counter = 0
            return
        better = metric_value > best if args.greater_is_better else metric_value < best
        if better and abs(metric_value - best) > self.early_stopping_threshold:
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1

    def on_train_begin(self, args, state, control, **kwargs):
        if args.metric_for_best_model is None:
            raise ValueError("EarlyStoppingCallback requires TrainingArguments.metric_for_best_model to be set")
        if args.eval_strategy == IntervalStrategy.NO:
            raise ValueError(
                "EarlyStoppingCallback requires TrainingArguments.eval_strategy to be 'steps' or 'epoch', not 'no'"
            )
        if not args.load_best_model_at_end:
            logger.warning(
                "Using EarlyStoppingCallback without load_best_model_at_end=True: the model at the end of training "
                "is the last one, not the best one."
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metric_to_check = args.metric_for_best_model
        if not metric_to_check.startswith("eval_"):
            metric_to_check = f"eval_{metric_to_check}"
        metric_value = (metrics or {}).get(metric_to_check)
        if metric_value is None:
            logger.warning(
                "early stopping required metric_for_best_model, but did not find %s so early stopping is disabled",
                metric_to_check,
            )
            return
        self.check_metric_value(args, state, control, metric_value)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            if not control.should_training_stop and state.is_world_process_zero:
                notice(f"stopped early at step {state.global_step} (patience exhausted: {metric_to_check} did not "
                       f"improve for {self.early_stopping_patience_counter} evaluations)")
            control.should_training_stop = True

    def state(self) -> dict:
        return {
            "args": {
                "early_stopping_patience": self.early_stopping_patience,
                "early_stopping_threshold": self.early_stopping_threshold,
            },
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }
