"""The pipeline as plain functions over paths: prepare → train → evaluate.

Flyte tasks (workflows/training.py) and DVC stages (``python -m workflows <stage>``) are thin entry points over
these functions, so both give the same results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any

import numpy as np

from trainer_lib import EarlyStoppingCallback, Trainer, TrainingArguments
from trainer_lib import checkpoint as ckpt
from trainer_lib.checkpoint import load_weights
from trainer_lib.distributed import broadcast_object

from . import data as data_lib
from . import plots, provenance, registry
from .config import ConfigError, PipelineConfig
from .models import build_model

logger = logging.getLogger(__name__)

#: log keys that measure time: left out of files that must be byte-identical between identical runs
TIMING_SUFFIXES = ("_runtime", "_per_second")
RUN_CONFIG = "run_config.json"
#: the version of what prepare/train/evaluate produce from the same inputs: bump it with any change that alters
#: their outputs (a split, a metric, the training loop). Flyte's task cache versions derive from it.
PIPELINE_VERSION = 1


def prepare(config: PipelineConfig, data_dir: str) -> dict[str, Any]:
    """Load the source, split it and write the splits into ``data_dir``; returns the split metadata."""
    features, labels, classes = data_lib.load_source(config.data)
    splits = data_lib.split(features, labels, config.data)
    data_lib.write_splits(splits, classes, data_dir)
    return data_lib.read_meta(data_dir)


def accuracy_metrics(prediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def training_arguments(config: PipelineConfig, output_dir: str, **overrides: Any) -> TrainingArguments:
    """TrainingArguments from the config's training section; an invalid value names its config key."""
    values = {k: v for k, v in config.to_dict()["training"].items() if k != "early_stopping_patience"}
    # a fixed logging_dir (not the reference's time-stamped one) keeps training_args.json identical between runs;
    # the progress display is ProgressCallback's (a bar on a terminal, compact lines elsewhere)
    values.update(output_dir=output_dir, logging_dir=os.path.join(output_dir, "runs"), logging_first_step=True)
    values.update(overrides)
    try:
        return TrainingArguments(**values)
    except ValueError as error:
        raise ConfigError(str(error).replace("TrainingArguments.", "training.")) from None


#: config keys that do not change what is trained (where results are reported, what the run is called)
_NOT_TRAINING = {"training": ("report_to", "run_name", "strict_integrations"),
                 "model": ("registered_name", "registered_alias")}


def _config_digest(config: PipelineConfig) -> str:
    relevant = {k: v for k, v in config.to_dict().items()}
    for section, keys in _NOT_TRAINING.items():
        relevant[section] = {k: v for k, v in relevant[section].items() if k not in keys}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def check_trackers(report_to: list[str]) -> list[type]:
    """The named trackers' classes, or one ConfigError line for one that cannot start (unknown name, package not
    installed, missing credentials): found before any compute is spent, whatever strict_integrations says."""
    from trainer_lib.registry import resolve_report_to

    names = [n for n in report_to if n not in ("all", "none")]
    try:
        classes = resolve_report_to(names)
    except (ImportError, ValueError) as error:
        raise ConfigError(str(error).replace("TrainingArguments.", "training.")) from None
    for name, cls in zip(dict.fromkeys(names), classes):
        check = getattr(cls, "check_configuration", None)
        if callable(check):
            try:
                check()
            except (ValueError, RuntimeError) as error:
                raise ConfigError(f"training.report_to: {name!r} cannot start: {error}") from None
    return classes


def _checkpoint_to_resume(config: PipelineConfig, checkpoint_dir: str) -> str | None:
    """The newest valid checkpoint of an unfinished run of this same config; other checkpoints are set aside.

    A finished run is not resumed: training it again means its code or data changed, or a rerun was forced.
    """
    marker = os.path.join(checkpoint_dir, RUN_CONFIG)
    digest = _config_digest(config)
    if ckpt.list_checkpoints(checkpoint_dir):
        stored: dict[str, Any] = {}
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as f:
                stored = json.load(f)
        if stored.get("digest") != digest or stored.get("finished"):
            previous = checkpoint_dir.rstrip("/") + ".previous"
            reason = "a finished run" if stored.get("digest") == digest else "another config"
            logger.warning("checkpoints in %s belong to %s; moving them to %s", checkpoint_dir, reason, previous)
            shutil.rmtree(previous, ignore_errors=True)
            os.rename(checkpoint_dir, previous)
    _write_marker(config, checkpoint_dir, finished=False)
    return ckpt.latest_valid_checkpoint(checkpoint_dir)


