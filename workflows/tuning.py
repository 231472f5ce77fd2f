"""Flyte hyperparameter search: rounds of trials, each round a map task over cached trial tasks.

``pyflyte run workflows/tuning.py tuning_workflow --search '{"n_trials": 8, "parallelism": 4}'``

Shape: ``resolve_run`` → ``prepare_data`` → ``start_study`` (an empty Optuna study file, and the parent MLflow run) → ``run_rounds``, a
@dynamic workflow that tells the last round's results to the study file, asks it for the next round's trials and maps
``train_trial`` over them (side by side on a cluster, one after another locally), then calls itself with the new study
file, until the budget is spent → ``finish_study`` (best trial, deck) → ``evaluate_model`` on the best trial's model.
A trial that fails is recorded as failed and the study goes on, unless fewer than ``min_success_ratio`` of a round
succeed. Trials are cached on their inputs (the trial's number and config, the data), and a seeded study proposes the
same trials again, so re-running an interrupted search trains no finished trial twice.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import flytekit
from flytekit import Resources, dynamic, map_task, task, workflow
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from workflows import pipeline
from workflows import search as study_file
from workflows.config import ConfigError, PipelineConfig, SearchConfig, apply_params
from workflows.training import (
    DECK_FIELDS,
    IMAGE,
    _log_to_stderr,
    _resume_point,
    _sigterm_raises,
    evaluate_model,
    flyte_report_to,
    is_recoverable,
    prepare_data,
    resolve_run,
    validated,
)

logger = logging.getLogger("workflows.tuning")

#: bump when the trial task's code changes what a cached trial would have produced
TRIAL_CACHE_VERSION = "1"


@dataclass
class TrialSpec:
    """One proposed trial: its number in the study, its values (JSON of params.yaml keys) and the resulting config."""

    number: int
    params: str
    config: PipelineConfig = field(default_factory=PipelineConfig)
    #: the study's key (its config and search space): groups the trial's tracker runs
    study: str = ""


@dataclass
class TrialResult:
    number: int
    params: str
    objective: float
    config: PipelineConfig = field(default_factory=PipelineConfig)
    model: Optional[FlyteDirectory] = None


class StudyStart(NamedTuple):
    study: FlyteFile
    study_run: str


class BestTrial(NamedTuple):
    config: PipelineConfig
    model: FlyteDirectory
    objective: float
    params: str
    study: FlyteFile


class TuningOutputs(NamedTuple):
    best_params: str
    best_objective: float
    model: FlyteDirectory
    metrics: FlyteDirectory
    test_metrics: dict[str, float]
    study: FlyteFile


# -- helpers ----------------------------------------------------------------------------------------------------
def study_key(config: PipelineConfig, search: SearchConfig) -> str:
    """Names a study by what it searches: the same config and space give the same key (and the same parent run)."""
    relevant = config.to_dict()
    relevant["training"] = {k: v for k, v in relevant["training"].items() if k != "report_to"}
    text = json.dumps({"config": relevant, "search": search.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _uses_mlflow(config: PipelineConfig) -> bool:
    return bool({"mlflow", "dagshub"} & set(config.training.report_to))


def _check(config: PipelineConfig, search: SearchConfig) -> tuple[PipelineConfig, SearchConfig]:
    config = validated(config)
    try:
        search = SearchConfig.from_dict(search.to_dict())
    except ConfigError as error:
        raise ConfigError(f"invalid search: {error}") from None
    if config.training.eval_strategy == "no":
        raise ConfigError(f"training.eval_strategy: a search needs evaluations to score trials ({search.metric}), "
                          "got 'no'")
    return config, search


@contextmanager
def _environment(values: dict[str, str]):
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


def _mlflow_client():
    import mlflow

    return mlflow.MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri())


def _experiment_id(client) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
    if not name:
        return os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip() or "0"
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def open_study_run(key: str, search: SearchConfig) -> str:
    """The parent MLflow run of a study: the one tagged with its key (a re-run continues it), else a new one."""
    client = _mlflow_client()
    experiment = _experiment_id(client)
    found = client.search_runs([experiment], max_results=1,
                              filter_string=f"tags.`flytrain.study` = '{key}' and tags.`flytrain.role` = 'study'")
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment, run_name=f"study-{key[:8]}",
                            tags={"flytrain.study": key, "flytrain.role": "study"})
    from mlflow.entities import Param

    values = {k: v for k, v in search.to_dict().items() if k != "params"}
    values["space"] = json.dumps(search.to_dict()["params"], sort_keys=True)[:6000]
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in values.items()])
    return run.info.run_id


def _trial_environment(trial: TrialSpec, study_run: str) -> dict[str, str]:
    """Tracker settings of one trial: a child of the study's MLflow run, in the study's W&B group."""
    env = {"WANDB_RUN_GROUP": f"study-{trial.study[:8]}"}
    if study_run:
        raw = os.environ.get("MLFLOW_TAGS", "").strip()
        tags = json.loads(raw) if raw else {}
        tags.update({"mlflow.parentRunId": study_run, "flytrain.study": trial.study, "flytrain.trial": str(trial.number)})
        tags.update({f"trial.{k}": json.dumps(v) for k, v in json.loads(trial.params).items()})
        env["MLFLOW_TAGS"] = json.dumps(tags)
    return env


def trial_objective(model_dir: str, metric: str) -> float:
    """The search metric of the trial's last evaluation (validation split)."""
    with open(os.path.join(model_dir, "log_history.json"), encoding="utf-8") as f:
        history = json.load(f)
    values = [entry[metric] for entry in history if metric in entry]
    if not values:
        raise ValueError(f"the trial logged no {metric!r}: it needs evaluations (training.eval_strategy)")
    return float(values[-1])


