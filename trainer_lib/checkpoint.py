"""Checkpoint folders: atomic writes, a manifest of checksums, validation, rotation and safe loading.

A folder named ``checkpoint-<step>`` is always complete: it is written under a temporary name, every file is
fsynced, a manifest with each file's size and CRC-32 is written last, and only then is the folder renamed.
Nothing is ever unpickled: weights are safetensors, the rest is JSON or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .versions import FORMAT_VERSION  # defined without torch, for Flyte's cache versions

logger = logging.getLogger(__name__)

PREFIX = "checkpoint"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"  # only for optimizer states that do not fit the tensor + JSON form below
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER = "scheduler.pt"
RNG = "rng_state.pt"
TRAINER_STATE = "trainer_state.json"
LOOP_STATE = "loop_state.json"
ARGS = "training_args.json"


_CHECKPOINT_RE = re.compile(rf"^{PREFIX}-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, partial, damaged or does not fit this run; the message names the file
    and the field."""


# -- writing ---------------------------------------------------------------------------------------------------
@dataclass
class CheckpointPayload:
    """Everything a checkpoint holds, already copied off the live training state."""

    step: int
    weights: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    trainer_state_json: str
    loop_state: dict[str, Any]
    args_json: str
    #: files already laid out in memory (tensorfile images), by file name: written as they are
    images: dict[str, Any] = field(default_factory=dict)
    #: optimizer.json, when the optimizer's tensors come as an image
    optimizer_meta: str | None = None
    #: further small text files by name (the run fingerprint, trainer_lib.identity), covered by the manifest
    texts: dict[str, str] = field(default_factory=dict)


# -- shared (tied) tensors -----------------------------------------------------------------------------------
ALIASES_KEY = "flytrain_aliases"  # safetensors metadata: {"alias": "stored name"} for tied tensors


def split_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store once each, and the names that alias one of them (a tied ``lm_head.weight``).

    safetensors refuses tensors that share memory; a tie is stored once and re-tied on load. Views that overlap
    without being the same view (rare) are stored as separate copies.
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype, tensor.device)
        if key in seen:
            aliases[name] = seen[key]
            continue
        storage = key[0]
        if storage in storages and tensor.numel():
            tensor = tensor.clone()  # another view of memory stored already
        storages.add(storage)
        seen[key] = name
        unique[name] = tensor
    return unique, aliases


def aliases_metadata(aliases: dict[str, str]) -> dict[str, str]:
    metadata = {"format": "pt"}
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    return metadata


