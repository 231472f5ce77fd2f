"""Weights & Biases: config, metrics against the global step, model artifacts; a resumed run continues its W&B run.

Environment: ``WANDB_PROJECT`` (default "flytrain"), ``WANDB_LOG_MODEL`` (false | end | checkpoint),
``WANDB_WATCH`` (false | gradients | parameters | all), ``WANDB_DISABLED`` (true turns the integration off), plus
wandb's own variables (``WANDB_MODE=offline``, ``WANDB_DIR``, ...).

Log events reach wandb in bursts, once per ``FLYTRAIN_WANDB_SEND_INTERVAL`` seconds (2 s, see
``TrackerCallback``), each still its own history row at its own ``train/global_step``. Console capture is
wandb's own choice (``WANDB_CONSOLE``; its default sends each write to the service process as it happens). Its
buffered ``wrap_emu`` mode polls every 0.5 s and ``finish`` waits for that poll on stdout and stderr in turn:
0.4-1 s added to the end of every run. With the default, benchmark row 2 (five trackers, a line per log event)
measured the same ratio with a much shorter end, so it is not forced here.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from trainer_lib.checkpoint import checkpoint_step
from trainer_lib.state import ExportableState

from ._common import (
    RUN_SUMMARY_KEYS,
    TrackerCallback,
    env_choice,
    env_flag,
    rewrite_logs,
    save_model_files,
    training_params,
)

logger = logging.getLogger(__name__)

LOG_MODEL_CHOICES = ("false", "true", "end", "checkpoint")
WATCH_CHOICES = ("false", "gradients", "parameters", "all")


class WandbCallback(TrackerCallback, ExportableState):
    """Logs a training run to W&B. The run id is saved in checkpoints, so resuming continues the same run."""

    integration_name = "wandb"
    required_modules = ("wandb",)
    pip_extra = "wandb"

    def __init__(self) -> None:
        super().__init__()
        # Environment errors surface when the Trainer is built, not in the middle of training.
        self._disabled = env_flag("WANDB_DISABLED")
        log_model = env_choice("WANDB_LOG_MODEL", LOG_MODEL_CHOICES, "false")
        self._log_model = "end" if log_model == "true" else log_model
        self._watch = env_choice("WANDB_WATCH", WATCH_CHOICES, "false")
        self._wandb = None
        self._run = None
        self._owns_run = False
        self._watched = None
        #: id of the W&B run; restored from the checkpoint on resume
        self.run_id: str | None = None
        self._project: str | None = None  # the continued run's project (continue_from)
        self._reference: dict[str, Any] | None = None  # the run's ids, kept after it ends

    def state(self) -> dict:
        return {"args": {}, "attributes": {"run_id": self.run_id}}

    def _open(self, args, state, model) -> None:
        if self._disabled:
            logger.info("WANDB_DISABLED is set: not logging to W&B")
            return
        import wandb

        self._wandb = wandb
        if wandb.run is not None and (self.run_id is None or wandb.run.id == self.run_id):
            self._run, self._owns_run = wandb.run, False  # the user started a run: log into it, leave it open
        else:
            init_args: dict[str, Any] = {"project": self._project or os.environ.get("WANDB_PROJECT") or "flytrain"}
            if args.run_name:
                init_args["name"] = args.run_name
            if self.run_id:
                init_args.update(id=self.run_id, resume="allow")
            self._run, self._owns_run = wandb.init(**init_args), True
        self.run_id = self._run.id
        run = self._run
        self._reference = {"run_id": run.id, "project": run.project,
                           "run_path": "/".join(str(p) for p in (run.entity, run.project, run.id) if p)}
        if not self._continuing:
            self._run.config.update(training_params(args, model), allow_val_change=True)
        self._run.define_metric("train/global_step")
        self._run.define_metric("*", step_metric="train/global_step", step_sync=True)
        if self._watch != "false" and model is not None:
            self._run.watch(model, log=self._watch, log_freq=max(100, int(state.logging_steps)))
            self._watched = model

    def _is_open(self) -> bool:
        return self._run is not None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and not self._initialized:
            self.run_id = None  # a new training is a new run; only a resumed one continues the saved id
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def _send(self, events) -> None:
        for step, logs in events:
            once = {k: v for k, v in logs.items() if k in RUN_SUMMARY_KEYS}
            for key, value in rewrite_logs(once).items():
                self._run.summary[key] = value
            series = rewrite_logs({k: v for k, v in logs.items() if k not in RUN_SUMMARY_KEYS})
            if set(series) - {"train/epoch"}:  # the end-of-training summary leaves only the epoch: no history row
                self._run.log({**series, "train/global_step": step})

    def _log_checkpoint(self, args, state, folder: str) -> None:
        if self._log_model != "checkpoint":
            return
        step = checkpoint_step(os.path.basename(folder))
        metadata = self._numeric_summary()
        metadata["global_step"] = step
        artifact = self._wandb.Artifact(name=f"model-{self._run.id}", type="model", metadata=metadata)
        artifact.add_dir(folder)
        aliases = [f"checkpoint_global_step_{step}"]
        if state.epoch is not None:
            aliases.append(f"epoch_{round(state.epoch, 2)}")
        self._run.log_artifact(artifact, aliases=aliases)

    def _finish(self, args, state, model) -> None:
        if self._log_model in ("end", "checkpoint") and model is not None:
            metadata = self._numeric_summary()
            metadata["global_step"] = state.global_step
            artifact = self._wandb.Artifact(name=f"model-{self._run.id}", type="model", metadata=metadata)
            with tempfile.TemporaryDirectory() as folder:
                artifact.add_dir(save_model_files(model, folder))  # add_dir copies the files into staging
                self._run.log_artifact(artifact, aliases=["final", f"global_step_{state.global_step}"])

    def _numeric_summary(self) -> dict[str, float]:
        summary = dict(self._run.summary) if self._run is not None else {}
        return {
            k: v for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_")
        }

    def _log_facts(self, tags: dict[str, str], params: dict[str, str], step: int) -> None:
        self._run.config.update({**tags, **params}, allow_val_change=True)

    def _log_file(self, path: str) -> None:
        self._run.save(os.path.abspath(path), base_path=os.path.dirname(os.path.abspath(path)), policy="now")

    def run_reference(self) -> dict[str, Any] | None:
        return self._reference

    def continue_from(self, reference: dict[str, Any]) -> bool:
        self.run_id, self._project = reference.get("run_id"), reference.get("project")
        return bool(self.run_id)

    def _close(self, failed: bool) -> None:
        run, self._run = self._run, None
        watched, self._watched = self._watched, None
        if run is None:
            return
        if watched is not None:
            run.unwatch(watched)  # no gradient hooks left on the model once the run is over
        if self._owns_run:
            run.finish(exit_code=1 if failed else 0)
