"""MLflow integration: params, step metrics and checkpoints of a run that a resumed training continues.

Environment: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_TAGS (JSON object), MLFLOW_NESTED_RUN, MLFLOW_RUN_ID,
MLFLOW_FLATTEN_PARAMS, HF_MLFLOW_LOG_ARTIFACTS, DISABLE_MLFLOW_INTEGRATION, FLYTRAIN_TRACKER_TIMEOUT (seconds a
failing or hung backend may hold the process up in total, at exit included; default 30), MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT (defaults 2 / 5 s).
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import time
import weakref
from typing import Any

from trainer_lib.redaction import mask_urls
from trainer_lib.state import ExportableState

from ._common import (
    TrackerCallback,
    env_flag,
    numeric_items,
    save_model_files,
    training_params,
)
from ._mlflow_names import _chunks, _env_tags, _expand_json_params, params_to_send, sanitize_name
from ._mlflow_runs import RunCloser, experiment_for_new_run

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
#: run artifact folder of the final model's files (HF_MLFLOW_LOG_ARTIFACTS)
FINAL_MODEL_ARTIFACT = "final_model"

class MLflowCallback(TrackerCallback, ExportableState):
    """Logs to MLflow. Only world process zero talks to the server; a broken backend never stops training.

    Metrics are sent in bursts by a background thread (see ``TrackerCallback``), at most MLflow's batch limit per
    request; every call training waits on (opening the run, a checkpoint upload, the final flush, ending the run,
    also at exit) is bounded by what is left of FLYTRAIN_TRACKER_TIMEOUT.

    Resume: the run id is saved in checkpoints (``state()``), so a training resumed from one continues the same run
    (MLFLOW_RUN_ID wins over the checkpoint's id). When reattaching, the highest step already stored per metric is
    read once, and any (metric, step) at or below it is skipped: steps a killed run logged past its last checkpoint
    are not logged twice. Values logged after train end (evaluate) go to the same run.

    Status: FINISHED at train end; FAILED when the integration is disabled by an error, from ``on_train_error``, or
    when a run still open is collected or the process exits in the middle of training (e.g. train() raised);
    KILLED on KeyboardInterrupt.
    """

    integration_name = "mlflow"
    required_modules = ("mlflow",)
    pip_extra = "mlflow"
    background_sends = True

    def __init__(self) -> None:
        super().__init__()
        self._resume_run_id: str | None = None
        self._resume_experiment_id: str | None = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._previous_run: str | None = None
        self._client = None
        self._disabled = False
        self._closer: RunCloser | None = None
        self._warned_keys: set[str] = set()
        self._killed = False
        self._continue_uri: str | None = None  # the reference's tracking URI (continue_from)

    # -- checkpointed state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        run_id, experiment_id = self._run_id or self._resume_run_id, self._experiment_id or self._resume_experiment_id
        return {"args": {}, "attributes": {"_resume_run_id": run_id, "_resume_experiment_id": experiment_id}}

    # -- the run ---------------------------------------------------------------------------------------------
    def _open(self, args, state, model) -> None:
        """Open (or reattach to) the run and log the parameters; called once per session, on world process zero."""
        self._disabled = env_flag("DISABLE_MLFLOW_INTEGRATION")
        if self._disabled:
            logger.info("DISABLE_MLFLOW_INTEGRATION is set: nothing is sent to MLflow")
            return
        # Bound how long one call may hold training up; read by mlflow at request time, so set before importing.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        import mlflow
        from mlflow.utils import validation

        self._max_param_length = validation.MAX_PARAM_VAL_LENGTH
        self._params_per_batch = validation.MAX_PARAMS_TAGS_PER_BATCH
        self.max_buffered_values = validation.MAX_METRICS_PER_BATCH
        self._uri = os.environ.get("MLFLOW_TRACKING_URI") or self._continue_uri or mlflow.get_tracking_uri()
        #: the URI as shown in messages: a password in it (http://user:pw@host) is masked
        self._shown_uri = mask_urls(self._uri)
        if self._shown_uri != self._uri:
            # MLflow prints "View run at <host>" with the URI's userinfo when a run ends; its own switch turns
            # that line off, and _close_as shows the link masked instead
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self._budget.what = f"MLflow at {self._shown_uri}"
        self._client = mlflow.MlflowClient(self._uri)
        # this thread waits for each request itself (mlflow's own async queue is drained unbounded at exit)
        self._sync = {"synchronous": True} if "synchronous" in inspect.signature(self._client.log_batch).parameters else {}
        self._log_artifacts = env_flag("HF_MLFLOW_LOG_ARTIFACTS")
        self._run_id = self._experiment_id = None
        self._logged_upto: dict[str, int] = {}
        self._existing_params: dict[str, str] = {}
        self._owns_run = False
        # mlflow's active run is per thread: looked up here, not in the thread the budget runs the call in
        self._budget.call("opening the run", self._open_run, mlflow.active_run(), args, model)
        if self._owns_run:
            self._closer = RunCloser(self._client, self._run_id, self._budget)
            self._closer.training = self._in_train
            weakref.finalize(self, self._closer)
        logger.info("MLflow run %s (experiment %s) at %s", self._run_id, self._experiment_id, self._shown_uri)

    def _is_open(self) -> bool:
        return not self._disabled and self._run_id is not None

    def _open_run(self, active, args, model) -> None:
        tags, nested = _env_tags(), env_flag("MLFLOW_NESTED_RUN")
        env_run_id = os.environ.get("MLFLOW_RUN_ID", "").strip() or None
        previous = None if self._in_train else self._previous_run  # evaluate after train end: the same run
        for run_id, source in ((env_run_id, "MLFLOW_RUN_ID"), (self._resume_run_id, "checkpoint"), (previous, "")):
            if not run_id:
                continue
            run = self._existing_run(run_id)
            if run is not None:
                self._reattach(run, tags)
                break
            if source == "MLFLOW_RUN_ID":
                raise ValueError(f"MLFLOW_RUN_ID={run_id!r}: no such (undeleted) run at {self._shown_uri}")
            logger.warning("The checkpoint's MLflow run %s is not at %s; starting a new run", run_id, self._shown_uri)
        else:
            self._new_run(active, args, tags, nested)
        if not self._continuing:
            self._log_params(args, model, env_flag("MLFLOW_FLATTEN_PARAMS"))

    def _new_run(self, active, args, tags: dict[str, str], nested: bool) -> None:
        if active is not None and not nested:
            # A run the user opened: log into it and leave ending it to them.
            self._run_id, self._experiment_id = active.info.run_id, active.info.experiment_id
            self._set_tags(tags)
            return
        if active is not None:
            tags = {**tags, "mlflow.parentRunId": active.info.run_id}
        try:
            from mlflow.tracking.context.registry import resolve_tags

            tags = resolve_tags(tags)  # user, source: what mlflow.start_run would add
        except Exception as error:  # context detection is a nicety; never a reason to fail
            logger.debug("could not resolve MLflow context tags: %s", error)
        run = self._client.create_run(experiment_for_new_run(self._client), run_name=args.run_name, tags=tags)
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

    def _log_params(self, args, model, flatten: bool) -> None:
        from mlflow.entities import Param

        params = _expand_json_params(training_params(args, model), flatten)
        new = params_to_send(params, self._existing_params, self._max_param_length)
        for chunk in _chunks([Param(k, v) for k, v in new.items()], self._params_per_batch):
            self._client.log_batch(self._run_id, params=chunk)

    # -- the lifecycle's hooks -------------------------------------------------------------------------------
    def _send(self, events: list[tuple[int, dict[str, Any]]]) -> None:
        """One log_batch per MLflow batch limit (in the sender thread); (metric, step) pairs a continued run already
        holds are skipped."""
        from mlflow.entities import Metric

        timestamp, metrics = int(time.time() * 1000), []
        for step, logs in events:
            numbers, skipped = numeric_items(logs)
            for key in skipped:
                if key not in self._warned_keys:
                    self._warned_keys.add(key)
                    logger.warning("MLflow: %r=%r is not numeric and is not logged as a metric", key, logs[key])
            for key, value in numbers.items():
                name = sanitize_name(key)
                if step > self._logged_upto.get(name, -1):
                    metrics.append(Metric(name, float(value), timestamp, step))
        for chunk in _chunks(metrics, self.max_buffered_values):
            self._client.log_batch(self._run_id, metrics=chunk, **self._sync)

    def _log_checkpoint(self, args, state, folder: str) -> None:
        if not self._log_artifacts:
            return
        # the Trainer writes training_args.json redacted, so the folder goes up as it is
        self.flush()  # the sends before it first, then the upload, bounded like every call training waits on
        name = os.path.basename(os.path.normpath(folder))
        self._guarded("log_artifacts", self._client.log_artifacts, self._run_id, folder, artifact_path=name)
        self._guarded("deleting rotated checkpoints", self._drop_rotated, os.path.dirname(os.path.normpath(folder)))

    def _drop_rotated(self, output_dir: str) -> None:
        """Delete the run's ``checkpoint-*`` artifacts whose folder save_total_limit deleted locally: the run
        keeps what the output folder keeps (also those an earlier, resumed session uploaded)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        gone = [a.path for a in self._client.list_artifacts(self._run_id)
                if a.is_dir and a.path.startswith(CHECKPOINT_PREFIX) and not os.path.isdir(os.path.join(output_dir, a.path))]
        if not gone:
            return
        repo = get_artifact_repository(self._client.get_run(self._run_id).info.artifact_uri, tracking_uri=self._uri)
        for path in gone:
            repo.delete_artifacts(path)
        logger.info("MLflow: deleted the artifacts of %s (rotated away locally by save_total_limit)", gone)

    def _finish(self, args, state, model) -> None:
        """With HF_MLFLOW_LOG_ARTIFACTS: the checkpoints rotated away at the end dropped, the final model's files
        (weights, config) logged under ``final_model/``."""
        if not self._log_artifacts or model is None:
            return
        self._guarded("deleting rotated checkpoints", self._drop_rotated, args.output_dir)
        with tempfile.TemporaryDirectory() as folder:
            save_model_files(model, folder)
            self._guarded("log_artifacts", self._client.log_artifacts, self._run_id, folder,
                          artifact_path=FINAL_MODEL_ARTIFACT)

    # -- after training (the evaluate stage) -----------------------------------------------------------------
    def run_reference(self) -> dict[str, Any] | None:
        if not self._run_id:
            return None
        return {"run_id": self._run_id, "experiment_id": self._experiment_id, "tracking_uri": getattr(self, "_uri", None)}

    def continue_from(self, reference: dict[str, Any]) -> bool:
        self._resume_run_id = reference.get("run_id")
        self._resume_experiment_id = reference.get("experiment_id")
        self._continue_uri = reference.get("tracking_uri")
        return bool(self._resume_run_id)

    def _log_facts(self, tags: dict[str, str], params: dict[str, str], step: int) -> None:
        from mlflow.entities import Param, RunTag

        def log() -> None:
            known = self._client.get_run(self._run_id).data.params
            new = [Param(k, str(v)) for k, v in params.items() if k not in known]
            for chunk in _chunks(new, self._params_per_batch):
                self._client.log_batch(self._run_id, params=chunk)
            for chunk in _chunks([RunTag(k, str(v)[:5000]) for k, v in tags.items()], self._params_per_batch):
                self._client.log_batch(self._run_id, tags=chunk)

        self._guarded("tagging the run", log)

    def _log_file(self, path: str) -> None:
        self._guarded("log_artifact", self._client.log_artifact, self._run_id, path, "evaluation")

    def _guarded(self, what: str, fn, *args, **kwargs) -> None:
        """A call training waits on: a failure is reported and spends budget; a spent budget raises."""
        try:
            self._budget.call(what, fn, *args, **kwargs)
        except Exception as error:
            if self._budget.exhausted:
                raise self._budget.exhausted_error(f"{what}: {type(error).__name__}: {mask_urls(str(error))}") from error
            self._send_failed(what, error, 0.0)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._initialized and self._resume_run_id and self._resume_run_id != self._run_id:
            self._end(failed=False)  # restored from a checkpoint of another run: continue that one
        super().on_train_begin(args, state, control, model=model, **kwargs)
        if self._closer is not None:
            self._closer.training = True

    def on_train_error(self, args, state, control, error: BaseException | None = None, **kwargs):
        """Training raised: send what was logged, end the run as FAILED, or KILLED on KeyboardInterrupt."""
        self._killed = isinstance(error, KeyboardInterrupt)
        super().on_train_error(args, state, control, error=error, **kwargs)

    def end_run(self, status: str = "FINISHED") -> None:
        """Flush, then end the run with ``status`` (FINISHED, FAILED or KILLED) if this callback opened it."""
        try:
            self.flush()
        finally:
            self._close_as(status)
            self._initialized = False

    def _close(self, failed: bool) -> None:
        self._close_as(("KILLED" if self._killed else "FAILED") if failed else "FINISHED")

    def _close_as(self, status: str) -> None:
        closer, self._closer = self._closer, None
        self._previous_run = self._run_id
        if closer is None or not closer.open:
            return
        closer.open = False
        if not self._budget.exhausted:
            self._guarded("set_terminated", self._client.set_terminated, self._run_id, status)
            if self._shown_uri != self._uri and self._shown_uri.startswith("http"):
                # MLflow's own link is switched off for a URI with a password (see setup)
                logger.info("View MLflow run at %s/#/experiments/%s/runs/%s", self._shown_uri.rstrip("/"),
                            self._experiment_id, self._run_id)
