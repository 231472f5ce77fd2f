"""A search study in the trackers: one parent MLflow run per study, each trial a child run, W&B runs grouped by study.

Shared by ``Trainer.hyperparameter_search`` and the Flyte tuning workflow. The trial's tracker settings travel as
environment variables the tracker callbacks read when a trial's training opens its runs: ``MLFLOW_TAGS`` (the
parent's id as ``mlflow.parentRunId``, ``flytrain.trial`` and ``trial.<key>`` tags) and ``WANDB_RUN_GROUP``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

#: tags that mark a study's parent run and name its study
STUDY_TAG, ROLE_TAG, TRIAL_TAG, BEST_TAG = "flytrain.study", "flytrain.role", "flytrain.trial", "flytrain.best_trial"


def mlflow_client():
    import mlflow

    return mlflow.MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri())


def _experiment_id(client) -> str:
    """The experiment the tracker callback would use (MLFLOW_EXPERIMENT_NAME, else _ID, else the default)."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
    if not name:
        return os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip() or "0"
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def open_study_run(study: str, params: Mapping[str, Any], run_name: str | None = None) -> str:
    """The parent MLflow run of ``study``: the one tagged with it (a re-run continues it), else a new one."""
    from mlflow.entities import Param

    client = mlflow_client()
    experiment = _experiment_id(client)
    found = client.search_runs([experiment], max_results=1,
                              filter_string=f"tags.`{STUDY_TAG}` = '{study}' and tags.`{ROLE_TAG}` = 'study'")
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment, run_name=run_name or f"study-{study[:8]}",
                            tags={STUDY_TAG: study, ROLE_TAG: "study"})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run.info.run_id


def close_study_run(run_id: str, metric: str, best_number: int, best_value: float, best_params: Mapping[str, Any],
                    counts: Mapping[str, int], status: str | None = "FINISHED") -> None:
    """The best trial on the parent run: ``best_<metric>``, ``best.<key>`` params, counts, the best trial's number."""
    from mlflow.entities import Metric, Param, RunTag

    client = mlflow_client()
    existing = client.get_run(run_id).data.params
    params = [Param(f"best.{k}", json.dumps(v)) for k, v in best_params.items()]
    params = [p for p in params if existing.get(p.key, p.value) == p.value]  # a param is written once
    metrics = [Metric(f"best_{metric}", float(best_value), 0, 0)]
    metrics += [Metric(name, float(value), 0, 0) for name, value in counts.items()]
    client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag(BEST_TAG, str(best_number))])
    if status:
        client.set_terminated(run_id, status)


def end_study_run(run_id: str, status: str) -> None:
    mlflow_client().set_terminated(run_id, status)


def trial_environment(study: str, number: int, params: Mapping[str, Any], parent_run: str = "",
                      group: str | None = None) -> dict[str, str]:
    """Tracker settings of one trial: a child of ``parent_run`` in MLflow (when given), in the study's W&B group."""
    env = {"WANDB_RUN_GROUP": group or f"study-{study[:8]}"}
    if parent_run:
        raw = os.environ.get("MLFLOW_TAGS", "").strip()
        tags = json.loads(raw) if raw else {}
        tags.update({"mlflow.parentRunId": parent_run, STUDY_TAG: study, TRIAL_TAG: str(number)})
        tags.update({f"trial.{k}": json.dumps(v) for k, v in params.items()})
        env["MLFLOW_TAGS"] = json.dumps(tags)
    return env


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for one trial (trackers read them at setup) and restore them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
