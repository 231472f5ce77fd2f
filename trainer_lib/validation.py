"""Checks of values read from a checkpoint: plain data of the expected shape, in range, or a ``Problem`` naming
the field. Used by trainer_lib.resume before anything is applied."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch

from .state import TrainerState

SCALARS = (bool, int, float, str, type(None))


class Problem(ValueError):
    """A value that does not fit; the message names the field (the caller adds the file)."""


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_like(fresh: Any, value: Any, field: str) -> None:
    """``value`` has the shape and types of ``fresh`` (a live value); numbers are finite. ``fresh`` None accepts
    any plain scalar."""
    if fresh is None:
        if not isinstance(value, SCALARS) and not (isinstance(value, (list, tuple)) and all(
            isinstance(v, SCALARS) for v in value
        )):
            raise Problem(f"{field} must be a plain value, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise Problem(f"{field} must be finite, got {value!r}")
        return
    if isinstance(fresh, bool) or isinstance(fresh, str):
        ok = type(value) is type(fresh)
    elif _is_number(fresh):
        ok = _is_number(value) and math.isfinite(value) and (isinstance(fresh, float) or isinstance(value, int))
    elif isinstance(fresh, (list, tuple)):
        ok = isinstance(value, (list, tuple)) and len(value) == len(fresh)
        if ok:
            for i, (f, v) in enumerate(zip(fresh, value)):
                check_like(f, v, f"{field}[{i}]")
    elif isinstance(fresh, dict):
        ok = isinstance(value, dict) and set(value) == set(fresh)
        if ok:
            for key in fresh:
                check_like(fresh[key], value[key], f"{field}.{key}")
    elif isinstance(fresh, torch.Tensor):
        ok = isinstance(value, torch.Tensor) and value.shape == fresh.shape and value.dtype == fresh.dtype
    else:
        ok = False
    if not ok:
        raise Problem(f"{field}: expected a value like {_describe(fresh)}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    return f"a {type(value).__name__}"


def _int_in(data: dict, name: str, low: int, high: int | None, optional: bool = False) -> None:
    value = data.get(name)
    if value is None and optional:
        return
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise Problem(f"{name} must be an integer in {bound}, got {value!r}")


def _finite(data: dict, name: str, minimum: float | None = None, optional: bool = False) -> None:
    value = data.get(name)
    if value is None and optional:
        return
    if not _is_number(value) or not math.isfinite(value) or (minimum is not None and value < minimum):
        raise Problem(f"{name} must be a finite number{f' >= {minimum}' if minimum is not None else ''}, got {value!r}")


def _flat_dict(value: Any, field: str) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, SCALARS) for k, v in value.items()):
        raise Problem(f"{field} must be an object of plain values")


def check_trainer_state(data: Any, max_steps: int, num_train_epochs: int, updates_per_epoch: int,
                        output_dir: str) -> TrainerState:
    """A TrainerState from ``data`` with every value in range for a run of ``max_steps``; unknown keys ignored."""
    if not isinstance(data, dict):
        raise Problem(f"expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainerState)}
    data = {k: v for k, v in data.items() if k in known}
    _int_in(data, "global_step", 0, max_steps)
    step = data["global_step"]
    epoch = data.get("epoch")
    if epoch is None:
        if step:
            raise Problem(f"epoch is missing at global_step {step}")
    else:
        _finite(data, "epoch", 0)
        if epoch > num_train_epochs or abs(epoch - step / updates_per_epoch) > 1:
            raise Problem(f"epoch {epoch!r} does not fit global_step {step} ({updates_per_epoch} steps per epoch)")
    for name in ("max_steps", "logging_steps", "eval_steps", "save_steps", "num_train_epochs",
                 "num_input_tokens_seen"):
        _int_in(data, name, 0, None, optional=name not in data)
    _int_in(data, "train_batch_size", 1, None, optional=True)
    _finite(data, "total_flos", 0, optional="total_flos" not in data)
    _finite(data, "best_metric", optional=True)
    _int_in(data, "best_global_step", 0, step, optional=True)
    for name in ("is_local_process_zero", "is_world_process_zero", "is_hyper_param_search"):
        if name in data and not isinstance(data[name], bool):
            raise Problem(f"{name} must be true or false, got {data[name]!r}")
    if data.get("trial_name") is not None and not isinstance(data["trial_name"], str):
        raise Problem("trial_name must be a string")
    if data.get("trial_params") is not None:
        _flat_dict(data["trial_params"], "trial_params")
    history = data.get("log_history", [])
    if not isinstance(history, list):
        raise Problem("log_history must be a list")
    for index, entry in enumerate(history):
        _flat_dict(entry, f"log_history[{index}]")
        if "step" in entry and (type(entry["step"]) is not int or not 0 <= entry["step"] <= step):
            raise Problem(f"log_history[{index}].step must be an integer in [0, {step}], got {entry['step']!r}")
    best = data.get("best_model_checkpoint")
    if best is not None:
        # Only a checkpoint of this run's output folder can be the best one: the stored path names the step.
        expected = f"checkpoint-{data.get('best_global_step')}"
        if not isinstance(best, str) or os.path.basename(os.path.normpath(best)) != expected:
            raise Problem(f"best_model_checkpoint must be a folder named {expected}, got {best!r}")
        data["best_model_checkpoint"] = os.path.join(output_dir, expected)
    if not isinstance(data.get("stateful_callbacks", {}), dict):
        raise Problem("stateful_callbacks must be an object")
    return TrainerState(**data)


def check_callback_states(stored: Any) -> None:
    """``{"<class name>": entry or [entry, ...]}`` with entry ``{"args": {...}, "attributes": {...}}``."""
    for name, entries in (stored or {}).items():
        for index, entry in enumerate(entries if isinstance(entries, list) else [entries]):
            field = f"stateful_callbacks.{name}" + (f"[{index}]" if isinstance(entries, list) else "")
            if not isinstance(entry, dict) or not set(entry) <= {"args", "attributes"}:
                raise Problem(f"{field} must be an object with 'args' and 'attributes'")
            for part in ("args", "attributes"):
                if not isinstance(entry.get(part, {}), dict):
                    raise Problem(f"{field}.{part} must be an object")
