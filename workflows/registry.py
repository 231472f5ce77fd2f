"""The pipeline's tracker side beyond the training callbacks: provenance tags and ``data.*`` params on the MLflow
run, the evaluate stage's test metrics in the same MLflow run and TensorBoard log dir, and at the end the MLflow
Model, registered with an alias.

Everything here runs once per stage (never in the training loop) with ``MlflowClient`` on the run id that the
MLflow/DagsHub callback recorded (provenance.json's ``trackers``). A tracker failing here is reported once and the
pipeline goes on, unless ``training.strict_integrations``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from . import provenance

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
CODE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyfunc_model.py")
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: tracker names whose runs live in MLflow
MLFLOW_TRACKERS = ("mlflow", "dagshub")


def _client(run: dict[str, Any]):
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or run.get("tracking_uri") or mlflow.get_tracking_uri()
    return mlflow.MlflowClient(uri), uri


def _mlflow_runs(facts: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    trackers = (facts or {}).get("trackers") or {}
    return [(name, run) for name, run in trackers.items() if name in MLFLOW_TRACKERS and run.get("run_id")]


def _guarded(what: str, strict: bool, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        if strict:
            raise
        logger.warning("%s failed (%s: %s); the pipeline goes on without it", what, type(error).__name__, error)
        return None


def _prepare_credentials(name: str) -> None:
    if name == "dagshub":
        from callbacks.dagshub import configure_mlflow_credentials

        configure_mlflow_credentials()


def tag_tracker_runs(facts: dict[str, Any], strict: bool = False) -> None:
    """Provenance as tags and the data section as ``data.*`` params on each MLflow run of this training."""
    runs = _mlflow_runs(facts)
    if not runs:
        return
    from mlflow.entities import Param, RunTag

    tags = provenance.as_tags(facts)
    params = {f"data.{k}": str(v) for k, v in (facts.get("config") or {}).get("data", {}).items()}
    for _name, run in runs:
        client, _ = _client(run)
        existing = _guarded("MLflow get_run", strict, client.get_run, run["run_id"])
        known = dict(existing.data.params) if existing is not None else {}
        new_params = [Param(k, v) for k, v in params.items() if k not in known]
        _guarded("MLflow tagging the run", strict, client.log_batch, run["run_id"],
                 params=new_params, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])


def report_test_metrics(model_dir: str, metrics: dict[str, float], files: list[str], strict: bool = False) -> None:
    """The evaluate stage's ``test_*`` metrics (at the training's last step) and ``files`` (confusion matrix) into
    the training's MLflow runs."""
    from mlflow.entities import Metric

    facts = provenance.read(model_dir)
    step = int(((facts or {}).get("global_step")) or 0)
    for name, run in _mlflow_runs(facts):
        _prepare_credentials(name)
        client, _ = _client(run)
        stamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        _guarded("MLflow logging test metrics", strict, client.log_batch, run["run_id"], metrics=batch)
        for path in files:
            _guarded("MLflow logging " + os.path.basename(path), strict, client.log_artifact, run["run_id"], path,
                     "evaluation")


def report_to_tensorboard(model_dir: str, metrics: dict[str, float]) -> bool:
    """The provenance (as text) and the test metrics (``test/<name>`` at the training's last step) into the
    training's TensorBoard log dir, when it is on this machine; returns whether it was."""
    facts = provenance.read(model_dir) or {}
    log_dir = ((facts.get("trackers") or {}).get("tensorboard") or {}).get("log_dir")
    if not log_dir or not os.path.isdir(log_dir):
        return False
    from torch.utils.tensorboard import SummaryWriter

    step = int(facts.get("global_step") or 0)
    writer = SummaryWriter(log_dir=log_dir)
    try:
        writer.add_text("provenance", json.dumps({k: v for k, v in facts.items() if k != "config"}, indent=2,
                                                 sort_keys=True), step)
        for key, value in metrics.items():
            writer.add_scalar(key.replace("test_", "test/", 1), value, step)
    finally:
        writer.close()
    return True


def registered_name(config, tracker: str = "mlflow") -> str | None:
    """``model.registered_name``, else MLFLOW_REGISTERED_MODEL_NAME, else (on DagsHub) HF_DAGSHUB_MODEL_NAME, else
    None: nothing is registered."""
    names = [config.model.registered_name, os.environ.get("MLFLOW_REGISTERED_MODEL_NAME", "").strip()]
    if tracker == "dagshub":
        names.append(os.environ.get("HF_DAGSHUB_MODEL_NAME", "").strip())
    return next((n for n in names if n), None)


def log_and_register(config, model_dir: str, example, strict: bool = False) -> list[dict[str, Any]]:
    """Log the final model as an MLflow Model in each MLflow run of its training and register it when a name is
    configured; returns ``{"run_id", "model_uri", "name", "version", "alias"}`` per run."""
    facts = provenance.read(model_dir)
    results = []
    for name, run in _mlflow_runs(facts):
        _prepare_credentials(name)
        result = _guarded("MLflow logging the model", strict, _log_one, config, model_dir, example, facts, run, name)
        if result:
            results.append(result)
    return results


def _log_one(config, model_dir: str, example, facts: dict[str, Any], run: dict[str, Any], tracker: str
             ) -> dict[str, Any]:
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    client, uri = _client(run)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        predicted = _predict_classes(model_dir, example)
        signature = infer_signature(example, predicted)
        with mlflow.start_run(run_id=run["run_id"]):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=CODE_FILE,
                artifacts={"model": model_dir},
                code_paths=[PACKAGE_DIR],
                signature=signature,
                input_example=example,
                pip_requirements=_requirements(),
            )
        result: dict[str, Any] = {"run_id": run["run_id"], "model_uri": info.model_uri}
        name = registered_name(config, tracker)
        if name:
            tags = {k: v[:5000] for k, v in provenance.as_tags(facts).items()}
            tags[provenance.TAG_PREFIX + "run_id"] = run["run_id"]
            version = mlflow.register_model(info.model_uri, name, tags=tags)
            alias = config.model.registered_alias
            client.set_registered_model_alias(name, alias, version.version)
            result.update(name=name, version=int(version.version), alias=alias)
            logger.info("registered %s version %s (@%s) from run %s", name, version.version, alias, run["run_id"])
        return result
    finally:
        mlflow.set_tracking_uri(previous)


def _predict_classes(model_dir: str, example):
    """What the pyfunc returns for ``example`` (for the signature), computed with the pipeline's own loader."""
    import json

    import numpy as np
    import torch

    from .pipeline import load_model

    model = load_model(model_dir).eval()
    with open(os.path.join(model_dir, "meta.json"), encoding="utf-8") as f:
        classes = np.asarray(json.load(f)["classes"])
    with torch.no_grad():
        return classes[model(torch.from_numpy(example))["logits"].argmax(-1).numpy()]


def _requirements() -> list[str]:
    """Pinned requirements of the pyfunc (given, so MLflow does not load the model in a subprocess to infer them)."""
    from importlib import metadata

    out = []
    for dist in ("mlflow", "torch", "safetensors", "numpy", "pyyaml"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out
