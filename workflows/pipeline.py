"""The pipeline as plain functions over paths: prepare → train → evaluate.

Flyte tasks (workflows/training.py) and DVC stages (``python -m workflows <stage>``) are thin entry points over
these functions, so both give the same results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Any

import numpy as np

from trainer_lib import EarlyStoppingCallback, Trainer, TrainingArguments, identity
from trainer_lib import checkpoint as ckpt
from trainer_lib.checkpoint import load_weights
from trainer_lib.distributed import broadcast_object
from trainer_lib.redaction import redact

from . import data as data_lib
from . import plots, provenance, registry
from .config import ConfigError, PipelineConfig
from .fingerprint import config_digest
from .models import build_model

logger = logging.getLogger(__name__)

#: log keys that measure time: left out of files that must be byte-identical between identical runs
TIMING_SUFFIXES = ("_runtime", "_per_second")
RUN_CONFIG = "run_config.json"


def prepare(config: PipelineConfig, data_dir: str) -> dict[str, Any]:
    """Load the source, split it and write the splits into ``data_dir``; returns the split metadata."""
    features, labels, classes = data_lib.load_source(config.data)
    splits = data_lib.split(features, labels, config.data)
    with identity.folder_lock(data_dir, lock_file=sibling_lock(data_dir)):  # data_dir itself is replaced whole
        data_lib.write_splits(splits, classes, data_dir)
    return data_lib.read_meta(data_dir)


def sibling_lock(folder: str) -> str:
    """The lock file of a folder that is replaced as a whole: next to it (``.<name>.flytrain.lock``)."""
    parent, name = os.path.split(os.path.abspath(folder.rstrip("/")))
    return os.path.join(parent, f".{name}{identity.LOCK_FILE}")


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


def _read_marker(checkpoint_dir: str) -> dict[str, Any] | None:
    """run_config.json, or None when it is absent or unreadable (a marker cut off by a crash never blocks a rerun:
    the checkpoints' fingerprints, not the marker, say which run they belong to)."""
    path = os.path.join(checkpoint_dir, RUN_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable %s (%s)", path, error)
        return None
    return stored if isinstance(stored, dict) else None


def _checkpoint_to_resume(checkpoint_dir: str, current: identity.RunFingerprint) -> str | None:
    """The newest valid checkpoint of an unfinished run with this fingerprint; other runs' checkpoints, and those of
    a finished run, are moved to ``<checkpoint_dir>.previous/`` (logged with the reason).

    A finished run is not resumed: training it again means its code or data changed, or a rerun was forced.
    """
    if os.path.isdir(checkpoint_dir):  # a marker write cut off by a crash leaves its temporary file
        for name in os.listdir(checkpoint_dir):
            if name.startswith(f"{RUN_CONFIG}.tmp-"):
                os.remove(os.path.join(checkpoint_dir, name))
    checkpoints = ckpt.list_checkpoints(checkpoint_dir)
    mine, others = identity.split_by_run(checkpoints, current)
    previous = checkpoint_dir.rstrip("/") + ".previous"
    stored = _read_marker(checkpoint_dir) or {}
    if mine and stored.get("finished") is True and stored.get("fingerprint") == current.digest:
        identity.move_aside(checkpoints, previous, "the run they belong to had finished, and a finished run is "
                            "never resumed: training from scratch")
        return None
    if others:
        newest = identity.read_fingerprint(others[-1])
        why = "; ".join(identity.differences(newest, current)[:4]) if newest else f"no {identity.FINGERPRINT}"
        identity.move_aside(others, previous, f"they belong to another run ({why}); "
                            + ("resuming this run's newest checkpoint" if mine else "training from scratch"))
    for path in reversed(mine):
        try:
            ckpt.validate_checkpoint(path)
            return path
        except ckpt.CheckpointError as error:
            logger.warning("skipping %s", error)
    return None


def _write_marker(config: PipelineConfig, checkpoint_dir: str, current: identity.RunFingerprint,
                  finished: bool) -> None:
    """run_config.json, written atomically: what ran here and whether it finished (informative, and the one
    bit the checkpoints cannot say: that their run is complete)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    value = {"fingerprint": current.digest, "config": redact(config.to_dict()), "finished": finished}
    _write_json_atomic(os.path.join(checkpoint_dir, RUN_CONFIG), value)


def _write_json_atomic(path: str, value: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _training_data_hash(meta: dict[str, Any], train_dataset) -> str:
    """The train split's content hash recorded by prepare (older prepared folders: hashed from memory)."""
    recorded = (meta.get("split_hashes") or {}).get("train")
    if recorded:
        return recorded
    return data_lib.array_hash(train_dataset.x.numpy(), train_dataset.y.numpy())


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
    train_dataset = data_lib.load_split(data_dir, "train")
    return Trainer(
        model,
        args,
        train_dataset=train_dataset,
        eval_dataset=data_lib.load_split(data_dir, "val"),
        compute_metrics=accuracy_metrics,
        callbacks=all_callbacks,
        fingerprint_extra={"training_data": _training_data_hash(meta, train_dataset)},
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
    ignore_fingerprint: bool = False,
    callbacks: list | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train (continuing the newest checkpoint of the same run when ``resume``) and write the model.

    The whole config is checked and the run's fingerprint computed before anything on disk is touched; then the
    checkpoint folder is locked for the whole stage. ``resume`` may name a checkpoint; with ``ignore_fingerprint``
    that may be another run's (fine-tuning from it). ``model_dir`` receives model.safetensors, config.json,
    meta.json, training_args.json, log_history.json and train_metrics.json; it is replaced only when training
    succeeded.
    """
    tracker_classes = check_trackers(config.training.report_to)
    meta = data_lib.read_meta(data_dir)
    facts = provenance.collect(
        config, config_digest(config), meta.get("split_hashes") or data_lib.split_hashes(data_dir),
        [m for cls in tracker_classes for m in getattr(cls, "required_modules", ())],
    )
    if overrides.get("run_name"):  # a caller's name (a tuning trial's) is the run's name everywhere, provenance too
        facts["run_name"] = overrides["run_name"]
    overrides["run_name"] = facts["run_name"]
    recorder = provenance.ProvenanceCallback(facts)
    trainer = build_trainer(config, data_dir, checkpoint_dir, [*(callbacks or []), recorder], **overrides)
    recorder.callbacks = trainer.callback_handler.callbacks
    current = trainer.run_fingerprint()
    if isinstance(resume, str) and resume:  # another run's checkpoint is refused before the lock, marker or log line
        identity.check_resumable(resume, current, ignore_fingerprint)
    rank_zero = trainer.dist.is_world_zero
    with identity.folder_lock(checkpoint_dir) if rank_zero else contextlib.nullcontext():
        if resume is True:
            # one process decides (and may move checkpoints aside); under torch.distributed the others follow it
            resume_from = _checkpoint_to_resume(checkpoint_dir, current) if rank_zero else None
            resume_from = broadcast_object(resume_from, trainer.dist)
        else:
            resume_from = resume or None
        if rank_zero:
            _write_marker(config, checkpoint_dir, current, finished=False)
        if resume_from:
            logger.info("resuming from %s", resume_from)
        output = trainer.train(resume_from_checkpoint=resume_from, ignore_fingerprint=ignore_fingerprint)

        tmp = model_dir.rstrip("/") + ".tmp"
        if rank_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(tmp)  # every rank takes part; only world process zero writes the model folder
        result = {"global_step": output.global_step, "train_loss": output.training_loss, "resumed_from": resume_from}
        if not rank_zero:
            return result
        _write_json(os.path.join(tmp, "config.json"), redact(trainer.model.config))
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
        _write_marker(config, checkpoint_dir, current, finished=True)
    return result


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
    with identity.folder_lock(out_dir):
        return _evaluate(config, data_dir, model_dir, out_dir)


def _evaluate(config: PipelineConfig, data_dir: str, model_dir: str, out_dir: str) -> dict[str, float]:
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
    """Test metrics, provenance and the confusion matrix into every tracker run of the training, then the MLflow
    Model (registered when a name is configured): the pipeline's last step, once."""
    facts = provenance.read(model_dir) or {}
    strict = config.training.strict_integrations
    files = [os.path.join(out_dir, "confusion.csv"), os.path.join(out_dir, "plots", "confusion.svg")]
    registry.report_results(model_dir, metrics, [f for f in files if os.path.isfile(f)], strict)
    if any(name in registry.MLFLOW_TRACKERS for name in facts.get("trackers") or {}):
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
    """The whole pipeline in ``workdir`` (data/, checkpoints/, model/, metrics/); returns the test metrics.

    The training section is checked before anything is written, and ``workdir`` is locked for the whole run.
    """
    training_arguments(config, os.path.join(workdir, "checkpoints"))
    with identity.folder_lock(workdir):
        data_dir = os.path.join(workdir, "data")
        prepare(config, data_dir)
        train(config, data_dir, os.path.join(workdir, "checkpoints"), os.path.join(workdir, "model"),
              callbacks=callbacks)
        return evaluate(config, data_dir, os.path.join(workdir, "model"), os.path.join(workdir, "metrics"))
