"""Hyperparameter search for the Trainer, with the reference's semantics (``Trainer.hyperparameter_search``).

Each trial re-creates the model with ``model_init``, trains it with the trial's values applied to the
TrainingArguments in its own folder ``<output_dir>/<trial name>`` (so its checkpoints never mix with another
trial's), and reports ``compute_objective`` of each evaluation to the backend (which may prune the trial).
``TrainerState.trial_name``/``trial_params`` are set for callbacks and saved in checkpoints. Optuna is the one
backend; it is imported only when a search runs (``pip install 'flytrain[tune]'``).

Trackers: with an MLflow callback, the search has one parent run (the active run when there is one, else a new run
named after the Optuna study) holding the best value and values at the end, and each trial's run is its child,
tagged with the trial's number and values; W&B runs of a search share the group named after the study.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from . import study_runs
from .arguments import TrainingArguments

if TYPE_CHECKING:
    from .trainer import Trainer

logger = logging.getLogger(__name__)

#: evaluation keys that measure time, not quality: never part of the default objective
_TIMING_SUFFIXES = ("_runtime", "_per_second")


class HPSearchBackend(str, Enum):
    OPTUNA = "optuna"


class BestRun(NamedTuple):
    """The best trial: its id (the trial number as a string), objective value(s) and hyperparameters."""

    run_id: str
    objective: float | list[float]
    hyperparameters: dict[str, Any]
    run_summary: Any | None = None


def default_compute_objective(metrics: dict[str, float]) -> float:
    """The evaluation loss when no other metric is reported, else the sum of the other metrics (the reference's rule)."""
    metrics = dict(metrics)
    loss = metrics.pop("eval_loss", None)
    metrics.pop("epoch", None)
    others = {k: v for k, v in metrics.items() if not k.endswith(_TIMING_SUFFIXES)}
    return loss if not others else float(sum(others.values()))


def default_hp_space_optuna(trial) -> dict[str, Any]:
    """The reference's default space: learning rate, epochs, seed and batch size."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
        "num_train_epochs": trial.suggest_int("num_train_epochs", 1, 5),
        "seed": trial.suggest_int("seed", 1, 40),
        "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [4, 8, 16, 32, 64]),
    }


def import_optuna():
    """optuna, or an ImportError naming the extra that installs it."""
    try:
        import optuna
    except ImportError as error:
        raise ImportError(
            "hyperparameter_search(backend='optuna') needs optuna: pip install 'flytrain[tune]'"
        ) from error
    return optuna


def hp_params(trial) -> dict[str, Any]:
    """The values a trial chose (an Optuna trial's ``params``, or a plain mapping)."""
    if isinstance(trial, dict):
        return dict(trial)
    params = getattr(trial, "params", None)
    if params is None:
        raise TypeError(f"unknown trial type {type(trial).__name__}: expected an optuna trial or a dict")
    return dict(params)


def trial_name(trainer: Trainer, trial) -> str:
    """``hp_name(trial)`` when given, else ``run-<trial number>`` (the reference's folder name for a trial)."""
    if trainer.hp_name is not None:
        return str(trainer.hp_name(trial))
    number = getattr(trial, "number", None)
    return f"run-{number}" if number is not None else "run"


def setup_trial(trainer: Trainer, trial) -> None:
    """Apply a trial to the trainer before it trains: its values on TrainingArguments, its own output folder.

    Values that name no TrainingArguments field are left to ``model_init(trial)`` (e.g. a dropout), as in the
    reference. The arguments are rebuilt, so a value out of range fails here naming the field.
    """
    trainer._trial = trial
    if trial is None:
        return
    base: TrainingArguments = trainer._hp_base_args or trainer.args
    params = trainer.hp_space(trial) if trainer.hp_space is not None and not isinstance(trial, dict) else hp_params(trial)
    values = base.to_dict()
    for key, value in params.items():
        if key not in values or key in ("output_dir", "logging_dir"):
            logger.info("trial value %s=%r is not a TrainingArguments field: left to model_init", key, value)
            continue
        old = values[key]
        if old is not None and not isinstance(old, (list, dict)) and not isinstance(value, type(old)):
            value = type(old)(value)  # e.g. an int epoch count for a float field
        values[key] = value
    name = trial_name(trainer, trial)
    values["output_dir"] = os.path.join(base.output_dir, name)
    values["logging_dir"] = os.path.join(base.logging_dir, name)
    if base.run_name == base.output_dir:  # the default run name follows the trial's folder
        values["run_name"] = name
    trainer.args = TrainingArguments.from_dict(values)
    logger.info("Trial %s: %s", name, hp_params(trial))


def report(trainer: Trainer, metrics: dict[str, float]) -> None:
    """After an evaluation: the objective for the backend, which may prune the trial (raises optuna.TrialPruned)."""
    trial = trainer._trial
    if trial is None or trainer.hp_search_backend is None:
        return
    trainer.objective = trainer.compute_objective(dict(metrics))
    if trainer.hp_search_backend == HPSearchBackend.OPTUNA and hasattr(trial, "report"):
        optuna = import_optuna()
        if not trial.study._is_multi_objective():
            trial.report(trainer.objective, trainer.state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {trainer.state.global_step}")


def _reports_to_mlflow(trainer: Trainer) -> bool:
    callbacks = [cb for cb in trainer.callback_handler.callbacks if getattr(cb, "integration_name", None) == "mlflow"]
    if not callbacks:
        return False
    from callbacks._common import env_flag  # loaded already: an MLflow callback is in use

    return not env_flag("DISABLE_MLFLOW_INTEGRATION")


def _open_parent_run(study, n_trials: int) -> tuple[str, bool]:
    """The search's parent MLflow run: the user's active run, else a new one; and whether the search owns it."""
    import mlflow

    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id, False
    params = {"n_trials": n_trials, "direction": ",".join(d.name.lower() for d in study.directions),
              "sampler": type(study.sampler).__name__}
    return study_runs.open_study_run(study.study_name, params, run_name=study.study_name), True


def _close_parent_run(run_id: str, owned: bool, study) -> None:
    state = import_optuna().trial.TrialState
    counts = {f"trials_{s.name.lower()}": sum(t.state == s for t in study.trials)
              for s in (state.COMPLETE, state.FAIL, state.PRUNED)}
    done = [t for t in study.trials if t.state == state.COMPLETE]
    if len(study.directions) == 1 and done:
        best = study.best_trial
        study_runs.close_study_run(run_id, "objective", best.number, best.value, best.params, counts,
                                   "FINISHED" if owned else None)
    elif owned:
        study_runs.end_study_run(run_id, "FINISHED")


def run_hp_search_optuna(trainer: Trainer, n_trials: int, direction: str | list[str], **kwargs) -> BestRun | list[BestRun]:
    """One Optuna study, trials one after another in this process; ``kwargs`` go to ``optuna.create_study``."""
    optuna = import_optuna()
    timeout = kwargs.pop("timeout", None)
    n_jobs = kwargs.pop("n_jobs", 1)
    gc_after_trial = kwargs.pop("gc_after_trial", False)
    if n_jobs != 1:
        raise ValueError(f"hyperparameter_search: n_jobs={n_jobs}: one Trainer trains one trial at a time (n_jobs=1)")

    directions = direction if isinstance(direction, list) else None
    study = optuna.create_study(direction=None if directions else direction, directions=directions, **kwargs)
    parent, owned = _open_parent_run(study, n_trials) if _reports_to_mlflow(trainer) else ("", False)

    def objective(trial):
        trainer.objective = None
        if trainer.hp_space is not None:
            trainer.hp_space(trial)  # the trial's values, for its tracker tags (asking again returns the same)
        env = study_runs.trial_environment(study.study_name, trial.number, hp_params(trial), parent,
                                           group=study.study_name)
        if parent and not owned:
            env["MLFLOW_NESTED_RUN"] = "true"  # a child of the user's active run, not logged into it
        with study_runs.environment(env):
            trainer.train(trial=trial)
            if trainer.objective is None:  # no evaluation during training
                trainer.objective = trainer.compute_objective(trainer.evaluate())
        return trainer.objective

    try:
        study.optimize(objective, n_trials=n_trials, timeout=timeout, gc_after_trial=gc_after_trial)
    except BaseException:
        if owned:
            study_runs.end_study_run(parent, "FAILED")
        raise
    if parent:
        _close_parent_run(parent, owned, study)
    if directions:
        return [BestRun(str(t.number), t.values, t.params) for t in study.best_trials]
    best = study.best_trial
    return BestRun(str(best.number), best.value, best.params, study)


def hyperparameter_search(
    trainer: Trainer,
    hp_space: Callable | None,
    compute_objective: Callable | None,
    n_trials: int,
    direction: str | list[str],
    backend: str | HPSearchBackend | None,
    hp_name: Callable | None,
    **kwargs: Any,
) -> BestRun | list[BestRun]:
    """The body of ``Trainer.hyperparameter_search``; the trainer's arguments are restored when it ends."""
    if trainer.model_init is None:
        raise RuntimeError("To use hyperparameter search, you need to pass your model through a model_init function.")
    try:
        backend = HPSearchBackend(backend.value if isinstance(backend, HPSearchBackend) else (backend or "optuna"))
    except ValueError:
        raise ValueError(
            f"hyperparameter_search: backend {backend!r} is not supported; use one of {[b.value for b in HPSearchBackend]}"
        ) from None
    directions = direction if isinstance(direction, list) else [direction]
    for value in directions:
        if value not in ("minimize", "maximize"):
            raise ValueError(f"hyperparameter_search: direction must be 'minimize' or 'maximize', got {value!r}")
    trainer.hp_search_backend = backend
    trainer.hp_space = hp_space if hp_space is not None else default_hp_space_optuna
    trainer.hp_name = hp_name
    trainer.compute_objective = compute_objective if compute_objective is not None else default_compute_objective
    trainer._hp_base_args = trainer.args
    try:
        return run_hp_search_optuna(trainer, n_trials, direction, **kwargs)
    finally:
        trainer.args = trainer._hp_base_args
        trainer._hp_base_args = None
        trainer.hp_search_backend = None
        trainer._trial = None


class HyperparameterSearchMixin:
    """``model_init``, ``call_model_init`` and ``hyperparameter_search`` as the reference Trainer has them; mixed
    into Trainer."""

    def _init_hp_search(self) -> None:
        self.hp_search_backend = self.hp_space = self.hp_name = self.objective = self._trial = None
        self._hp_base_args: TrainingArguments | None = None
        self.compute_objective = default_compute_objective

    def call_model_init(self, trial=None) -> torch.nn.Module:
        """``model_init()`` or ``model_init(trial)``, whichever it takes; it must return a torch.nn.Module."""
        takes_trial = len(inspect.signature(self.model_init).parameters) >= 1
        model = self.model_init(trial) if takes_trial else self.model_init()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model_init must return a torch.nn.Module, got {type(model).__name__}")
        return model

    def _reinit_model(self, trial) -> None:
        from .trainer import set_seed  # at call time: trainer imports this module

        set_seed(self.args.seed)  # every trial (and every train() call) starts from the same seeded state
        self.model = self.call_model_init(trial).to(self.device)
        self._wrapped_model = None
        self.optimizer, self.lr_scheduler = None, None
        self.callback_handler.model = self.model

    def hyperparameter_search(
        self,
        hp_space=None,
        compute_objective=None,
        n_trials: int = 20,
        direction: str | list[str] = "minimize",
        backend: str | None = None,
        hp_name=None,
        **kwargs,
    ) -> BestRun | list[BestRun]:
        """Search hyperparameters with Optuna (the reference's API): ``hp_space(trial)`` returns the trial's values,
        ``model_init`` builds each trial's model, ``compute_objective(metrics)`` scores an evaluation (default: the
        loss, or the sum of the other metrics); ``kwargs`` go to ``optuna.create_study`` (sampler, pruner, storage,
        ...) besides ``timeout`` and ``gc_after_trial``. Returns the best run (a list for several directions)."""
        return hyperparameter_search(
            self, hp_space, compute_objective, n_trials, direction, backend, hp_name, **kwargs
        )