def _crc32(path: str) -> str:
    """CRC-32 of a file: catches truncation and flipped bytes at a fraction of a cryptographic hash's cost."""
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems refuse fsync on directories
        pass


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str] | None:
    """The optimizer's tensors by key and the JSON of the rest (param groups, scalars); None for an optimizer
    whose state does not fit that form."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    try:
        for pid, param_state in state["state"].items():
            entry = {}
            for name, value in param_state.items():
                if isinstance(value, torch.Tensor):
                    key = f"{pid}.{name}"
                    tensors[key] = value.detach().contiguous()
                    entry[name] = {"tensor": key}
                else:
                    entry[name] = {"value": _encode(value)}
            entries[str(pid)] = entry
        meta = json.dumps({"param_groups": _encode(state["param_groups"]), "state": entries})
    except (TypeError, KeyError, AttributeError):
        return None
    return tensors, meta


def _save_optimizer_state(state: dict[str, Any], folder: str) -> None:
    """Tensors in safetensors, the rest in JSON: fast to write, nothing to unpickle (else a weights_only pickle)."""
    from safetensors.torch import save_file

    split = split_optimizer_state(state)
    if split is None:  # an unusual optimizer
        torch.save(state, os.path.join(folder, OPTIMIZER))
        return
    tensors, meta = split
    save_file(tensors, os.path.join(folder, OPTIMIZER_TENSORS))
    _write_text(os.path.join(folder, OPTIMIZER_META), meta)


def write_checkpoint(payload: CheckpointPayload, output_dir: str) -> str:
    """Write ``payload`` as ``output_dir/checkpoint-<step>``, atomically; returns the final folder."""
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"{PREFIX}-{payload.step}")
    tmp = os.path.join(output_dir, _temporary_name(str(payload.step)))
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        known = {}
        for name, image in payload.images.items():
            known[name] = {"size": image.size, "crc32": image.write(os.path.join(tmp, name))}  # fsynced
        if payload.weights is not None:
            weights, aliases = split_shared(payload.weights)
            save_file(weights, os.path.join(tmp, WEIGHTS), metadata=aliases_metadata(aliases))
        if payload.optimizer is not None:
            _save_optimizer_state(payload.optimizer, tmp)
        if payload.optimizer_meta is not None:
            _write_text(os.path.join(tmp, OPTIMIZER_META), payload.optimizer_meta)
        torch.save(payload.scheduler, os.path.join(tmp, SCHEDULER))
        torch.save(payload.rng, os.path.join(tmp, RNG))
        _write_text(os.path.join(tmp, TRAINER_STATE), payload.trainer_state_json)
        _write_text(os.path.join(tmp, LOOP_STATE), json.dumps(payload.loop_state, indent=2, sort_keys=True))
        _write_text(os.path.join(tmp, ARGS), payload.args_json)
        for name, text in payload.texts.items():
            _write_text(os.path.join(tmp, name), text)
        files = {}
        for name in sorted(os.listdir(tmp)):
            if name in known:
                files[name] = known[name]
                continue
            path = os.path.join(tmp, name)
            _fsync_file(path)
            files[name] = {"size": os.path.getsize(path), "crc32": _crc32(path)}
        manifest = {"format_version": FORMAT_VERSION, "global_step": payload.step, "files": files}
        _write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_file(os.path.join(tmp, MANIFEST))
        _fsync_dir(tmp)
        if os.path.exists(final):
            # The same step saved again (e.g. a rerun): swap, so a crash never leaves neither version.
            old = final + f".old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


_TEMPORARY = f".tmp-{PREFIX}-"


def _temporary_name(what: str) -> str:
    """A temporary folder's name says who fills it (host, process, thread), so a cleanup can tell whether that
    writer is provably gone: ``.tmp-checkpoint-<what>@<host>@<pid>@<thread>``."""
    host = socket.gethostname().replace("@", "_") or "unknown"
    return f"{_TEMPORARY}{what}@{host}@{os.getpid()}@{threading.get_ident()}"


def _writer_is_gone(name: str) -> bool:
    """True only when the writer of temporary folder ``name`` provably no longer runs: a dead process on this
    host, or a finished thread of this process. Another host's or an unknown writer is left alone."""
    parts = name[len(_TEMPORARY):].rsplit("@", 3)
    if len(parts) != 4 or not parts[2].isdigit() or not parts[3].isdigit():
        return False
    _, host, pid, thread = parts[0], parts[1], int(parts[2]), int(parts[3])
    if host != (socket.gethostname().replace("@", "_") or "unknown"):
        return False
    if pid == os.getpid():
        return not any(t.ident == thread and t.is_alive() for t in threading.enumerate())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def clean_stale_temporaries(output_dir: str) -> list[str]:
    """Remove temporary folders left by writers that crashed in the middle of a checkpoint write (or a deletion);
    never one that a live writer (this process's background thread, another process) is still filling."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in os.listdir(output_dir):
        if name.startswith(_TEMPORARY) and _writer_is_gone(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
            removed.append(name)
    return removed


# -- finding, validating, loading ------------------------------------------------------------------------------
def checkpoint_step(path: str) -> int | None:
    m = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders in ``output_dir``, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        step = checkpoint_step(name)
        if step is not None and os.path.isdir(path):
            found.append((step, path))
    return [p for _, p in sorted(found)]


def validate_checkpoint(path: str, *, verify_checksums: bool = True) -> None:
    """Raise CheckpointError naming the file when ``path`` is not a complete, intact checkpoint."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is not a directory")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path!r} is incomplete: {MANIFEST} is missing")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path!r}: {MANIFEST} is unreadable ({error})") from None
    for required in (WEIGHTS, TRAINER_STATE, LOOP_STATE):
        if required not in files:
            raise CheckpointError(f"checkpoint {path!r}: {MANIFEST} does not list {required}")
    for name, meta in files.items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"checkpoint {path!r} is damaged: {name} is missing")
        size = os.path.getsize(file_path)
        if size != meta.get("size"):
            raise CheckpointError(
                f"checkpoint {path!r} is damaged: {name} has {size} bytes, expected {meta.get('size')}"
            )
        if verify_checksums and _crc32(file_path) != meta.get("crc32"):
            raise CheckpointError(f"checkpoint {path!r} is damaged: {name} does not match its checksum")


def latest_valid_checkpoint(output_dir: str) -> str | None:
    """The newest intact checkpoint in ``output_dir`` (by manifest); damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            validate_checkpoint(path)
        except CheckpointError as error:
            logger.warning("skipping %s", error)
            continue
        return path
    return None


def load_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS) if os.path.isdir(path) else path
    try:
        weights = load_file(file)
        with safe_open(file, framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
    except Exception as error:
        raise CheckpointError(f"cannot read weights {path!r}: {error}") from None
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v in weights and k not in weights for k, v in aliases.items()
    ):
        raise CheckpointError(f"{file}: metadata {ALIASES_KEY} must map new names to stored tensors")
    for alias, stored in aliases.items():
        weights[alias] = weights[stored]  # the tie again: one tensor under both names
    return weights


def rotate_checkpoints(output_dir: str, save_total_limit: int | None, keep: list[str | None],
                       mine: Callable[[str], bool] | None = None) -> list[str]:
    """Delete the oldest checkpoints beyond ``save_total_limit``, never the newest nor any in ``keep``.

    With ``mine`` only the checkpoints it accepts (the current run's) are counted and deleted: rotation never
    touches another run's checkpoints.
    """
    if not save_total_limit:
        return []
    checkpoints = list_checkpoints(output_dir)
    if mine is not None:
        checkpoints = [p for p in checkpoints if mine(p)]
    if len(checkpoints) <= save_total_limit:
        return []
    protected = {os.path.normpath(p) for p in keep if p} | {os.path.normpath(checkpoints[-1])}
    removable = [p for p in checkpoints if os.path.normpath(p) not in protected]
    excess = len(checkpoints) - max(save_total_limit, len([p for p in checkpoints if os.path.normpath(p) in protected]))
    deleted = removable[: max(0, excess)]
    for path in deleted:
        logger.info("Deleting older checkpoint [%s] due to save_total_limit=%s", path, save_total_limit)
        # Rename first: a crash mid-delete leaves a temporary folder (cleaned later), never a partial checkpoint.
        doomed = os.path.join(os.path.dirname(path), _temporary_name(f"deleting-{os.path.basename(path)}"))
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return deleted
