"""MLflow integration: params, step metrics and checkpoints of a run that a resumed training continues.

Environment: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_TAGS (JSON object), MLFLOW_NESTED_RUN, MLFLOW_RUN_ID,
MLFLOW_FLATTEN_PARAMS, HF_MLFLOW_LOG_ARTIFACTS, DISABLE_MLFLOW_INTEGRATION, FLYTRAIN_TRACKER_TIMEOUT (seconds a
failing backend may hold training up in total, default 30), MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT (defaults 2 / 5 s).
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import logging
import os
import re
import time
import weakref
from collections.abc import Mapping
from typing import Any

from trainer_lib.checkpoint import list_checkpoints
from trainer_lib.state import ExportableState

from ._common import (
    TrackerCallback,
    env_flag,
    env_seconds,
    flatten_dict,
    numeric_items,
    redact,
    send_due,
    send_interval,
    training_params,
)

logger = logging.getLogger(__name__)

_BAD_NAME_CHARS = re.compile(r"[^\w\-./ ]")


def sanitize_name(name: Any) -> str:
    """A metric or param name MLflow accepts everywhere: other characters become "_", no empty path parts."""
    parts = [p for p in _BAD_NAME_CHARS.sub("_", str(name)).split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "_"


def _env_tags() -> dict[str, str]:
    raw = os.environ.get("MLFLOW_TAGS", "").strip()
    if not raw:
        return {}
    try:
        tags = json.loads(raw)
    except ValueError:
        tags = None
    if not isinstance(tags, Mapping):
        raise ValueError(f"environment variable MLFLOW_TAGS={raw!r}: expected a JSON object, e.g. '{{\"team\": \"nlp\"}}'")
    return {str(k): str(v) for k, v in tags.items()}


def _expand_json_params(params: Mapping[str, Any], flatten: bool) -> dict[str, Any]:
    """Redact inside JSON-encoded dict values (e.g. ``extra``) too, and spread them out when flattening."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        decoded = None
        if isinstance(value, str) and value.startswith("{"):
            try:
                decoded = json.loads(value)
            except ValueError:
                pass
        if isinstance(decoded, Mapping):
            clean = redact(decoded)
            if flatten:
                out.update({f"{key}.{k}": v for k, v in flatten_dict(clean).items()})
            else:
                out[key] = json.dumps(clean, sort_keys=True, default=str)
        else:
            out[key] = value
    return flatten_dict(out) if flatten else out


def _chunks(items: list, size: int):
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