# -- tasks --------------------------------------------------------------------------------------------------------
@task(container_image=IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def start_study(config: PipelineConfig, search: SearchConfig) -> StudyStart:
    """An empty study file, and the study's parent MLflow run when the config reports to MLflow."""
    config, search = _check(config, search)
    path = os.path.join(flytekit.current_context().working_directory, "study-0.log")
    study_file.create(search, path)
    run_id = open_study_run(study_key(config, search), search) if _uses_mlflow(config) else ""
    return StudyStart(study=FlyteFile(path), study_run=run_id)


@task(
    cache=True,
    cache_version=TRIAL_CACHE_VERSION,
    # where checkpoints go and which parent run links the trial do not change what the trial trains
    cache_ignore_input_vars=("workdir", "study_run"),
    retries=2,
    interruptible=True,
    container_image=IMAGE,
    requests=Resources(cpu="2", mem="2Gi"),
)
def train_trial(trial: TrialSpec, data: FlyteDirectory, metric: str, workdir: str = "", study_run: str = "") -> TrialResult:
    """Train one trial (resuming from its checkpoints, like train_model) and score it on the validation split."""
    _log_to_stderr()
    config = validated(trial.config)
    name = f"trial-{trial.number}"
    sandbox = os.path.join(flytekit.current_context().working_directory, name)  # map subtasks may share one
    run_dir = os.path.join(os.path.abspath(workdir), name) if workdir else os.path.join(sandbox, "run")
    model_dir = os.path.join(sandbox, "model")
    logger.info("%s: training %s", name, trial.params)
    try:
        with _sigterm_raises(), _environment(_trial_environment(trial, study_run)):
            resume = _resume_point(sandbox) or True
            pipeline.train(config, data.download(), os.path.join(run_dir, "checkpoints"), model_dir, resume=resume,
                           report_to=flyte_report_to(config), logging_dir=os.path.join(run_dir, "tensorboard"),
                           run_name=name)
    except BaseException as error:
        logger.warning("%s failed: %s: %s", name, type(error).__name__, error)
        if is_recoverable(error):
            raise FlyteRecoverableException(f"{name} interrupted by {type(error).__name__}: {error}") from error
        raise
    objective = trial_objective(model_dir, metric)
    logger.info("%s: finished, %s=%.6g", name, metric, objective)
    return TrialResult(trial.number, trial.params, objective, trial.config, FlyteDirectory(model_dir))


def _next_study_file(study: FlyteFile, tag: str) -> str:
    return study_file.copy(study.download(), os.path.join(flytekit.current_context().working_directory, f"study-{tag}.log"))


@dynamic(container_image=IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def run_rounds(
    config: PipelineConfig,
    search: SearchConfig,
    data: FlyteDirectory,
    study: FlyteFile,
    asked: list[TrialSpec],
    results: list[Optional[TrialResult]],
    done: list[TrialResult],
    workdir: str,
    study_run: str,
) -> BestTrial:
    """Tell the last round's results, ask for the next round and map the trial task over it; recurse until done."""
    config, search = _check(config, search)
    path = _next_study_file(study, f"{len(done) + len(asked)}")
    if asked:
        scores = {r.number: r.objective for r in results if r is not None}
        study_file.tell(path, [(t.number, scores.get(t.number)) for t in asked])
        succeeded = sum(1 for t in asked if t.number in scores)
        if succeeded < math.ceil(search.min_success_ratio * len(asked)):
            raise RuntimeError(f"only {succeeded} of {len(asked)} trials of the round succeeded "
                               f"(search.min_success_ratio={search.min_success_ratio})")
        done = done + [r for r in results if r is not None]
    proposals = study_file.ask(search, path, search.parallelism)
    if not proposals:
        return finish_study(search=search, study=FlyteFile(path), trials=done, study_run=study_run)
    key = study_key(config, search)
    specs = [TrialSpec(number, json.dumps(values, sort_keys=True), apply_params(config, values), key)
             for number, values in proposals]
    trainer = functools.partial(train_trial, data=data, metric=search.metric, workdir=workdir, study_run=study_run)
    trained = map_task(trainer, concurrency=search.parallelism, min_success_ratio=search.min_success_ratio)(trial=specs)
    return run_rounds(config=config, search=search, data=data, study=FlyteFile(path), asked=specs, results=trained,
                      done=done, workdir=workdir, study_run=study_run)


@task(enable_deck=True, deck_fields=DECK_FIELDS, container_image=IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def finish_study(search: SearchConfig, study: FlyteFile, trials: list[TrialResult], study_run: str) -> BestTrial:
    """The best trial; a "Trials" deck (table and objective charts); best value and params on the parent run."""
    search = SearchConfig.from_dict(search.to_dict())
    path = study.download()
    best = study_file.best(search, path)
    table = study_file.trials(search, path)
    flytekit.Deck("Trials", trials_html(search, table))
    if study_run:
        _close_study_run(study_run, search, best, table)
    chosen = next(t for t in trials if t.number == best["number"])
    logger.info("best trial %d: %s=%.6g %s", chosen.number, search.metric, chosen.objective, chosen.params)
    return BestTrial(chosen.config, chosen.model, chosen.objective, chosen.params, study)


def _close_study_run(run_id: str, search: SearchConfig, best: dict, table: list[dict]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    client = _mlflow_client()
    existing = client.get_run(run_id).data.params
    params = [Param(f"best.{k}", json.dumps(v)) for k, v in best["params"].items()]
    params = [p for p in params if existing.get(p.key, p.value) == p.value]  # a param is written once
    metrics = [Metric(f"best_{search.metric}", best["value"], 0, 0),
               Metric("trials_failed", sum(t["state"] == study_file.FAILED for t in table), 0, 0),
               Metric("trials_complete", sum(t["state"] == study_file.COMPLETE for t in table), 0, 0)]
    client.log_batch(run_id, metrics=metrics, params=params,
                     tags=[RunTag("flytrain.best_trial", str(best["number"]))])
    client.set_terminated(run_id, "FINISHED")


# -- deck ---------------------------------------------------------------------------------------------------------
def _scatter(title: str, x_label: str, points: list[tuple[float, float]], width: int = 420, height: int = 220) -> str:
    """A self-contained SVG scatter chart (no JavaScript, no network)."""
    left, right, top, bottom = 60, 12, 24, 32
    label = html.escape(title)
    svg = [f'<svg class="flytrain-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="{label}"><text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" '
           f'font-family="sans-serif">{label}</text><rect x="{left}" y="{top}" width="{width - left - right}" '
           f'height="{height - top - bottom}" fill="none" stroke="#999"/>']
    points = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

        def sx(x):
            return left + (x - x0) / (x1 - x0) * (width - left - right)

        def sy(y):
            return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

        tick = 'font-size="10" font-family="sans-serif" fill="#444"'
        for y in (y0, y1):
            svg.append(f'<text x="{left - 4}" y="{sy(y) + 3:.1f}" text-anchor="end" {tick}>{y:.4g}</text>')
        for x in (x0, x1):
            svg.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle" {tick}>{x:.4g}</text>')
        svg.append(f'<text x="{width - right}" y="{height - 4}" text-anchor="end" {tick}>{html.escape(x_label)}</text>')
        svg.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#1f77b4"/>' for x, y in points)
    return "".join(svg) + "</svg>"


def trials_html(search: SearchConfig, table: list[dict]) -> str:
    """The Trials deck: one row per trial (values, objective, state) and charts of the objective."""
    keys = list(search.params)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["trial", *keys, search.metric, "state"])
    rows = []
    for t in table:
        value = "" if t["value"] is None else f"{t['value']:.6g}"
        cells = [str(t["number"]), *(html.escape(json.dumps(t["params"].get(k))) for k in keys), value, t["state"]]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    complete = [t for t in table if t["value"] is not None]
    charts = [_scatter(f"{search.metric} by trial", "trial", [(t["number"], t["value"]) for t in complete])]
    numeric = next((k for k in keys if search.params[k].type != "categorical"), None)
    if numeric is not None:
        charts.append(_scatter(f"{search.metric} by {numeric}", numeric,
                               [(float(t["params"][numeric]), t["value"]) for t in complete if numeric in t["params"]]))
    return (f"<h3>{len(table)} trials, {search.direction} {html.escape(search.metric)}</h3>"
            f'<table class="flytrain-trials" border="1"><tr>{head}</tr>{"".join(rows)}</table>' + "".join(charts))


# -- workflow -----------------------------------------------------------------------------------------------------
@workflow
def tuning_workflow(
    config: PipelineConfig = PipelineConfig(), search: SearchConfig = SearchConfig(), workdir: str = ""
) -> TuningOutputs:
    """Search ``search``'s space around ``config``, then evaluate the best trial's model on the test split.

    Args:
        config: the base run config (JSON, or a YAML/JSON file such as params.yaml).
        search: the search space and budget (JSON; defaults to params.yaml's ``search`` section).
        workdir: a folder for the trials' checkpoints (an interrupted trial then resumes from them).
    """
    run = resolve_run(config=config, overrides=[])  # a CSV source addressed by its content, as training_workflow
    data = prepare_data(data=run.config.data, source=run.source)
    started = start_study(config=run.config, search=search)
    best = run_rounds(config=run.config, search=search, data=data, study=started.study, asked=[], results=[], done=[],
                      workdir=workdir, study_run=started.study_run)
    evaluated = evaluate_model(config=best.config, data=data, model=best.model)
    return TuningOutputs(best.params, best.objective, best.model, evaluated.metrics, evaluated.test_metrics, best.study)

