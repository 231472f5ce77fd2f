"""ResumePoint: everything a checkpoint holds, read and checked against the run it is to continue.

Reading a checkpoint is separate from applying it: every file is read and every value is checked (types, ranges,
names, shapes against the live model, optimizer and scheduler) while nothing of the run has changed yet, so a bad
checkpoint is refused whole with a ``CheckpointError`` naming the file and the field, and applying a ResumePoint
cannot fail halfway. Nothing is unpickled beyond ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .checkpoint import CheckpointError
from .state import TrainerState
from .validation import Problem, check_callback_states, check_like, check_trainer_state

LOSS_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
               "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Target:
    """What a checkpoint must fit: the live model, optimizer and scheduler, and this run's step budget."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    max_steps: int
    num_train_epochs: int
    updates_per_epoch: int
    output_dir: str


@dataclass(frozen=True)
class LoopPosition:
    """Where the loop stood: the loss accumulated since the last log, the running total and the last logged step."""

    tr_loss: float
    tr_loss_dtype: str
    total_loss_scalar: float
    globalstep_last_logged: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ResumePoint:
    """A checked checkpoint, ready to apply: nothing in it can fail once it exists."""

    path: str
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    state: TrainerState
    loop: LoopPosition

    @property
    def global_step(self) -> int:
        return self.state.global_step


# -- reading ---------------------------------------------------------------------------------------------------
def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot load {path!r} safely (weights_only): {error}") from None


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list):
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_constant=lambda name: float(name))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from None


def read_optimizer_state(folder: str) -> dict[str, Any]:
    meta_file = os.path.join(folder, ckpt.OPTIMIZER_META)
    if not os.path.isfile(meta_file):
        file = os.path.join(folder, ckpt.OPTIMIZER)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {folder!r}: the optimizer state is missing")
        return _torch_load(file)
    from safetensors.torch import load_file

    meta = _read_json(meta_file)
    try:
        tensors = load_file(os.path.join(folder, ckpt.OPTIMIZER_TENSORS))
    except Exception as error:
        raise CheckpointError(f"checkpoint {folder!r}: cannot read {ckpt.OPTIMIZER_TENSORS} ({error})") from None
    where = os.path.join(folder, ckpt.OPTIMIZER_META)
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict) or "param_groups" not in meta:
        raise CheckpointError(f"{where}: expected an object with 'state' and 'param_groups'")
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in meta["state"].items():
        if not pid.isdigit() or not isinstance(entry, dict):
            raise CheckpointError(f"{where}: state[{pid!r}] must be a parameter number with an object of values")
        values = {}
        for name, item in entry.items():
            if isinstance(item, dict) and set(item) == {"tensor"} and item["tensor"] in tensors:
                values[name] = tensors[item["tensor"]]
            elif isinstance(item, dict) and set(item) == {"value"}:
                values[name] = _decode(item["value"])
            else:
                raise CheckpointError(f"{where}: state[{pid}].{name} names no stored tensor or value")
        state[int(pid)] = values
    return {"state": state, "param_groups": _decode(meta["param_groups"])}


# -- checking each part ------------------------------------------------------------------------------------------
def check_weights(weights: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
    """The same names, shapes and dtypes as the model, finite values, and tied names holding equal values."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: the weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, tensor in expected.items():
        stored = weights[name]
        if stored.shape != tensor.shape or stored.dtype != tensor.dtype:
            raise CheckpointError(
                f"{where}: tensor {name!r} is {stored.dtype} {tuple(stored.shape)}, the model has "
                f"{tensor.dtype} {tuple(tensor.shape)}"
            )
        if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
            raise CheckpointError(f"{where}: tensor {name!r} holds non-finite values (NaN or Inf)")
    _, aliases = ckpt.split_shared(expected)
    for alias, name in aliases.items():  # tied in the model: one value for both names
        if weights[alias] is not weights[name] and not torch.equal(weights[alias], weights[name]):
            raise CheckpointError(f"{where}: {alias!r} is tied to {name!r} in the model but holds other values")


def check_optimizer(state: Any, optimizer: torch.optim.Optimizer, where: str, tensors_where: str | None = None) -> None:
    """Param groups like the live optimizer's (count, sizes, hyperparameter types) and per-parameter state
    whose tensors have their parameter's shape."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list) or not isinstance(
        state.get("state"), dict
    ):
        raise CheckpointError(f"{where}: expected an optimizer state with 'state' and 'param_groups'")
    groups, live = state["param_groups"], optimizer.param_groups
    if len(groups) != len(live):
        raise CheckpointError(f"{where}: param_groups has {len(groups)} groups, the optimizer has {len(live)}")
    params: dict[int, torch.Tensor] = {}
    for index, (group, current) in enumerate(zip(groups, live)):
        field = f"param_groups[{index}]"
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise CheckpointError(f"{where}: {field} must be an object with a 'params' list")
        ids = group["params"]
        if len(ids) != len(current["params"]) or not all(type(i) is int for i in ids):
            raise CheckpointError(
                f"{where}: {field}.params lists {len(ids)} parameters, the optimizer's group has "
                f"{len(current['params'])}"
            )
        for pid, param in zip(ids, current["params"]):
            if pid in params:
                raise CheckpointError(f"{where}: {field}.params repeats parameter {pid}")
            params[pid] = param
        for key, value in current.items():
            if key != "params" and key in group:
                check_like(value, group[key], f"{where}: {field}.{key}")
    tensors_where = tensors_where or where
    for pid, entry in state["state"].items():
        if pid not in params or not isinstance(entry, dict):
            raise CheckpointError(f"{where}: state[{pid!r}] belongs to no parameter of the optimizer")
        for name, value in entry.items():
            field = f"state[{pid}].{name}"
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 and value.shape != params[pid].shape:
                    raise CheckpointError(f"{tensors_where}: {field} has shape {tuple(value.shape)}, its parameter "
                                          f"{tuple(params[pid].shape)}")
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise CheckpointError(f"{tensors_where}: {field} holds non-finite values")
            else:
                check_like(None, value, f"{where}: {field}")


