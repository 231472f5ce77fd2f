"""Finished trials of the tuning workflow, kept under ``--workdir`` by what they trained: a re-run reuses them.

Flyte's cache already keys ``train_trial`` on the trial (its number, run fingerprint and the data's content hash), but
a local ``pyflyte run`` executes a map task in one piece and caches whole rounds: after an interruption in the middle
of a round, that round's finished trials would train again. So a trial that finishes with a ``workdir`` also writes
its result and model to ``<workdir>/finished-trials/<digest of its key>/``, and a trial whose key is found there
returns it instead of training. A failed trial leaves nothing (it is tried again). Writes are atomic: the model
folder is renamed into place, then ``result.json`` (the marker of a complete entry) is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

FOLDER = "finished-trials"
RESULT = "result.json"


def location(workdir: str, key: str, metric: str, version: str) -> str:
    """Where the trial with this cache key (objective metric, cache version) is kept under ``workdir``."""
    digest = hashlib.sha256(json.dumps([version, key, metric]).encode()).hexdigest()[:24]
    return os.path.join(os.path.abspath(workdir), FOLDER, digest)


def load(path: str, key: str) -> dict[str, Any] | None:
    """The kept result (``objective``, ``model`` folder), or None when there is no complete entry for ``key``."""
    try:
        with open(os.path.join(path, RESULT), encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    model = os.path.join(path, "model")
    if not isinstance(result, dict) or result.get("key") != key or not os.path.isdir(model):
        return None
    return {"objective": float(result["objective"]), "model": model}


def save(path: str, key: str, objective: float, model_dir: str) -> str:
    """Keep a finished trial's model and objective; returns the kept model folder."""
    os.makedirs(path, exist_ok=True)
    model, tmp = os.path.join(path, "model"), os.path.join(path, "model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    shutil.rmtree(model, ignore_errors=True)
    os.replace(tmp, model)
    with open(os.path.join(path, RESULT + ".tmp"), "w", encoding="utf-8") as f:
        json.dump({"key": key, "objective": objective}, f)
    os.replace(os.path.join(path, RESULT + ".tmp"), os.path.join(path, RESULT))
    return model
