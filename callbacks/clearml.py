"""ClearML: trainer parameters, scalars against the global step, optionally checkpoints as task artifacts.

Environment: ``CLEARML_PROJECT`` (default "flytrain"), ``CLEARML_TASK`` (default "Trainer"), ``CLEARML_LOG_MODEL``
(true: upload each checkpoint as an artifact), ``CLEARML_OFFLINE_MODE`` (true: the session is written under
ClearML's cache folder, ``CLEARML_CACHE_DIR``, for a later ``clearml-task --import-offline-session``), plus
ClearML's own configuration (``CLEARML_CONFIG_FILE``, ``CLEARML_API_HOST``, credentials, ...).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from trainer_lib.checkpoint import list_checkpoints

from ._common import (
    RUN_SUMMARY_KEYS,
    TrackerCallback,
    env_flag,
    logger,
    numeric_items,
    rewrite_logs,
    training_params,
)

#: the parameter section the training arguments appear under in ClearML
PARAMS_SECTION = "flytrain"
#: logged once per run: reported as single values instead of scalar series
_SINGLE_VALUES = {"epoch", *RUN_SUMMARY_KEYS}


class ClearMLCallback(TrackerCallback):
    """Logs a training run to a ClearML task. A task created here is closed at train end; an already running task
    (``Task.init`` called by the user, or a clearml-agent run) is used and left open."""

    integration_name = "clearml"
    required_modules = ("clearml",)
    pip_extra = "clearml"

    def __init__(self) -> None:
        super().__init__()
        # Environment errors surface when the Trainer is built, not in the middle of training.
        self._log_model = env_flag("CLEARML_LOG_MODEL")
        self._offline = env_flag("CLEARML_OFFLINE_MODE")
        self._task = None
        self._owns_task = False
        self._closed = False
        self._warned_closed = False
        self._in_train = False

    @property
    def task(self):
        """The ClearML task in use (None before setup and after it was closed)."""
        return self._task

    def setup(self, args, state, model, **kwargs) -> None:
        from clearml import Task

        current = Task.current_task()
        if current is not None:
            self._task, self._owns_task = current, False
            logger.info("ClearML: logging into the running task %s", current.id)
        else:
            if self._offline:
                Task.set_offline(offline_mode=True)
            self._task = Task.init(
                project_name=os.environ.get("CLEARML_PROJECT") or "flytrain",
                task_name=os.environ.get("CLEARML_TASK") or "Trainer",
                # flytrain reports scalars and checkpoints itself: no duplicates from ClearML's framework hooks
                auto_connect_frameworks={"pytorch": False, "tensorboard": False},
            )
            self._owns_task = True
        # connect() may write values back (UI overrides of a remote run): it gets a copy, never the arguments
        self._task.connect(dict(training_params(args, model)), name=PARAMS_SECTION)

    @contextlib.contextmanager
    def _session(self, args, state, model) -> Iterator[Any]:
        """The task to report to (None: not this process, or closed); outside training it is closed after use."""
        if not state.is_world_process_zero:
            task = None
        elif self._closed:
            if not self._warned_closed:
                logger.warning(
                    "ClearML: the task was closed at train end; values logged after training (evaluate, predict) "
                    "are not recorded"
                )
                self._warned_closed = True
            task = None
        else:
            task = self._task if self._ensure_setup(args, state, model) else None
        try:
            yield task
        finally:
            if task is not None and not self._in_train:
                self._close()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._in_train = True
        self._closed = False
        self._ensure_setup(args, state, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs:
            self._report(args, state, model, logs)

    def on_predict(self, args, state, control, metrics, model=None, **kwargs):
        if metrics:
            self._report(args, state, model, metrics)

    def _report(self, args, state, model, metrics: dict[str, Any]) -> None:
        with self._session(args, state, model) as task:
            if task is None:
                return
            reporter = task.get_logger()
            numbers, skipped = numeric_items(metrics)
            if skipped:
                logger.debug("ClearML: not reporting non-numeric values %s", skipped)
            once = {k: v for k, v in numbers.items() if k in _SINGLE_VALUES}
            for name, value in once.items():
                reporter.report_single_value(name=name, value=value)
            series = rewrite_logs({k: v for k, v in numbers.items() if k not in once})
            for key, value in series.items():
                title, _, name = key.partition("/")
                reporter.report_scalar(title=title, series=name, value=value, iteration=state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self._log_model or not self._in_train:
            return
        with self._session(args, state, model) as task:
            checkpoints = list_checkpoints(args.output_dir) if task is not None else []
            if not checkpoints:
                return
            newest = checkpoints[-1]
            name = os.path.basename(newest)
            logger.info("ClearML: uploading %s as an artifact", name)
            # the folder is zipped before this returns, so checkpoint rotation cannot pull it away mid-upload
            task.upload_artifact(
                name=name, artifact_object=newest, metadata={"global_step": state.global_step}
            )

    def on_train_end(self, args, state, control, **kwargs):
        self._in_train = False
        self._close()

    def on_integration_error(self, event: str, error: BaseException) -> None:
        self._in_train = False
        self._close()

    def _close(self) -> None:
        if self._task is None or not self._owns_task:
            return  # a task started by the user (or an agent) stays open: its owner closes it
        task, self._task = self._task, None
        self._initialized = False
        self._closed = True
        task.flush(wait_for_uploads=True)
        task.close()
