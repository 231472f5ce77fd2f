"""Finding and ending MLflow runs outside the callback's lifecycle: the experiment a new run goes to, and the closer
that ends a run left open when the callback is collected or the process exits."""

from __future__ import annotations

import logging
import os

from ._sending import FailureBudget

logger = logging.getLogger("callbacks.mlflow")


def experiment_for_new_run(client) -> str:
    """The experiment a new run goes to: MLFLOW_EXPERIMENT_NAME (created if missing), else MLFLOW_EXPERIMENT_ID, else 0."""
    from mlflow.exceptions import MlflowException

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
    if not name:
        return os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip() or "0"
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # created concurrently by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(f"MLFLOW_EXPERIMENT_NAME={name!r} names a deleted experiment: restore it or pick another")
    return experiment.experiment_id


class RunCloser:
    """Ends a run left open when the callback is collected or the process exits (holds no reference to it); bounded
    by what is left of the failure budget, so a hung server cannot hold the exit up."""

    def __init__(self, client, run_id: str, budget: FailureBudget) -> None:
        self.client, self.run_id, self.budget, self.open, self.training = client, run_id, budget, True, False

    def __call__(self) -> None:
        if not self.open:
            return
        self.open = False
        status = "FAILED" if self.training else "FINISHED"
        try:
            self.budget.call("set_terminated", self.client.set_terminated, self.run_id, status)
        except Exception as error:  # at exit there is nobody left to raise to
            logger.warning("could not mark MLflow run %s as %s: %s", self.run_id, status, error)
