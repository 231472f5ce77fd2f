"""Neptune: trainer parameters, metric series against the global step, optionally checkpoints as file sets.

Neptune's own environment configures the run: ``NEPTUNE_PROJECT``, ``NEPTUNE_API_TOKEN``, ``NEPTUNE_MODE``
(async | sync | offline | debug). Offline runs are written under ``./.neptune`` (relative to the working directory)
and sent later with ``neptune sync``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

from trainer_lib.checkpoint import list_checkpoints

from ._common import RUN_SUMMARY_KEYS, TrackerCallback, logger, numeric_items, rewrite_logs, training_params

LOG_CHECKPOINTS = (None, "same", "last", "best")
#: under output_dir: copies of checkpoints that save_total_limit may rotate away before Neptune uploads them
SNAPSHOT_DIR = ".neptune-uploads"
#: logged once per run: assigned as single values instead of appended to a series
_SINGLE_VALUES = {"train/epoch"} | {f"train/{key}" for key in RUN_SUMMARY_KEYS}


def _neptune_value(value: Any) -> Any:
    """A parameter value Neptune accepts: numbers, strings and bools as they are, anything else as text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class NeptuneCallback(TrackerCallback):
    """Logs a training run to a Neptune run under ``base_namespace``; a run created here is stopped at train end.

    ``log_checkpoints``: None (no upload), "same" (every checkpoint), "last" (only the newest one is kept) or
    "best" (only the best one, needs ``metric_for_best_model``). The API token is passed to Neptune, never logged.
    """

    integration_name = "neptune"
    required_modules = ("neptune",)
    pip_extra = "neptune"

    def __init__(
        self,
        *,
        api_token: str | None = None,
        project: str | None = None,
        name: str | None = None,
        base_namespace: str = "finetuning",
        run=None,
        log_parameters: bool = True,
        log_checkpoints: str | None = None,
        **neptune_run_kwargs: Any,
    ) -> None:
        super().__init__()
        if log_checkpoints not in LOG_CHECKPOINTS:
            raise ValueError(f"NeptuneCallback: log_checkpoints must be one of {LOG_CHECKPOINTS}, got {log_checkpoints!r}")
        if not isinstance(base_namespace, str) or not base_namespace.strip("/"):
            raise ValueError(f"NeptuneCallback: base_namespace must be a non-empty string, got {base_namespace!r}")
        self._init_kwargs = {"api_token": api_token, "project": project, "name": name, **neptune_run_kwargs}
        self._namespace = base_namespace.strip("/")
        self._log_parameters = log_parameters
        self._log_checkpoints = log_checkpoints
        self._given_run = run
        self._run = None
        self._owns_run = False
        self._run_id: str | None = None
        self._stopped = False  # the run created here was stopped at train end
        self._warned_offline = False
        self._in_train = False
        self._snapshot_dir: str | None = None
        self._uploaded: str | None = None

    @property
    def run(self):
        """The Neptune run in use (None before setup and after the run was stopped)."""
        return self._run

    def on_init_end(self, args, state, control, **kwargs):
        if self._log_checkpoints == "best" and not args.metric_for_best_model:
            raise ValueError("NeptuneCallback(log_checkpoints='best') needs TrainingArguments.metric_for_best_model")

    def setup(self, args, state, model, **kwargs) -> None:
        if self._given_run is not None:
            self._run, self._owns_run = self._given_run, False
        else:
            self._run, self._owns_run = self._init_run(), True
        try:
            self._run_id = self._run["sys/id"].fetch()
        except Exception:  # offline and debug runs have no server-side id until they are synced
            self._run_id = None
        if self._log_parameters:
            params = {k: _neptune_value(v) for k, v in training_params(args, model).items()}
            self._run[f"{self._namespace}/trainer_parameters"] = params

    def _init_run(self, **extra: Any):
        import neptune

        kwargs = {k: v for k, v in {**self._init_kwargs, **extra}.items() if v is not None}
        return neptune.init_run(**kwargs)

    @contextlib.contextmanager
    def _session(self, args, state, model) -> Iterator[Any]:
        """The run to log into; outside training, a stopped run is reopened for these values and stopped again."""
        if not state.is_world_process_zero:
            run = None
        elif self._run is None and self._stopped:
            run = self._reopen()
        else:
            run = self._run if self._ensure_setup(args, state, model) else None
        try:
            yield run
        finally:
            if run is not None and not self._in_train:
                self._stop()

    def _reopen(self):
        """The run stopped at train end, opened again without monitoring (not possible for offline runs)."""
        if self._run_id is None:
            if not self._warned_offline:
                logger.warning(
                    "Neptune: an offline run cannot be reopened after train end; values logged after training "
                    "(evaluate, predict) are not recorded"
                )
                self._warned_offline = True
            return None
        self._run = self._init_run(
            with_id=self._run_id, capture_stdout=False, capture_stderr=False,
            capture_hardware_metrics=False, capture_traceback=False,
        )
        self._owns_run = True
        return self._run

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._in_train = True
        self._stopped = False
        self._uploaded = None
        self._ensure_setup(args, state, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs:
            self._log_metrics(args, state, model, logs)

    def on_predict(self, args, state, control, metrics, model=None, **kwargs):
        if metrics:
            self._log_metrics(args, state, model, metrics)

    def _log_metrics(self, args, state, model, metrics: dict[str, Any]) -> None:
        with self._session(args, state, model) as run:
            if run is None:
                return
            numbers, _ = numeric_items(rewrite_logs(metrics))
            for name, value in numbers.items():
                path = f"{self._namespace}/{name}"
                if name in _SINGLE_VALUES:
                    run[path] = value
                else:
                    run[path].append(value, step=state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self._log_checkpoints is None or not self._in_train:
            return
        if not self._ensure_setup(args, state, model) or self._run is None:
            return
        checkpoints = list_checkpoints(args.output_dir)
        if not checkpoints:
            return
        newest = checkpoints[-1]
        name = os.path.basename(newest)
        if self._log_checkpoints == "best":
            best = state.best_model_checkpoint
            if not best or os.path.basename(best) != name or self._uploaded == name:
                return
        path = self._stable_copy(newest, args.output_dir) if args.save_total_limit else newest
        if self._log_checkpoints == "same":
            self._run[f"{self._namespace}/checkpoints/{name}"].upload_files(path)
        else:
            from neptune.types import FileSet

            # one slot: assigning a file set replaces the previous checkpoint's files
            self._run[f"{self._namespace}/checkpoints/{self._log_checkpoints}"] = FileSet([path])
            self._run[f"{self._namespace}/checkpoints/{self._log_checkpoints}_step"] = state.global_step
        self._uploaded = name

    def _stable_copy(self, folder: str, output_dir: str) -> str:
        """A copy of ``folder`` that checkpoint rotation cannot delete before Neptune has read it."""
        self._snapshot_dir = os.path.join(output_dir, SNAPSHOT_DIR)
        target = os.path.join(self._snapshot_dir, os.path.basename(folder))
        shutil.copytree(folder, target, dirs_exist_ok=True)
        return target

    def on_train_end(self, args, state, control, **kwargs):
        self._in_train = False
        self._stop()

    def on_integration_error(self, event: str, error: BaseException) -> None:
        self._in_train = False
        self._stop()

    def _stop(self) -> None:
        if self._run is None or not self._owns_run:
            return  # a run passed in by the caller stays open: its owner stops it
        run, self._run = self._run, None
        self._initialized = False
        offline = str(getattr(run, "_mode", "")).lower().endswith("offline")
        run.stop()  # waits until queued operations (and uploads) are written
        self._stopped = True
        if self._snapshot_dir is not None and not offline:
            shutil.rmtree(self._snapshot_dir, ignore_errors=True)
            self._snapshot_dir = None
        elif self._snapshot_dir is not None:
            logger.info("Neptune offline run: checkpoint copies stay in %s until `neptune sync`", self._snapshot_dir)