class _RunCloser:
    """Ends a run left open when the callback is collected or the process exits (holds no reference to it)."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id, self.open, self.training = client, run_id, True, False

    def __call__(self) -> None:
        if not self.open:
            return
        self.open = False
        status = "FAILED" if self.training else "FINISHED"
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as error:  # at exit there is nobody left to raise to
            logger.warning("could not mark MLflow run %s as %s: %s", self.run_id, status, error)


class MLflowCallback(TrackerCallback, ExportableState):
    """Logs to MLflow. Only world process zero talks to the server; a broken backend never stops training.

    Resume: the run id is saved in checkpoints (``state()``), so a training resumed from one continues the same run
    (MLFLOW_RUN_ID wins over the checkpoint's id). When reattaching, the highest step already stored per metric is
    read once, and any (metric, step) at or below it is skipped: steps a killed run logged past its last checkpoint
    are not logged twice.

    Status: FINISHED at train end; FAILED when the integration is disabled by an error, from ``on_train_error``, or
    when a run still open is collected or the process exits in the middle of training (e.g. train() raised).
    """

    integration_name = "mlflow"
    required_modules = ("mlflow",)
    pip_extra = "mlflow"

    def __init__(self) -> None:
        super().__init__()
        self._resume_run_id: str | None = None
        self._resume_experiment_id: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._initialized = self._disabled = self._owns_run = self._closed = False
        self._client = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._closer: _RunCloser | None = None
        self._finalizer: weakref.finalize | None = None
        self._async_supported = self._async = False
        self._pending: list[concurrent.futures.Future] = []
        self._buffer: list = []
        self._last_send: float | None = None
        self._send_interval = send_interval("mlflow")
        self._logged_upto: dict[str, int] = {}
        self._existing_params: dict[str, str] = {}
        self._warned_keys: set[str] = set()
        self._warned_failure = self._log_artifacts = False
        self._failed_seconds, self._budget = 0.0, 30.0

    # -- checkpointed state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        run_id, experiment_id = self._run_id or self._resume_run_id, self._experiment_id or self._resume_experiment_id
        return {"args": {}, "attributes": {"_resume_run_id": run_id, "_resume_experiment_id": experiment_id}}

    # -- setup -----------------------------------------------------------------------------------------------
    def setup(self, args, state, model, **kwargs) -> None:
        """Open (or reattach to) the run and log the parameters; called once, on world process zero."""
        if env_flag("DISABLE_MLFLOW_INTEGRATION"):
            self._disabled = True
            logger.info("DISABLE_MLFLOW_INTEGRATION is set: nothing is sent to MLflow")
            return
        # Bound how long one call may hold training up; read by mlflow at request time, so set before importing.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        self._budget = env_seconds("FLYTRAIN_TRACKER_TIMEOUT", 30.0)
        self._log_artifacts = env_flag("HF_MLFLOW_LOG_ARTIFACTS")
        flatten = env_flag("MLFLOW_FLATTEN_PARAMS")
        nested = env_flag("MLFLOW_NESTED_RUN")
        tags = _env_tags()

        import mlflow
        from mlflow.utils import validation

        self._max_param_length = validation.MAX_PARAM_VAL_LENGTH
        self._params_per_batch = validation.MAX_PARAMS_TAGS_PER_BATCH
        self._metrics_per_batch = validation.MAX_METRICS_PER_BATCH
        self._uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        self._client = mlflow.MlflowClient(self._uri)
        self._async_supported = "synchronous" in inspect.signature(self._client.log_batch).parameters
        self._async = self._async_supported

        self._open_run(mlflow, args, tags, nested)
        if self._owns_run:
            self._closer = _RunCloser(self._client, self._run_id)
            self._finalizer = weakref.finalize(self, self._closer)
        self._log_params(args, model, flatten)
        logger.info("MLflow run %s (experiment %s) at %s", self._run_id, self._experiment_id, self._uri)

    def _open_run(self, mlflow, args, tags: dict[str, str], nested: bool) -> None:
        env_run_id = os.environ.get("MLFLOW_RUN_ID", "").strip() or None
        for run_id, source in ((env_run_id, "MLFLOW_RUN_ID"), (self._resume_run_id, "checkpoint")):
            if not run_id:
                continue
            run = self._existing_run(run_id)
            if run is not None:
                self._reattach(run, tags)
                return
            if source == "MLFLOW_RUN_ID":
                raise ValueError(f"MLFLOW_RUN_ID={run_id!r}: no such (undeleted) run at {self._uri}")
            logger.warning("The checkpoint's MLflow run %s is not at %s; starting a new run", run_id, self._uri)
        active = mlflow.active_run()
        if active is not None and not nested:
            # A run the user opened: log into it and leave ending it to them.
            self._run_id, self._experiment_id = active.info.run_id, active.info.experiment_id
            self._owns_run = False
            self._set_tags(tags)
            return
        if active is not None:
            tags = {**tags, "mlflow.parentRunId": active.info.run_id}
        try:
            from mlflow.tracking.context.registry import resolve_tags

            tags = resolve_tags(tags)  # user, source: what mlflow.start_run would add
        except Exception as error:  # context detection is a nicety; never a reason to fail
            logger.debug("could not resolve MLflow context tags: %s", error)
        run = self._client.create_run(self._experiment_for_new_run(), run_name=args.run_name, tags=tags)
        self._run_id, self._experiment_id = run.info.run_id, run.info.experiment_id
        self._owns_run = True

    def _existing_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return None if run.info.lifecycle_stage == "deleted" else run

    def _reattach(self, run, tags: dict[str, str]) -> None:
        self._run_id, self._experiment_id = run.info.run_id, run.info.experiment_id
        self._owns_run = True
        if run.info.status != "RUNNING":
            self._client.update_run(self._run_id, status="RUNNING")
        for key in run.data.metrics:
            history = self._client.get_metric_history(self._run_id, key)
            if history:
                self._logged_upto[key] = max(m.step for m in history)
        self._existing_params = dict(run.data.params)
        self._set_tags(tags)
        logger.info("Continuing MLflow run %s (metrics up to steps %s are kept)", self._run_id, self._logged_upto)

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self._client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _experiment_for_new_run(self) -> str:
        from mlflow.exceptions import MlflowException

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
        if not name:
            return os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip() or "0"
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self._client.create_experiment(name)
            except MlflowException:  # created concurrently by another process
                experiment = self._client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(f"MLFLOW_EXPERIMENT_NAME={name!r} names a deleted experiment: restore it or pick another")
        return experiment.experiment_id

    def _log_params(self, args, model, flatten: bool) -> None:
        from mlflow.entities import Param

        params, too_long, changed = {}, [], []
        for key, value in _expand_json_params(training_params(args, model), flatten).items():
            name, text = sanitize_name(key), str(value)
            if len(text) > self._max_param_length:
                too_long.append(name)
            elif name in self._existing_params:
                if self._existing_params[name] != text:
                    changed.append(name)
            else:
                params[name] = text
        if too_long:
            logger.warning(
                "MLflow: parameters %s are longer than MLflow's limit of %d characters and are not logged",
                too_long, self._max_param_length,
            )
        if changed:
            logger.warning("MLflow: parameters %s differ from the continued run's; MLflow keeps the first values", changed)
        for chunk in _chunks([Param(k, v) for k, v in params.items()], self._params_per_batch):
            self._client.log_batch(self._run_id, params=chunk)

    # -- guarded calls ---------------------------------------------------------------------------------------
    def _active(self, args, state, model) -> bool:
        return self._ensure_setup(args, state, model) and not self._disabled and self._run_id is not None

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one MLflow call; a failure drops its data and counts against FLYTRAIN_TRACKER_TIMEOUT."""
        start = time.monotonic()
        try:
            result = fn(*args, **kwargs)
        except Exception as error:
            self._failed(what, error, time.monotonic() - start)
            return None
        self._async = self._async_supported and not self._closed  # healthy (again)
        return result

    def _failed(self, what: str, error: BaseException, seconds: float) -> None:
        self._failed_seconds += seconds
        self._async = False  # log synchronously while failing, so the time it costs is measured
        if self._failed_seconds >= self._budget:
            raise RuntimeError(
                f"MLflow at {self._uri} keeps failing ({what}: {type(error).__name__}: {error}); "
                f"{self._failed_seconds:.1f}s spent in failing calls reached FLYTRAIN_TRACKER_TIMEOUT={self._budget:g}s"
            ) from error
        if not self._warned_failure:
            self._warned_failure = True
            logger.warning(
                "MLflow %s failed (%s: %s); that data is dropped, and MLflow is retried until failing calls "
                "have taken FLYTRAIN_TRACKER_TIMEOUT=%gs in total", what, type(error).__name__, error, self._budget,
            )

    def _reap(self, wait_seconds: float | None = None) -> None:
        """Collect finished asynchronous batches (waiting up to ``wait_seconds`` for all of them)."""
        if not self._pending:
            return
        start = time.monotonic()
        if wait_seconds is None:
            finished = {f: f.done() for f in self._pending}  # one look per future: it may finish meanwhile
            done = [f for f, over in finished.items() if over]
            self._pending = [f for f, over in finished.items() if not over]
        else:
            done, not_done = concurrent.futures.wait(self._pending, timeout=wait_seconds)
            self._pending = list(not_done)
        errors = [f.exception() for f in done if not f.cancelled() and f.exception() is not None]
        waited = time.monotonic() - start
        if self._pending and wait_seconds is not None:
            count, self._pending = len(self._pending), []
            self._failed("flush", TimeoutError(f"{count} metric batches still unconfirmed"), max(waited, self._budget))
        if errors:
            self._failed("asynchronous metric logging", errors[-1], waited if wait_seconds is not None else 0.0)

    def _log_metrics(self, metrics: list) -> None:
        for chunk in _chunks(metrics, self._metrics_per_batch):
            if self._async:
                operations = self._call("log_batch", self._client.log_batch, self._run_id, metrics=chunk, synchronous=False)
                futures = getattr(operations, "_operation_futures", None)
                if isinstance(futures, list):
                    self._pending.extend(futures)
                elif operations is not None:  # an mlflow whose async handles we cannot bound: wait, then go sync
                    self._async_supported = self._async = False
                    self._call("log_batch", operations.wait)
            else:
                extra = {"synchronous": True} if self._async_supported else {}
                self._call("log_batch", self._client.log_batch, self._run_id, metrics=chunk, **extra)

    def flush(self) -> None:
        """Send buffered metrics and wait for them, at most for what is left of FLYTRAIN_TRACKER_TIMEOUT."""
        self._send_buffer()
        self._reap(wait_seconds=max(0.0, self._budget - self._failed_seconds))

    def end_run(self, status: str = "FINISHED") -> None:
        """Flush, then end the run with ``status`` (FINISHED, FAILED or KILLED) if this callback opened it."""
        if self._client is None or self._run_id is None or self._closed:
            return
        error: Exception | None = None
        try:
            self.flush()
        except Exception as flush_error:
            error = flush_error
        self._mark_closed()
        if self._owns_run and error is None:
            self._call("set_terminated", self._client.set_terminated, self._run_id, status)
        if error is not None:
            raise error

    def _mark_closed(self) -> None:
        self._closed, self._async = True, False
        if self._closer is not None:
            self._closer.open = False
        if self._finalizer is not None:
            self._finalizer.detach()

    # -- events ----------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._initialized and (self._closed or (self._resume_run_id and self._resume_run_id != self._run_id)):
            self.end_run("FINISHED")
            self._reset()  # a new train(): a new run, or the checkpoint's
        if self._active(args, state, model) and self._closer is not None:
            self._closer.training = True

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self._active(args, state, model):
            return
        from mlflow.entities import Metric

        self._reap()
        numbers, skipped = numeric_items(logs or {})
        for key in skipped:
            if key not in self._warned_keys:
                self._warned_keys.add(key)
                logger.warning("MLflow: %r=%r is not numeric and is not logged as a metric", key, (logs or {})[key])
        timestamp, step = int(time.time() * 1000), state.global_step
        metrics = []
        for key, value in numbers.items():
            name = sanitize_name(key)
            if step > self._logged_upto.get(name, -1):
                metrics.append(Metric(name, float(value), timestamp, step))
        # Coalesce log events into one batch per FLYTRAIN_MLFLOW_SEND_INTERVAL seconds (default 2): a call costs
        # about the same for 1 or 1,000 metrics.
        # Before a checkpoint (should_save) everything goes out, so a resumed run never misses a step.
        self._buffer.extend(metrics)
        if (control.should_save or control.should_training_stop or send_due(self._last_send, self._send_interval)
                or len(self._buffer) >= self._metrics_per_batch):
            self._send_buffer()

    def _send_buffer(self) -> None:
        if self._buffer:
            metrics, self._buffer = self._buffer, []
            self._log_metrics(metrics)
        self._last_send = time.monotonic()

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self._log_artifacts or not self._active(args, state, model):
            return
        checkpoints = list_checkpoints(args.output_dir)
        if checkpoints:
            self._log_checkpoint(checkpoints[-1])

    def _log_checkpoint(self, folder: str) -> None:
        # the Trainer writes training_args.json redacted, so the folder goes up as it is
        name = os.path.basename(os.path.normpath(folder))
        self._call("log_artifacts", self._client.log_artifacts, self._run_id, folder, artifact_path=name)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._active(args, state, model):
            return
        if self._closer is not None:
            self._closer.training = False
        self.end_run("FINISHED")

    def on_train_error(self, args, state, control, error: BaseException | None = None, **kwargs):
        """Proposed Trainer event (training raised): end the run as FAILED, or KILLED on KeyboardInterrupt."""
        if self._initialized and not self._disabled:
            self.end_run("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def on_integration_error(self, event: str, error: BaseException) -> None:
        """Disabled after an error: end the run as FAILED, unless the backend is already known to be gone."""
        if self._client is None or self._run_id is None or self._closed:
            return
        self._pending = []
        self._mark_closed()
        if self._owns_run and self._failed_seconds < self._budget:
            self._client.set_terminated(self._run_id, "FAILED")
