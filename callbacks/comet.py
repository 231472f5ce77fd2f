"""Comet ML: parameters, metrics against the global step, optionally the output folder as assets.

Environment: ``COMET_MODE`` (online | offline | get | create | get_or_create | disabled; unset: Comet's own
configuration decides), ``COMET_PROJECT_NAME``, ``COMET_OFFLINE_DIRECTORY`` (where offline archives go),
``COMET_LOG_ASSETS`` (true: upload ``output_dir`` at train end), plus Comet's own variables (``COMET_API_KEY``, ...).
The experiment key is saved in checkpoints, so a resumed training continues the same experiment.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

from trainer_lib.state import ExportableState

from ._common import TrackerCallback, env_choice, env_flag, numeric_items, rewrite_logs, training_params

logger = logging.getLogger(__name__)

#: COMET_MODE values: the legacy ones (online / offline / disabled) and comet_ml.start's modes
MODES = ("online", "offline", "disabled", "get", "create", "get_or_create")


class CometCallback(TrackerCallback, ExportableState):
    """Logs a training run to one Comet experiment, ended at train end (offline: written as a zip archive); values
    logged after training reopen it (by its key) and end it again."""

    integration_name = "comet_ml"
    required_modules = ("comet_ml",)
    pip_extra = "comet_ml"
    logs_predict_metrics = True

    def __init__(self) -> None:
        super().__init__()
        # Environment errors surface when the Trainer is built, not in the middle of training.
        self._mode = env_choice("COMET_MODE", MODES, "")
        self._log_assets = env_flag("COMET_LOG_ASSETS")
        self._online: bool | None = {"online": True, "offline": False}.get(self._mode)
        self._experiment = None
        #: key of the Comet experiment; restored from the checkpoint on resume
        self.experiment_key: str | None = None

    def state(self) -> dict:
        return {"args": {}, "attributes": {"experiment_key": self.experiment_key}}

    def _open(self, args, state, model) -> None:
        if self._mode == "disabled":
            logger.info("COMET_MODE=disabled: not logging to Comet")
            return
        import comet_ml

        start_mode = self._mode if self._mode in ("get", "create", "get_or_create") else None
        continuing = self.experiment_key is not None
        if continuing:
            start_mode = "get_or_create"  # a resumed training, or metrics logged after train end
        name = args.run_name if args.run_name and args.run_name != args.output_dir else None
        # Comet names an offline archive <key>-<suffix drawn from the global `random`>, which training seeds: a
        # second archive of the same key (evaluate, resume) could draw the same name and overwrite the first. The
        # suffix is drawn from a fresh seed; the seeded state is put back for what follows.
        seeded = random.getstate()
        random.seed()
        try:
            self._experiment = comet_ml.start(
                project_name=os.environ.get("COMET_PROJECT_NAME") or None,
                experiment_key=self.experiment_key,
                mode=start_mode,
                online=self._online,
                experiment_config=comet_ml.ExperimentConfig(name=name),
            )
        finally:
            random.setstate(seeded)
        self.experiment_key = self._experiment.get_key()
        if not continuing:
            self._experiment.log_parameters(training_params(args, model))
            if model is not None:
                self._experiment.set_model_graph(str(model))

    def _is_open(self) -> bool:
        return self._experiment is not None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and not self._initialized:
            self.experiment_key = None  # a new training is a new experiment; only a resumed one continues
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def _send(self, events: list[tuple[int, dict[str, Any]]]) -> None:
        for step, metrics in events:
            numbers, skipped = numeric_items(rewrite_logs(metrics))
            if skipped:
                logger.debug("Comet: not logging non-numeric values %s", skipped)
            self._experiment.log_metrics(numbers, step=step, epoch=metrics.get("epoch"))

    def _finish(self, args, state, model) -> None:
        if self._log_assets:
            logger.info("Comet: logging %s as assets; this may take a while", args.output_dir)
            self._experiment.log_asset_folder(args.output_dir, step=state.global_step, log_file_name=True, recursive=True)

    def _log_facts(self, tags: dict[str, str], params: dict[str, str], step: int) -> None:
        self._experiment.log_others(tags)
        if params:
            self._experiment.log_parameters(params)

    def _log_file(self, path: str) -> None:
        self._experiment.log_asset(path, file_name=os.path.basename(path))

    def run_reference(self) -> dict[str, Any] | None:
        return {"experiment": self.experiment_key} if self.experiment_key else None  # "key" names read as secrets

    def continue_from(self, reference: dict[str, Any]) -> bool:
        self.experiment_key = reference.get("experiment")
        return bool(self.experiment_key)

    def _close(self, failed: bool) -> None:
        experiment, self._experiment = self._experiment, None
        if experiment is not None:
            experiment.end()
