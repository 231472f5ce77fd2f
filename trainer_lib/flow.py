"""The built-in callbacks: default flow (when to log, evaluate, save), printing, progress bars, early stopping."""

from __future__ import annotations

import logging

from .arguments import IntervalStrategy, SaveStrategy
from .callback import TrainerCallback
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


def _format_logs(logs: dict) -> dict:
    shown = {k: v for k, v in logs.items() if k != "total_flos"}
    for key, value in shown.items():
        if isinstance(value, float) and key != "epoch":
            shown[key] = float(f"{value:.4g}")
    return shown


class PrinterCallback(TrainerCallback):
    """Prints the logs (used instead of progress bars when ``disable_tqdm``)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        _ = logs.pop("total_flos", None)
        if state.is_local_process_zero:
            print(logs)


class ProgressCallback(TrainerCallback):
    """tqdm progress bars for training and evaluation; logs are written above the bar."""

    def __init__(self, max_str_len: int = 100):
        self.training_bar = None
        self.prediction_bar = None
        self.max_str_len = max_str_len
        self.current_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, initial=state.global_step)
        self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
            self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero or eval_dataloader is None or not hasattr(eval_dataloader, "__len__"):
            return
        if self.prediction_bar is None:
            from tqdm.auto import tqdm

            self.prediction_bar = tqdm(
                total=len(eval_dataloader), leave=self.training_bar is None, dynamic_ncols=True
            )
        self.prediction_bar.update(1)

    def _close_prediction_bar(self, state) -> None:
        if state.is_world_process_zero and self.prediction_bar is not None:
            self.prediction_bar.close()
        self.prediction_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_prediction_bar(state)

    def on_predict(self, args, state, control, **kwargs):
        self._close_prediction_bar(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs is not None:
            shown = {k: (str(v)[: self.max_str_len] if isinstance(v, str) else v) for k, v in _format_logs(logs).items()}
            self.training_bar.write(str(shown))

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


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
            control.should_training_stop = True

    def state(self) -> dict:
        return {
            "args": {
                "early_stopping_patience": self.early_stopping_patience,
                "early_stopping_threshold": self.early_stopping_threshold,
            },
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }
