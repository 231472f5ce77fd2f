"""The pipeline's tracker side beyond the training callbacks: provenance tags and ``data.*`` params on every tracker
run, the evaluate stage's test metrics and confusion matrix in the same runs, and at the end the MLflow Model,
registered with an alias.

Everything here runs once per stage (never in the training loop), on the runs that the tracker callbacks recorded
(provenance.json's ``trackers``). A tracker failing here is reported once and the pipeline goes on, unless
``training.strict_integrations``.
"""

from __future__ import annotations

import logging
import os
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


def fact_params(facts: dict[str, Any]) -> dict[str, str]:
    """The data section as ``data.*`` run parameters."""
    return {f"data.{k}": str(v) for k, v in ((facts.get("config") or {}).get("data") or {}).items()}


def tag_tracker_runs(callbacks: list, facts: dict[str, Any], strict: bool = False) -> None:
    """Provenance as tags/config (``as_tags``) and ``data.*`` params on the open run of each tracker among
    ``callbacks`` (MLflow tags, W&B config, TensorBoard text, ...)."""
    from callbacks._common import TrackerCallback

    tags, params = provenance.as_tags(facts), fact_params(facts)
    for callback in callbacks:
        if isinstance(callback, TrackerCallback):
            _guarded(f"{callback.integration_name}: recording the provenance", strict, callback.log_facts, tags, params)


def report_results(model_dir: str, metrics: dict[str, float], files: list[str], strict: bool = False) -> list[str]:
    """The evaluate stage's ``test_*`` metrics (at the training's last step), the provenance and ``files`` (the
    confusion matrix) into every tracker run the training used, each continued from the reference that
    provenance.json holds, as a resumed training continues its run; returns the trackers reported to.

    One mechanism for every tracker (``TrackerCallback.report_results``); a tracker whose run cannot be continued
    here (an offline Neptune run, a closed ClearML task, a log dir not on this machine) is said so once."""
    from trainer_lib import TrainingArguments
    from trainer_lib.registry import resolve_report_to
    from trainer_lib.state import TrainerState

    facts = provenance.read(model_dir) or {}
    args = TrainingArguments(output_dir=model_dir, run_name=facts.get("run_name"), report_to="none",
                             disable_tqdm=True, save_strategy="no")
    state = TrainerState(global_step=int(facts.get("global_step") or 0))
    tags, params = provenance.as_tags(facts), fact_params(facts)
    reported = []
    for name, reference in (facts.get("trackers") or {}).items():
        _prepare_credentials(name)
        classes = _guarded(f"{name}: loading the integration", strict, resolve_report_to, [name])
        if not classes:
            continue
        callback = classes[0]()
        if not callback.continue_from(reference):
            logger.info("%s: the training's run cannot be continued here; test metrics are in the metrics files", name)
            continue
        done = _guarded(f"{name}: reporting the test results", strict, callback.report_results, args, state, metrics,
                        tags, params, files)
        if done:
            reported.append(name)
    return reported


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
