"""ClearML: trainer parameters, scalars against the global step, optionally checkpoints as task artifacts.

Environment: ``CLEARML_PROJECT`` (default "flytrain"), ``CLEARML_TASK`` (default "Trainer"), ``CLEARML_LOG_MODEL``
(true: upload each checkpoint as an artifact), ``CLEARML_OFFLINE_MODE`` (true: the session is written under
ClearML's cache folder, ``CLEARML_CACHE_DIR``, for a later ``clearml-task --import-offline-session``), plus
ClearML's own configuration (``CLEARML_CONFIG_FILE``, ``CLEARML_API_HOST``, credentials, ...).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ._common import RUN_SUMMARY_KEYS, TrackerCallback, env_flag, numeric_items, rewrite_logs, training_params

logger = logging.getLogger(__name__)

#: the parameter section the training arguments appear under in ClearML
PARAMS_SECTION = "flytrain"
#: logged once per run: reported as single values instead of scalar series
_SINGLE_VALUES = {"epoch", *RUN_SUMMARY_KEYS}


class ClearMLCallback(TrackerCallback):
    """Logs a training run to a ClearML task. A task created here is closed at train end (values logged after
    that are not recorded: a closed task cannot be reopened); an already running task (``Task.init`` called by the
    user, or a clearml-agent run) is used and left open."""

    integration_name = "clearml"
    required_modules = ("clearml",)
    pip_extra = "clearml"
    logs_predict_metrics = True

    def __init__(self) -> None:
        super().__init__()
        # Environment errors surface when the Trainer is built, not in the middle of training.
        self._log_model = env_flag("CLEARML_LOG_MODEL")
        self._offline = env_flag("CLEARML_OFFLINE_MODE")
        self._task = None
        self._owns_task = False
        self._closed = False
        self._warned_closed = False
        self._task_id: str | None = None

    @property
    def task(self):
        """The ClearML task in use (None before setup and after it was closed)."""
        return self._task

    def _open(self, args, state, model) -> None:
        from clearml import Task

        current = Task.current_task()
        if current is not None:
            self._task, self._owns_task = current, False
            logger.info("ClearML: logging into the running task %s", current.id)
        elif self._closed:
            if not self._warned_closed:
                logger.warning(
                    "ClearML: the task was closed at train end; values logged after training (evaluate, predict) "
                    "are not recorded"
                )
                self._warned_closed = True
            return
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
        self._task_id = self._task.id
        # connect() may write values back (UI overrides of a remote run): it gets a copy, never the arguments
        self._task.connect(dict(training_params(args, model)), name=PARAMS_SECTION)

    def _is_open(self) -> bool:
        return self._task is not None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._closed = False  # a new training: a new task
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def _send(self, events: list[tuple[int, dict[str, Any]]]) -> None:
        reporter = self._task.get_logger()
        for step, metrics in events:
            numbers, skipped = numeric_items(metrics)
            if skipped:
                logger.debug("ClearML: not reporting non-numeric values %s", skipped)
            once = {k: v for k, v in numbers.items() if k in _SINGLE_VALUES}
            for name, value in once.items():
                reporter.report_single_value(name=name, value=value)
            series = rewrite_logs({k: v for k, v in numbers.items() if k not in once})
            for key, value in series.items():
                title, _, name = key.partition("/")
                reporter.report_scalar(title=title, series=name, value=value, iteration=step)

    def _log_checkpoint(self, args, state, folder: str) -> None:
        if not self._log_model:
            return
        name = os.path.basename(folder)
        logger.info("ClearML: uploading %s as an artifact", name)
        # the folder is zipped before this returns, so checkpoint rotation cannot pull it away mid-upload
        self._task.upload_artifact(name=name, artifact_object=folder, metadata={"global_step": state.global_step})

    def _log_facts(self, tags: dict[str, str], params: dict[str, str], step: int) -> None:
        self._task.connect({**tags, **params}, name="provenance")  # a copy: values written back are dropped

    def run_reference(self) -> dict[str, Any] | None:
        return {"task_id": self._task_id} if self._task_id else None

    def continue_from(self, reference: dict[str, Any]) -> bool:
        """A closed task cannot be reopened: values logged after training are reported as not recorded."""
        self._closed = True
        return True

    def _close(self, failed: bool) -> None:
        task, self._task = self._task, None
        if task is None or not self._owns_task:
            return  # a task started by the user (or an agent) stays open: its owner closes it
        self._closed = True
        task.flush(wait_for_uploads=True)
        task.close()
