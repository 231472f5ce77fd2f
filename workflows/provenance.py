"""Provenance: where a model came from — code commit, data hashes, config, packages, host, times, and the ids of
the contexts it ran in (Flyte execution, DVC experiment, tracker runs).

The facts go into ``provenance.json`` next to the saved model, into every checkpoint's state (ProvenanceCallback),
and onto the tracker runs as tags. Everything passes through the project's redaction: no secret leaves the process.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from trainer_lib import TrainerCallback
from trainer_lib.redaction import redact
from trainer_lib.state import ExportableState

FILE = "provenance.json"
#: tag/param prefix of the facts on tracker runs
TAG_PREFIX = "flytrain."


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_info(path: str = ".") -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git work tree holding ``path``; both None outside one (or without git).

    Dirty means tracked files differ from the commit; untracked files (outputs, caches) do not count.
    """
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "--verify", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def flyte_context() -> dict[str, Any] | None:
    """Execution id / project / domain / task / attempt of the Flyte task this process runs, or None outside one.

    A local ``pyflyte run`` has no execution on a Flyte backend: flytekit names everything "local" there, so the
    ids are None and ``mode`` says "local".
    """
    if "flytekit" not in sys.modules:  # only a Flyte task has imported it; never import flytekit for this
        return None
    try:
        from flytekit.core.context_manager import FlyteContextManager

        state = FlyteContextManager.current_context().execution_state
        params = state.user_space_params if state is not None and state.mode is not None else None
        execution, task = (params.execution_id, params.task_id) if params is not None else (None, None)
    except Exception:  # an unexpected flytekit: provenance is a record, never a reason to fail
        return None
    if execution is None:
        return None
    local = state.is_local_execution() or execution.name == "local"

    def real(value: Any) -> Any:
        return None if local and value == "local" else value

    return {
        "mode": "local" if local else "cluster",
        "execution_id": real(execution.name),
        "project": real(execution.project),
        "domain": real(execution.domain),
        "task": real(getattr(task, "name", None)),
        "attempt": int(os.environ.get("FLYTE_ATTEMPT_NUMBER", "0") or 0),
    }


def dvc_experiment() -> str | None:
    """The experiment's name under ``dvc exp run`` (DVC sets DVC_EXP_NAME for the stages it runs)."""
    return os.environ.get("DVC_EXP_NAME", "").strip() or None


def package_versions(modules: list[str]) -> dict[str, str]:
    """python, torch, flytrain and the packages named by ``modules`` (the trackers in use), where installed."""
    versions = {"python": platform.python_version()}
    for name in dict.fromkeys(["torch", "flytrain", *modules]):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # an import name that differs from its distribution's
            continue
    return versions


def default_run_name(config_hash: str, flyte: dict | None, dvc_exp: str | None) -> str:
    """The DVC experiment name, else the Flyte execution id, else ``mlp-<short config hash>``: never a path."""
    if dvc_exp:
        return dvc_exp
    if flyte and flyte.get("execution_id"):
        return str(flyte["execution_id"])
    return f"mlp-{config_hash[:8]}"


def collect(config, config_hash: str, split_hashes: dict[str, str], tracker_modules: list[str]) -> dict[str, Any]:
    """The facts known before training starts (trackers and the end time are added later)."""
    flyte = flyte_context()
    dvc_exp = dvc_experiment()
    return {
        "git": git_info(os.getcwd()),
        "data": {"split_hashes": dict(split_hashes), "source": config.data.source},
        "config_hash": config_hash,
        "config": config.to_dict(),
        "run_name": config.training.run_name or default_run_name(config_hash, flyte, dvc_exp),
        "packages": package_versions(tracker_modules),
        "host": socket.gethostname(),
        "started_at": now(),
        "ended_at": None,
        "flyte": flyte,
        "dvc": {"experiment": dvc_exp} if dvc_exp else None,
        "trackers": {},
    }


def tracker_runs(callbacks: list) -> dict[str, dict[str, Any]]:
    """The runs of the trackers among ``callbacks``, by name: each one's ``run_reference()`` (MLflow run id +
    experiment + URI, W&B run path, the TensorBoard log dir, the DVCLive folder, the Comet experiment key, ...)."""
    from callbacks._common import TrackerCallback

    runs: dict[str, dict[str, Any]] = {}
    for cb in callbacks:
        reference = cb.run_reference() if isinstance(cb, TrackerCallback) else None
        if reference:
            runs[cb.integration_name] = reference
    return runs


def _without_login(uri: Any) -> Any:
    """A URI without its ``user:password@`` part."""
    if not isinstance(uri, str) or "@" not in uri:
        return uri
    parts = urlsplit(uri)
    if not parts.username and not parts.password:
        return uri
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def clean(facts: dict[str, Any]) -> dict[str, Any]:
    """The facts with every secret-looking key or value redacted and logins cut out of tracking URIs."""
    out = redact(facts)
    for run in (out.get("trackers") or {}).values():
        if isinstance(run, dict) and "tracking_uri" in run:
            run["tracking_uri"] = _without_login(run["tracking_uri"])
    return out


def write(facts: dict[str, Any], folder: str) -> str:
    path = os.path.join(folder, FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean(facts), f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    return path


def read(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def as_tags(facts: dict[str, Any]) -> dict[str, str]:
    """The facts as flat string tags (``flytrain.git.commit`` …) plus MLflow's own git tag; the config is left to
    params. Empty values are left out."""
    flat: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif value is not None:
            flat[TAG_PREFIX + key] = str(value)

    walk({k: v for k, v in clean(facts).items() if k != "config"}, "")
    commit = (facts.get("git") or {}).get("commit")
    if commit:
        flat["mlflow.source.git.commit"] = commit
    return flat


class ProvenanceCallback(TrainerCallback, ExportableState):
    """Keeps the run's facts in every checkpoint's state and tags the tracker runs once training has begun."""

    def __init__(self, facts: dict[str, Any] | None = None) -> None:
        self.facts = dict(facts or {})
        self.first_started_at: str | None = None  # restored from a checkpoint: when the resumed run first started
        self.callbacks: list = []

    def state(self) -> dict:
        facts = clean({**self.facts, "trackers": tracker_runs(self.callbacks)})
        started = self.first_started_at or self.facts.get("started_at")
        return {"args": {}, "attributes": {"first_started_at": started, "checkpoint_provenance": facts}}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.first_started_at:
            self.facts["first_started_at"] = self.first_started_at
        if not state.is_world_process_zero:
            return
        self.facts["trackers"] = tracker_runs(self.callbacks)
        from .registry import tag_tracker_runs

        tag_tracker_runs(self.callbacks, self.facts, strict=bool(getattr(args, "strict_integrations", False)))
