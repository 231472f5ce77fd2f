"""A search study kept in one file (Optuna's journal): ask for trials, tell their results, read the best.

The Flyte tuning workflow hands this file from round to round (each round copies it, so a Flyte output is never
changed), and ``python -m workflows queue-search`` asks it for the configs it queues as DVC experiments. Trial
values are params.yaml keys (``training.learning_rate``), applied to the run config with ``apply_params``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

from trainer_lib.hpsearch import import_optuna

from .config import SearchConfig

STUDY_NAME = "flytrain"
#: Optuna's own name for a failed trial's state, used in tables and tracker tags
FAILED, COMPLETE = "FAIL", "COMPLETE"


def _storage(path: str):
    optuna = import_optuna()
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(path))


def _quiet() -> None:
    import_optuna().logging.set_verbosity(import_optuna().logging.WARNING)


def create(search: SearchConfig, path: str) -> None:
    """A new, empty study file at ``path``."""
    _quiet()
    if os.path.exists(path):
        os.remove(path)
    import_optuna().create_study(storage=_storage(path), study_name=STUDY_NAME, direction=search.direction)


def copy(source: str, target: str) -> str:
    """Copy a study file (a Flyte input is read-only: each round writes its own)."""
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    shutil.copyfile(source, target)
    return target


def _load(path: str, sampler=None):
    _quiet()
    return import_optuna().load_study(study_name=STUDY_NAME, storage=_storage(path), sampler=sampler)


def _encode(value: Any) -> Any:
    """Optuna keeps scalar choices only; a list (e.g. ``model.hidden_sizes``) travels as its JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _decoded(search: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        spec = search.params[key]
        if spec.type == "categorical":
            value = next(c for c in spec.choices if _encode(c) == value)
        out[key] = value
    return out


def _sampler(search: SearchConfig, n_existing: int):
    """The configured sampler, seeded by the study's size: a round re-creates it, and must not repeat the last one's
    draws, while the same study file always gives the same proposals."""
    samplers = import_optuna().samplers
    seed = search.seed + n_existing
    if search.sampler == "random":
        return samplers.RandomSampler(seed=seed)
    if search.sampler == "grid":
        grid = {k: [_encode(v) for v in values] for k, values in search.grid().items()}
        return samplers.GridSampler(grid, seed=seed)
    # constant_liar: the trials of one round are asked together, before any result, and must not coincide
    return samplers.TPESampler(seed=seed, constant_liar=True)


def _suggest(trial, search: SearchConfig) -> dict[str, Any]:
    for key, spec in search.params.items():
        if spec.type == "categorical":
            trial.suggest_categorical(key, [_encode(c) for c in spec.choices])
        elif spec.type == "int":
            trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        else:
            trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)
    return _decoded(search, trial.params)


def budget(search: SearchConfig) -> int:
    """How many trials the study runs: ``n_trials``, or fewer when the grid is smaller."""
    if search.sampler == "grid":
        return min(search.n_trials, math.prod(len(v) for v in search.grid().values()))
    return search.n_trials


def ask(search: SearchConfig, path: str, count: int) -> list[tuple[int, dict[str, Any]]]:
    """Propose up to ``count`` new trials (they stay RUNNING in the file until told): ``(number, values)``."""
    study = _load(path)
    count = min(count, budget(search) - len(study.trials))
    if count <= 0:
        return []
    study.sampler = _sampler(search, len(study.trials))
    proposals = []
    for _ in range(count):
        trial = study.ask()
        proposals.append((trial.number, _suggest(trial, search)))
    return proposals


def tell(path: str, results: list[tuple[int, float | None]]) -> None:
    """Record each trial's objective; ``None`` records it as failed (the study goes on)."""
    study = _load(path, sampler=import_optuna().samplers.RandomSampler())  # telling never needs the real sampler
    state = import_optuna().trial.TrialState
    for number, value in results:
        if value is None or not math.isfinite(value):
            study.tell(number, state=state.FAIL)
        else:
            study.tell(number, value)


def n_trials(path: str) -> int:
    return len(_load(path).trials)


def trials(search: SearchConfig, path: str) -> list[dict[str, Any]]:
    """Every trial: ``number``, ``params`` (decoded), ``value`` (None unless complete) and ``state``."""
    out = []
    for t in _load(path).trials:
        out.append({"number": t.number, "params": _decoded(search, t.params), "value": t.value, "state": t.state.name})
    return out


def best(search: SearchConfig, path: str) -> dict[str, Any]:
    """The best complete trial (ties: the earliest); a ValueError when no trial completed."""
    done = [t for t in trials(search, path) if t["state"] == COMPLETE]
    if not done:
        raise ValueError("no trial of the study completed: there is no best trial")
    sign = -1 if search.direction == "maximize" else 1
    return min(done, key=lambda t: (sign * t["value"], t["number"]))


def dvc_queue_commands(search: SearchConfig, study_path: str) -> list[list[str]]:
    """One ``dvc exp run --queue -S key=value ...`` per trial of the budget, asked from a new study at ``study_path``.

    The whole budget is asked at once (a queue gives the sampler no results): ``random`` and ``grid`` behave as in the
    Flyte workflow, ``tpe`` proposes like ``random`` (its first trials are random anyway).
    """
    create(search, study_path)
    commands = []
    for _, values in ask(search, study_path, budget(search)):
        command = ["dvc", "exp", "run", "--queue"]
        for key, value in values.items():
            command += ["-S", f"{key}={json.dumps(value)}"]  # JSON is YAML: dvc parses lists and numbers back
        commands.append(command)
    return commands
