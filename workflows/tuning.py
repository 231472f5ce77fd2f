"""Flyte hyperparameter search: rounds of trials, each round a map task over cached trial tasks.

``pyflyte run workflows/tuning.py tuning_workflow --search '{"n_trials": 8, "parallelism": 4}'``

Shape: ``resolve_run`` → ``prepare_data`` → ``start_study`` (an empty Optuna study file, and the parent MLflow run) → ``run_rounds``, a
@dynamic workflow that tells the last round's results to the study file, asks it for the next round's trials and maps
``train_trial`` over them (side by side on a cluster, one after another locally), then calls itself with the new study
file, until the budget is spent → ``finish_study`` (best trial, deck) → ``evaluate_model`` on the best trial's model.
A trial that fails is recorded as failed and the study goes on, unless fewer than ``min_success_ratio`` of a round
succeed. Trials are cached on their key (the trial's number, its run fingerprint and the data's content hash, as
train_model is), and a seeded study proposes the same trials again, so re-running an interrupted search trains no
finished trial twice; with ``--workdir`` each finished trial is also kept there (workflows/trial_store.py), since a
local map task is cached by whole rounds only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import flytekit
from flytekit import Resources, dynamic, map_task, task, workflow
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from trainer_lib import study_runs
from workflows import flyte_cache, flyte_types, pipeline, trial_store
from workflows import search as study_file
from workflows.config import ConfigError, ParamRange, PipelineConfig, SearchConfig, apply_params
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
TRIAL_CACHE_VERSION = f"{flyte_cache.CACHE_VERSION}-trial2"


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


flyte_types.register(TrialSpec, TrialResult, SearchConfig, ParamRange)  # Flyte types computed once per process


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
    """Names a study by what it searches: the same run fingerprint and space give the same key (and parent run)."""
    text = json.dumps({"config": flyte_cache.run_fingerprint(config), "search": search.to_dict()}, sort_keys=True)
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


def trial_key(number: int, config: PipelineConfig, data_digest: str) -> str:
    """What a trial's cache entry is keyed on: its number, its run fingerprint (observation-only settings such as
    report_to or logging_steps are out) and the prepared data's content hash."""
    return f"{number}-{flyte_cache.run_fingerprint(config)}-{data_digest}"


def _open_study_run(key: str, search: SearchConfig) -> str:
    values = {k: v for k, v in search.to_dict().items() if k != "params"}
    values["space"] = json.dumps(search.to_dict()["params"], sort_keys=True)
    return study_runs.open_study_run(key, values)


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
    run_id = _open_study_run(study_key(config, search), search) if _uses_mlflow(config) else ""
    return StudyStart(study=FlyteFile(path), study_run=run_id)


@task(
    cache=True,
    cache_version=TRIAL_CACHE_VERSION,
    # the key holds what the trial trains (number, run fingerprint, data hash); the full trial (its observation-only
    # settings), the data folder's place, where checkpoints go and the parent run do not change it
    cache_ignore_input_vars=("trial", "data", "workdir", "study_run"),
    retries=2,
    interruptible=True,
    container_image=IMAGE,
    requests=Resources(cpu="2", mem="2Gi"),
)
def train_trial(key: str, trial: TrialSpec, data: FlyteDirectory, metric: str, workdir: str = "",
                study_run: str = "") -> TrialResult:
    """Train one trial (resuming from its checkpoints, like train_model) and score it on the validation split; with
    a ``workdir``, a trial kept there under the same ``key`` is returned without training."""
    _log_to_stderr()
    config = validated(trial.config)
    name = f"trial-{trial.number}"
    kept = trial_store.location(workdir, key, metric, TRIAL_CACHE_VERSION) if workdir else ""
    found = trial_store.load(kept, key) if kept else None
    if found is not None:
        logger.info("%s: finished in an earlier run, reused from %s (%s=%.6g)", name, kept, metric, found["objective"])
        return TrialResult(trial.number, trial.params, found["objective"], trial.config, FlyteDirectory(found["model"]))
    sandbox = os.path.join(flytekit.current_context().working_directory, name)  # map subtasks may share one
    run_dir = os.path.join(os.path.abspath(workdir), name) if workdir else os.path.join(sandbox, "run")
    model_dir = os.path.join(sandbox, "model")
    logger.info("%s: training %s", name, trial.params)
    try:
        env = study_runs.trial_environment(trial.study, trial.number, json.loads(trial.params), study_run)
        with _sigterm_raises(), study_runs.environment(env):
            found, keep = _resume_point(sandbox)  # the previous attempt's checkpoint, kept once accepted
            pipeline.train(config, data.download(), os.path.join(run_dir, "checkpoints"), model_dir,
                           resume=found or True, report_to=flyte_report_to(config),
                           logging_dir=os.path.join(run_dir, "tensorboard"), run_name=name, callbacks=[keep])
    except BaseException as error:
        logger.warning("%s failed: %s: %s", name, type(error).__name__, error)
        if is_recoverable(error):
            raise FlyteRecoverableException(f"{name} interrupted by {type(error).__name__}: {error}") from error
        raise
    objective = trial_objective(model_dir, metric)
    logger.info("%s: finished, %s=%.6g", name, metric, objective)
    if kept:
        model_dir = trial_store.save(kept, key, objective, model_dir)
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
        # a cached result carries the config of the run that trained it: keep this run's (same fingerprint)
        configs = {t.number: t.config for t in asked}
        done = done + [dataclasses.replace(r, config=configs[r.number]) for r in results if r is not None]
    proposals = study_file.ask(search, path, search.parallelism)
    if not proposals:
        return finish_study(search=search, study=FlyteFile(path), trials=done, study_run=study_run)
    key = study_key(config, search)
    specs = [TrialSpec(number, json.dumps(values, sort_keys=True), apply_params(config, values), key)
             for number, values in proposals]
    data_digest = flyte_cache.tree_digest(data.download())
    keys = [trial_key(t.number, t.config, data_digest) for t in specs]
    trainer = functools.partial(train_trial, data=data, metric=search.metric, workdir=workdir, study_run=study_run)
    trained = map_task(trainer, concurrency=search.parallelism, min_success_ratio=search.min_success_ratio)(
        key=keys, trial=specs)
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
    counts = {f"trials_{name}": sum(t["state"] == state for t in table)
              for name, state in (("failed", study_file.FAILED), ("complete", study_file.COMPLETE))}
    study_runs.close_study_run(run_id, search.metric, best["number"], best["value"], best["params"], counts)


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

