"""Run identity: a fingerprint of what determines a run's math, and one training per output folder at a time.

Every checkpoint records the fingerprint of the run that wrote it (``run_fingerprint.json``, covered by the
manifest). A checkpoint is only resumed by a run with the same fingerprint, rotation only deletes checkpoints of the
current run, and an exclusive OS lock on the output folder keeps a second training out of it while one is running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import checkpoint as ckpt
from .arguments import TrainingArguments
from .redaction import redact

logger = logging.getLogger(__name__)

FINGERPRINT = "run_fingerprint.json"
LOCK_FILE = ".flytrain.lock"
#: where a checkpoint of another run goes when this run is about to write a checkpoint with the same name
OTHER_RUNS = "other-runs"

IN, OUT = True, False

#: Every TrainingArguments field: IN the fingerprint (it changes the math of the run, so a checkpoint written with
#: another value is another run) or OUT (it only changes how the run is observed, stored, or where it ends, so
#: changing it continues the run). tests/test_identity.py checks that every field is listed here.
ARGUMENT_ROLES: dict[str, tuple[bool, str]] = {
    "output_dir": (OUT, "where the run is stored"),
    "num_train_epochs": (OUT, "where the run ends (a larger value continues it)"),
    "max_steps": (OUT, "where the run ends (a larger value continues it)"),
    "per_device_train_batch_size": (IN, "the batches"),
    "per_device_eval_batch_size": (OUT, "evaluation only"),
    "gradient_accumulation_steps": (IN, "the size of each update"),
    "learning_rate": (IN, "optimiser"),
    "weight_decay": (IN, "optimiser"),
    "adam_beta1": (IN, "optimiser"),
    "adam_beta2": (IN, "optimiser"),
    "adam_epsilon": (IN, "optimiser"),
    "max_grad_norm": (IN, "gradient clipping"),
    "lr_scheduler_type": (IN, "learning-rate schedule"),
    "warmup_steps": (IN, "learning-rate schedule"),
    "warmup_ratio": (IN, "learning-rate schedule"),
    "logging_dir": (OUT, "observation"),
    "logging_strategy": (OUT, "observation"),
    "logging_steps": (OUT, "observation"),
    "logging_first_step": (OUT, "observation"),
    "eval_strategy": (OUT, "observation (evaluation draws no random numbers)"),
    "eval_steps": (OUT, "observation"),
    "eval_delay": (OUT, "observation"),
    "save_strategy": (OUT, "how the run is stored"),
    "save_steps": (OUT, "how the run is stored"),
    "save_total_limit": (OUT, "how the run is stored"),
    "load_best_model_at_end": (OUT, "which checkpoint is loaded at the end, not the trajectory"),
    "metric_for_best_model": (OUT, "which checkpoint is the best, not the trajectory"),
    "greater_is_better": (OUT, "which checkpoint is the best, not the trajectory"),
    "seed": (IN, "initialisation, dropout and data order"),
    "data_seed": (IN, "data order"),
    "report_to": (OUT, "observation"),
    "run_name": (OUT, "observation"),
    "disable_tqdm": (OUT, "observation"),
    "dataloader_num_workers": (OUT, "how batches are loaded, not which"),
    "dataloader_drop_last": (IN, "the batches"),
    "bf16": (IN, "precision"),
    "restore_callback_states_from_checkpoint": (OUT, "what a resume restores, not the run"),
    "strict_integrations": (OUT, "observation"),
    "torch_compile": (IN, "compiled kernels round differently"),
    "async_checkpointing": (OUT, "how the run is stored"),
    "skip_nonfinite_steps": (OUT, "stop or skip at a non-finite step: the steps before it are the same, and a run "
                                  "stopped by one must be resumable with skipping turned on"),
    "use_cpu": (OUT, "where the run executes; checkpoints are device-independent"),
    "extra": (IN, "free-form values whose meaning flytrain cannot know"),
}


class RunLockedError(RuntimeError):
    """Another process trains in this output folder right now."""


def _plain(value: Any) -> Any:
    """A JSON value for ``value`` (enums by value, tuples as lists, anything else by its str)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class RunFingerprint:
    """What determines a run's math: the model, the trajectory-changing arguments, and caller-given parts."""

    parts: dict[str, Any]

    @property
    def digest(self) -> str:
        return _digest(self.parts)

    def to_json(self) -> str:
        return json.dumps({"digest": self.digest, **self.parts}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunFingerprint:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        data.pop("digest", None)
        return cls(data)

    def flat(self) -> dict[str, Any]:
        """Dotted names to values; the training arguments by their own names (``learning_rate``)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            else:
                out[prefix] = value

        for section, value in self.parts.items():
            walk("" if section == "arguments" else section, value)
        return out


def _model_part(model) -> dict[str, Any]:
    params = [[name, list(p.shape), str(p.dtype).replace("torch.", "")] for name, p in model.named_parameters()]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": _plain(config) if isinstance(config, Mapping) else None,
        "parameters": {"count": len(params), "values": sum(math.prod(s) for _, s, _ in params),
                       "layout": _digest(params)},
    }


def fingerprint(model, args: TrainingArguments, *, optimizer=None, lr_scheduler=None,
                extra: Mapping[str, Any] | None = None) -> RunFingerprint:
    """The fingerprint of a run; ``optimizer``/``lr_scheduler`` only when the caller built them (else the
    arguments describe them). Cheap: parameter names/shapes/dtypes, no tensor data, no training data."""
    arguments = {}
    for f in dataclasses.fields(args):
        part_of_run, _ = ARGUMENT_ROLES.get(f.name, (IN, "unclassified: counted in, to be safe"))
        if part_of_run:
            arguments[f.name] = _plain(getattr(args, f.name))
    if args.data_seed is None:  # None means "the seed": the same data order
        arguments["data_seed"] = arguments.get("seed")
    parts: dict[str, Any] = {"model": _model_part(model), "arguments": arguments}
    if optimizer is not None:
        parts["optimizer"] = {"class": type(optimizer).__name__, "defaults": _plain(getattr(optimizer, "defaults", {}))}
    if lr_scheduler is not None:
        parts["scheduler"] = {"class": type(lr_scheduler).__name__}
    if extra:
        parts["extra"] = _plain(dict(extra))
    # written into every checkpoint: credentials (by name, and URL passwords) never are; environment values are not
    # looked up, so the same run has the same fingerprint in any environment
    return RunFingerprint(redact(parts, set()))


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:16] + "…"


def differences(saved: RunFingerprint, current: RunFingerprint) -> list[str]:
    """``name: <saved> in the checkpoint, <current> now`` for each differing part."""
    old, new = saved.flat(), current.flat()
    lines = []
    for name in sorted(set(old) | set(new)):
        if old.get(name, "(absent)") != new.get(name, "(absent)"):
            lines.append(f"{name}: {_short(old.get(name, '(absent)'))} in the checkpoint, "
                         f"{_short(new.get(name, '(absent)'))} now")
    return lines


def read_fingerprint(path: str) -> RunFingerprint | None:
    """The fingerprint a checkpoint folder records; None when it records none or it cannot be read."""
    try:
        with open(os.path.join(path, FINGERPRINT), encoding="utf-8") as f:
            return RunFingerprint.from_json(f.read())
    except (OSError, ValueError):
        return None


def belongs_to(path: str, current: RunFingerprint) -> bool:
    saved = read_fingerprint(path)
    return saved is not None and saved.digest == current.digest


def check_resumable(path: str, current: RunFingerprint, ignore_fingerprint: bool = False) -> None:
    """Refuse (CheckpointError) to resume ``path`` when it belongs to another run, unless told to ignore that."""
    if ignore_fingerprint:
        return
    saved = read_fingerprint(path)
    how = ("to continue it, start with its own settings; to start a new run, use a new output_dir; to fine-tune "
           "from it, pass ignore_fingerprint=True (the current settings then win)")
    if saved is None:
        raise ckpt.CheckpointError(f"checkpoint {path!r} records no run fingerprint ({FINGERPRINT}), so it cannot "
                                   f"be shown to belong to this run; {how}")
    if saved.digest != current.digest:
        raise ckpt.CheckpointError(f"checkpoint {path!r} belongs to another run: "
                                   f"{'; '.join(differences(saved, current))}. {how}")


def split_by_run(paths: list[str], current: RunFingerprint) -> tuple[list[str], list[str]]:
    """(checkpoints of this run, checkpoints of other runs), each in the given order."""
    mine, others = [], []
    for path in paths:
        (mine if belongs_to(path, current) else others).append(path)
    return mine, others


def warn_other_runs(others: list[str], current: RunFingerprint) -> None:
    """One warning naming every checkpoint of another run that was left alone."""
    if not others:
        return
    first = read_fingerprint(others[-1])
    why = "; ".join(differences(first, current)[:3]) if first else f"no {FINGERPRINT}"
    logger.warning("left alone %d checkpoint(s) of other runs in %s: %s (newest differs in: %s)", len(others),
                   os.path.dirname(others[0]) or ".", ", ".join(os.path.basename(p) for p in others), why)


def set_aside_other_run(output_dir: str, step: int, current: RunFingerprint) -> str | None:
    """Move ``checkpoint-<step>`` of another run to ``other-runs/<its digest>/`` before this run writes its own
    checkpoint of that name: a checkpoint of another run is never overwritten. Returns the new place."""
    path = os.path.join(output_dir, f"{ckpt.PREFIX}-{step}")
    if not os.path.isdir(path) or belongs_to(path, current):
        return None
    saved = read_fingerprint(path)
    target = os.path.join(output_dir, OTHER_RUNS, saved.digest[:12] if saved else "unknown")
    os.makedirs(target, exist_ok=True)
    destination = os.path.join(target, os.path.basename(path))
    if os.path.exists(destination):
        destination += f".{time.time_ns()}"
    os.rename(path, destination)
    logger.warning("%s belongs to another run; moved it to %s so this run's checkpoint of that step does not "
                   "replace it", path, destination)
    return destination


# -- one training per output folder ------------------------------------------------------------------------------
_held: dict[str, list] = {}  # real path of a lock file -> [fd, depth]: a process re-entering its own lock
_held_guard = threading.Lock()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, multiprocessing's fork): close the copies of the held lock fds.

    flock belongs to the open file description, which fork shares: a worker that kept its copy would hold the
    folder's lock after its parent was killed. Closing the copy (never LOCK_UN, which would release the parent's
    lock too) leaves the parent the only holder. The child is single-threaded here, so the guard is replaced, not
    taken (a thread of the parent may have held it at the fork). exec'ed children never see the fds (os.open's fds
    are non-inheritable, PEP 446).
    """
    global _held_guard
    _held_guard = threading.Lock()
    for fd, _ in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def folder_lock(folder: str, lock_file: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``flock`` on ``folder/.flytrain.lock``, or on ``lock_file``).

    The kernel drops the lock when the process dies, so a killed run never leaves a stale lock. Re-entrant within
    one process. A second process fails at once with RunLockedError naming the folder and the holder.
    """
    path = os.path.realpath(lock_file or os.path.join(folder, LOCK_FILE))
    with _held_guard:
        entry = _held.get(path)
        if entry is not None:
            entry[1] += 1
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(fd)
                os.close(fd)
                raise RunLockedError(f"{folder} is in use by another training ({holder}); wait for it to end "
                                     "or use another folder") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
            entry = _held[path] = [fd, 1]
    try:
        yield
    finally:
        with _held_guard:
            # not held here: a forked child leaving the parent's block (its copy of the fd was closed at the fork)
            if _held.get(path) is entry:
                entry[1] -= 1
                if entry[1] == 0:
                    del _held[path]
                    os.ftruncate(entry[0], 0)
                    os.close(entry[0])  # releases the lock


def move_aside(paths: list[str], destination: str, reason: str) -> None:
    """Move checkpoint folders into a fresh ``destination``, logging why and where. What an earlier move left there
    is kept, renamed to ``destination.<n>`` (the first free n): set-aside checkpoints belong to other runs, and
    flytrain never deletes another run's checkpoint."""
    if not paths:
        return
    if os.path.lexists(destination):
        n = 1
        while os.path.lexists(f"{destination}.{n}"):
            n += 1
        os.rename(destination, f"{destination}.{n}")
        logger.warning("kept the checkpoints set aside earlier: %s is now %s.%d", destination, destination, n)
    os.makedirs(destination)
    for path in paths:
        os.rename(path, os.path.join(destination, os.path.basename(path)))
    logger.warning("moved %d checkpoint(s) (%s) from %s to %s: %s", len(paths),
                   ", ".join(os.path.basename(p) for p in paths), os.path.dirname(paths[0]), destination, reason)


def with_current_hyperparameters(point, optimizer, lr_scheduler):
    """A ResumePoint with this run's hyperparameters (fine-tuning with ignore_fingerprint): the moments and step
    counts are kept, every param-group setting (lr, betas, eps, weight_decay, …) and the schedule's base rates come
    from the current arguments. The structure was already checked against the live optimizer when it was read."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    groups = [{**saved, **now} for saved, now in zip(point.optimizer["param_groups"], fresh)]
    scheduler = point.scheduler
    current = lr_scheduler.state_dict() if lr_scheduler is not None else {}
    if isinstance(scheduler, dict) and "base_lrs" in current:
        scheduler = {**scheduler, "base_lrs": list(current["base_lrs"])}
    return dataclasses.replace(point, optimizer={**point.optimizer, "param_groups": groups}, scheduler=scheduler)


def attach(checkpointer, current: RunFingerprint, resume_from_checkpoint, ignore_fingerprint: bool) -> None:
    """Tie a Trainer's Checkpointer to this run: its checkpoints record ``current``, rotation and
    ``resume_from_checkpoint=True`` see only this run's checkpoints (the others named in one warning), and an
    explicit checkpoint of another run is refused unless ``ignore_fingerprint``."""
    checkpointer.fingerprint = current
    checkpointer.accept = lambda path: belongs_to(path, current)
    if resume_from_checkpoint is True:
        warn_other_runs(split_by_run(ckpt.list_checkpoints(checkpointer.output_dir), current)[1], current)
    elif resume_from_checkpoint and not ignore_fingerprint:
        path = os.fspath(resume_from_checkpoint)
        if read_fingerprint(path) is None:
            ckpt.validate_checkpoint(path)  # a damaged checkpoint is reported as damaged, not as another run's
        check_resumable(path, current)