def _write_marker(config: PipelineConfig, checkpoint_dir: str, finished: bool) -> None:
    os.makedirs(checkpoint_dir, exist_ok=True)
    value = {"digest": _config_digest(config), "config": config.to_dict(), "finished": finished}
    _write_json(os.path.join(checkpoint_dir, RUN_CONFIG), value)


def build_trainer(
    config: PipelineConfig, data_dir: str, checkpoint_dir: str, callbacks: list | None = None, **overrides: Any
) -> Trainer:
    meta = data_lib.read_meta(data_dir)
    args = training_arguments(config, checkpoint_dir, **overrides)
    from trainer_lib import set_seed

    set_seed(args.seed)
    model = build_model(config.model, meta["n_features"], meta["n_classes"])
    all_callbacks = list(callbacks or [])
    if config.training.early_stopping_patience > 0:
        all_callbacks.append(EarlyStoppingCallback(config.training.early_stopping_patience))
    return Trainer(
        model,
        args,
        train_dataset=data_lib.load_split(data_dir, "train"),
        eval_dataset=data_lib.load_split(data_dir, "val"),
        compute_metrics=accuracy_metrics,
        callbacks=all_callbacks,
    )


def _without_timing(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not k.endswith(TIMING_SUFFIXES)}


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def train(
    config: PipelineConfig,
    data_dir: str,
    checkpoint_dir: str,
    model_dir: str,
    *,
    resume: bool | str = True,
    callbacks: list | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train (continuing from the newest checkpoint of the same config when ``resume``) and write the model.

    ``model_dir`` receives model.safetensors, config.json, meta.json, training_args.json, log_history.json and
    train_metrics.json; it is replaced only when training succeeded.
    """
    tracker_classes = check_trackers(config.training.report_to)
    meta = data_lib.read_meta(data_dir)
    facts = provenance.collect(
        config, _config_digest(config), meta.get("split_hashes") or data_lib.split_hashes(data_dir),
        [m for cls in tracker_classes for m in getattr(cls, "required_modules", ())],
    )
    overrides.setdefault("run_name", facts["run_name"])
    recorder = provenance.ProvenanceCallback(facts)
    trainer = build_trainer(config, data_dir, checkpoint_dir, [*(callbacks or []), recorder], **overrides)
    recorder.callbacks = trainer.callback_handler.callbacks
    if resume is True:
        # one process decides (and may move checkpoints aside); under torch.distributed the others follow it
        resume_from = _checkpoint_to_resume(config, checkpoint_dir) if trainer.dist.is_world_zero else None
        resume_from = broadcast_object(resume_from, trainer.dist)
    elif resume:
        resume_from = resume
    else:
        resume_from = None
    if resume_from:
        logger.info("resuming from %s", resume_from)
    output = trainer.train(resume_from_checkpoint=resume_from)

    tmp = model_dir.rstrip("/") + ".tmp"
    if trainer.dist.is_world_zero:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(tmp)  # every rank takes part; only world process zero writes the model folder
    if not trainer.dist.is_world_zero:
        return {"global_step": output.global_step, "train_loss": output.training_loss, "resumed_from": resume_from}
    _write_json(os.path.join(tmp, "config.json"), trainer.model.config)
    shutil.copy(os.path.join(data_dir, data_lib.META), os.path.join(tmp, data_lib.META))
    history = [_without_timing(entry) for entry in trainer.state.log_history]
    _write_json(os.path.join(tmp, "log_history.json"), history)
    summary = _without_timing(output.metrics)
    summary.update(
        global_step=output.global_step,
        best_metric=trainer.state.best_metric,
        best_global_step=trainer.state.best_global_step,
    )
    # the last validation metrics: what a hyperparameter search scores a trial by (`dvc exp show --sort-by`)
    last_eval = next((e for e in reversed(history) if "eval_loss" in e), {})
    summary.update({k: v for k, v in last_eval.items() if k.startswith("eval_")})
    _write_json(os.path.join(tmp, "train_metrics.json"), summary)
    facts.update(ended_at=provenance.now(), global_step=output.global_step,
                 trackers=provenance.tracker_runs(trainer.callback_handler.callbacks))
    if recorder.first_started_at:
        facts["first_started_at"] = recorder.first_started_at
    provenance.write(facts, tmp)
    data_lib._replace_dir(tmp, model_dir)
    if resume is True:
        _write_marker(config, checkpoint_dir, finished=True)
    return {"global_step": output.global_step, "train_loss": output.training_loss, "resumed_from": resume_from}


def load_model(model_dir: str):
    """Rebuild the model from ``model_dir`` (config.json + model.safetensors; nothing is unpickled)."""
    from .models import MLPClassifier

    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: run the train stage first")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    model = MLPClassifier(cfg["n_features"], cfg["n_classes"], cfg["hidden_sizes"], cfg["dropout"])
    model.load_state_dict(load_weights(model_dir))
    return model


def evaluate(config: PipelineConfig, data_dir: str, model_dir: str, out_dir: str) -> dict[str, float]:
    """Test-set metrics (metrics.json), a confusion matrix (confusion.csv), training curves (CSV) and static charts
    (plots/*.svg, workflows.plots) in ``out_dir``."""
    model = load_model(model_dir)
    meta = data_lib.read_meta(data_dir)
    test = data_lib.load_split(data_dir, "test")
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, ".eval"),
        per_device_eval_batch_size=config.training.per_device_eval_batch_size,
        disable_tqdm=True,
        report_to="none",
        save_strategy="no",
    )
    trainer = Trainer(model, args, compute_metrics=accuracy_metrics)
    prediction = trainer.predict(test)
    metrics = {k: round(float(v), 6) for k, v in _without_timing(prediction.metrics).items()}
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "metrics.json"), metrics)

    classes = meta["classes"]
    predicted = prediction.predictions.argmax(-1)
    with open(os.path.join(out_dir, "confusion.csv"), "w", encoding="utf-8") as f:
        f.write("actual,predicted\n")
        for actual, guess in zip(prediction.label_ids.tolist(), predicted.tolist()):
            f.write(f"{classes[actual]},{classes[guess]}\n")
    _write_curves(model_dir, out_dir)
    with open(os.path.join(model_dir, "log_history.json"), encoding="utf-8") as f:
        history = json.load(f)
    plots.write_plots(history, prediction.label_ids.tolist(), predicted.tolist(), classes, os.path.join(out_dir, "plots"))
    shutil.rmtree(args.output_dir, ignore_errors=True)
    _report(config, model_dir, out_dir, metrics, test.x[:5].numpy())
    return metrics


def _report(config: PipelineConfig, model_dir: str, out_dir: str, metrics: dict[str, float], example) -> None:
    """Test metrics and the confusion matrix into the training's MLflow runs, then the MLflow Model (registered when
    a name is configured): the pipeline's last step, once."""
    facts = provenance.read(model_dir) or {}
    strict = config.training.strict_integrations
    if "tensorboard" in (facts.get("trackers") or {}):
        registry._guarded("TensorBoard test metrics", strict, registry.report_to_tensorboard, model_dir, metrics)
    if not any(name in registry.MLFLOW_TRACKERS for name in facts.get("trackers") or {}):
        return
    registry.report_test_metrics(model_dir, metrics, [os.path.join(out_dir, "confusion.csv")], strict)
    registry.log_and_register(config, model_dir, example, strict)


def _write_curves(model_dir: str, out_dir: str) -> None:
    with open(os.path.join(model_dir, "log_history.json"), encoding="utf-8") as f:
        history = json.load(f)
    with open(os.path.join(out_dir, "train_curve.csv"), "w", encoding="utf-8") as f:
        f.write("step,loss,learning_rate\n")
        for entry in history:
            if "loss" in entry:
                f.write(f"{entry['step']},{entry['loss']:.6f},{entry['learning_rate']:.8g}\n")
    eval_keys = sorted({k for e in history for k in e if k.startswith("eval_")})
    with open(os.path.join(out_dir, "eval_curve.csv"), "w", encoding="utf-8") as f:
        f.write(",".join(["step"] + eval_keys) + "\n")
        for entry in history:
            if any(k in entry for k in eval_keys):
                f.write(",".join([str(entry["step"])] + [f"{entry.get(k, np.nan):.6f}" for k in eval_keys]) + "\n")


def run(config: PipelineConfig, workdir: str, callbacks: list | None = None) -> dict[str, float]:
    """The whole pipeline in ``workdir`` (data/, checkpoints/, model/, metrics/); returns the test metrics."""
    data_dir = os.path.join(workdir, "data")
    prepare(config, data_dir)
    train(config, data_dir, os.path.join(workdir, "checkpoints"), os.path.join(workdir, "model"), callbacks=callbacks)
    return evaluate(config, data_dir, os.path.join(workdir, "model"), os.path.join(workdir, "metrics"))
