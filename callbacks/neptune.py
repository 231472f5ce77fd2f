"""Neptune: trainer parameters, metric series against the global step, optionally checkpoints as file sets.

Neptune's own environment configures the run: ``NEPTUNE_PROJECT``, ``NEPTUNE_API_TOKEN``, ``NEPTUNE_MODE``
(async | sync | offline | debug). Offline runs are written under ``./.neptune`` (relative to the working directory)
and sent later with ``neptune sync``.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from ._common import RUN_SUMMARY_KEYS, TrackerCallback, numeric_items, rewrite_logs, training_params

logger = logging.getLogger(__name__)

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
    logs_predict_metrics = True

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
        self._snapshot_dir: str | None = None
        self._uploaded: str | None = None
        self._had_run = False  # a run was opened (run_reference)

    @property
    def run(self):
        """The Neptune run in use (None before setup and after the run was stopped)."""
        return self._run

    def on_init_end(self, args, state, control, **kwargs):
        if self._log_checkpoints == "best" and not args.metric_for_best_model:
            raise ValueError("NeptuneCallback(log_checkpoints='best') needs TrainingArguments.metric_for_best_model")

    def _open(self, args, state, model) -> None:
        if self._stopped and not self._in_train:
            self._run = self._reopen()  # values logged after train end
            return
        if self._given_run is not None:
            self._run, self._owns_run = self._given_run, False
        else:
            self._run, self._owns_run = self._init_run(), True
        self._had_run = True
        try:
            self._run_id = self._run["sys/id"].fetch()
        except Exception:  # offline and debug runs have no server-side id until they are synced
            self._run_id = None
        if self._log_parameters:
            params = {k: _neptune_value(v) for k, v in training_params(args, model).items()}
            self._run[f"{self._namespace}/trainer_parameters"] = params

    def _is_open(self) -> bool:
        return self._run is not None

    def _init_run(self, **extra: Any):
        import neptune

        kwargs = {k: v for k, v in {**self._init_kwargs, **extra}.items() if v is not None}
        return neptune.init_run(**kwargs)

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
        self._owns_run = True
        return self._init_run(
            with_id=self._run_id, capture_stdout=False, capture_stderr=False,
            capture_hardware_metrics=False, capture_traceback=False,
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._stopped = False
        self._uploaded = None
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def _send(self, events: list[tuple[int, dict[str, Any]]]) -> None:
        for step, metrics in events:
            numbers, _ = numeric_items(rewrite_logs(metrics))
            for name, value in numbers.items():
                path = f"{self._namespace}/{name}"
                if name in _SINGLE_VALUES:
                    self._run[path] = value
                else:
                    self._run[path].append(value, step=step)

    def _log_checkpoint(self, args, state, folder: str) -> None:
        if self._log_checkpoints is None:
            return
        name = os.path.basename(folder)
        if self._log_checkpoints == "best":
            best = state.best_model_checkpoint
            if not best or os.path.basename(best) != name or self._uploaded == name:
                return
        path = self._stable_copy(folder, args.output_dir) if args.save_total_limit else folder
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

    def _log_facts(self, tags: dict[str, str], params: dict[str, str], step: int) -> None:
        self._run[f"{self._namespace}/provenance"] = {k: str(v) for k, v in {**tags, **params}.items()}

    def _log_file(self, path: str) -> None:
        self._run[f"{self._namespace}/evaluation/{os.path.basename(path)}"].upload(path)

    def run_reference(self) -> dict[str, Any] | None:
        """The run's id (None for an offline run, which has none until ``neptune sync``)."""
        return {"run_id": self._run_id, "offline": self._run_id is None} if self._had_run else None

    def continue_from(self, reference: dict[str, Any]) -> bool:
        """Reopened by its id after train end, as values logged after training are; an offline run has no id and
        is reported as not continued."""
        self._run_id, self._stopped = reference.get("run_id"), True
        return True

    def _close(self, failed: bool) -> None:
        if self._run is None or not self._owns_run:
            return  # a run passed in by the caller stays open: its owner stops it
        run, self._run = self._run, None
        offline = str(getattr(run, "_mode", "")).lower().endswith("offline")
        run.stop()  # waits until queued operations (and uploads) are written
        self._stopped = True
        if self._snapshot_dir is not None and not offline:
            shutil.rmtree(self._snapshot_dir, ignore_errors=True)
            self._snapshot_dir = None
        elif self._snapshot_dir is not None:
            logger.info("Neptune offline run: checkpoint copies stay in %s until `neptune sync`", self._snapshot_dir)