def check_scheduler(state: Any, scheduler: Any, global_step: int, where: str) -> None:
    """The live scheduler's keys and value types; its step count equals the optimizer steps taken."""
    fresh = scheduler.state_dict()
    if not isinstance(state, dict) or set(state) != set(fresh):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{where}: expected the scheduler keys {sorted(fresh)}, found {keys}")
    for key, value in fresh.items():
        check_like(value, state[key], f"{where}: {key}")
    if "last_epoch" in fresh and state["last_epoch"] != global_step:
        raise CheckpointError(
            f"{where}: last_epoch is {state['last_epoch']!r}, but the checkpoint is at step {global_step}"
        )


def check_rng(state: Any, where: str) -> None:
    """Each generator state is tried on a throw-away generator: what restoring accepts, and nothing else."""
    try:
        py, npst = state["python"], state["numpy"]
        random.Random().setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
        keys = npst["keys"]
        if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64 or int(keys.min()) < 0 or int(
            keys.max()) >= 2**32:
            raise ValueError("numpy keys must be 32-bit words")
        np.random.RandomState().set_state(
            (npst["name"], keys.numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
        )
        torch.Generator().set_state(state["cpu"])
        cuda = state.get("cuda", [])
        if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
            raise ValueError("cuda must be a list of byte tensors")
    except Exception as error:  # whatever the generators refuse, named
        raise CheckpointError(f"{where}: not a valid RNG state ({type(error).__name__}: {error})") from None


def restore_rng(state: dict[str, Any]) -> None:
    """Apply a checked RNG state (python, numpy, torch CPU; CUDA when the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as tensors and plain values (weights_only-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check_loop(data: Any, global_step: int, where: str) -> LoopPosition:
    fields = {f.name for f in dataclasses.fields(LoopPosition)}
    if not isinstance(data, dict) or not fields <= set(data):
        raise CheckpointError(f"{where}: expected an object with {sorted(fields)}")
    for name in ("tr_loss", "total_loss_scalar"):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{where}: {name} must be a finite number, got {value!r}")
    if data["tr_loss_dtype"] not in LOSS_DTYPES:
        raise CheckpointError(f"{where}: tr_loss_dtype must be one of {sorted(LOSS_DTYPES)}")
    last = data["globalstep_last_logged"]
    if type(last) is not int or not 0 <= last <= global_step:
        raise CheckpointError(f"{where}: globalstep_last_logged must be an integer in [0, {global_step}], got {last!r}")
    return LoopPosition(float(data["tr_loss"]), data["tr_loss_dtype"], float(data["total_loss_scalar"]), last)


# -- the whole ---------------------------------------------------------------------------------------------------
def read_resume_point(path: str, target: Target) -> ResumePoint:
    """Read and check every part of the checkpoint at ``path`` against ``target``; CheckpointError if anything
    does not fit. Nothing of the run is touched."""
    ckpt.validate_checkpoint(path)
    try:
        return _read(path, target)
    except Problem as problem:  # its message names the file and the field
        raise CheckpointError(str(problem)) from None


def _read(path: str, target: Target) -> ResumePoint:
    def file(name: str) -> str:
        return os.path.join(path, name)

    try:
        raw_state = _read_json(file(ckpt.TRAINER_STATE))
        state = check_trainer_state(raw_state, target.max_steps, target.num_train_epochs, target.updates_per_epoch,
                                    target.output_dir)
        check_callback_states(state.stateful_callbacks)
    except Problem as problem:
        raise CheckpointError(f"{file(ckpt.TRAINER_STATE)}: {problem}") from None
    step = state.global_step
    manifest = _read_json(file(ckpt.MANIFEST))
    if manifest.get("global_step", step) != step or ckpt.checkpoint_step(path) not in (None, step):
        raise CheckpointError(f"{file(ckpt.TRAINER_STATE)}: global_step {step} is not the step of this checkpoint")
    weights = ckpt.load_weights(path)
    check_weights(weights, target.model, file(ckpt.WEIGHTS))
    optimizer = read_optimizer_state(path)
    if os.path.isfile(file(ckpt.OPTIMIZER_META)):
        check_optimizer(optimizer, target.optimizer, file(ckpt.OPTIMIZER_META), file(ckpt.OPTIMIZER_TENSORS))
    else:
        check_optimizer(optimizer, target.optimizer, file(ckpt.OPTIMIZER))
    if not os.path.isfile(file(ckpt.SCHEDULER)) or not os.path.isfile(file(ckpt.RNG)):
        raise CheckpointError(f"checkpoint {path!r}: {ckpt.SCHEDULER} or {ckpt.RNG} is missing")
    scheduler = _torch_load(file(ckpt.SCHEDULER))
    check_scheduler(scheduler, target.scheduler, step, file(ckpt.SCHEDULER))
    rng = _torch_load(file(ckpt.RNG))
    check_rng(rng, file(ckpt.RNG))
    loop = check_loop(_read_json(file(ckpt.LOOP_STATE)), step, file(ckpt.LOOP_STATE))
    return ResumePoint(path, weights, optimizer, scheduler, rng, state, loop)
