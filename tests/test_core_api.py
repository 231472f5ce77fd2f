"""Arguments validation, state round-trip, best-model tracking and rotation, early stopping, integration isolation."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from tests.helpers import accuracy, digits, make_model
from trainer_lib import (
    EarlyStoppingCallback,
    IntegrationCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    register_integration,
)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"learning_rate": -1}, "learning_rate"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"gradient_accumulation_steps": 1.5}, "gradient_accumulation_steps"),
        ({"max_steps": 0}, "max_steps"),
        ({"lr_scheduler_type": "cosinus"}, "lr_scheduler_type"),
        ({"eval_strategy": "sometimes"}, "eval_strategy"),
        ({"save_strategy": "best"}, "save_strategy"),
        ({"logging_steps": 0}, "logging_steps"),
        ({"save_steps": 2.5}, "save_steps"),
        ({"warmup_ratio": 2}, "warmup_ratio"),
        ({"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "epoch"}, "load_best_model_at_end"),
        ({"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 3, "save_steps": 5},
         "load_best_model_at_end"),
        ({"report_to": 3}, "report_to"),
        ({"num_train_epochs": 0}, "num_train_epochs"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_invalid_arguments_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainingArguments(output_dir=str(tmp_path), **kwargs)


def test_output_dir_that_is_a_file_is_rejected(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="output_dir"):
        TrainingArguments(output_dir=str(path))


def test_argument_defaults_follow_the_reference(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path))
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (5e-5, 3.0, 8)
    assert (args.logging_steps, args.save_steps, args.seed, args.max_grad_norm) == (500, 500, 42, 1.0)
    assert args.report_to == [] and args.restore_callback_states_from_checkpoint is True
    args = TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", logging_steps=7,
                             metric_for_best_model="accuracy")
    assert args.eval_steps == 7 and args.greater_is_better is True
    d = json.loads(args.to_json_string())
    assert d["eval_strategy"] == "steps" and d["output_dir"] == str(tmp_path)
    assert TrainingArguments(output_dir=str(tmp_path), metric_for_best_model="eval_loss").greater_is_better is False


def test_unknown_argument_in_from_dict(tmp_path):
    with pytest.raises(ValueError, match="learnig_rate"):
        TrainingArguments.from_dict({"output_dir": str(tmp_path), "learnig_rate": 1e-3})


def test_state_round_trip_and_unknown_keys(tmp_path, caplog):
    state = TrainerState(epoch=1.5, global_step=12, max_steps=20, log_history=[{"loss": 0.5, "step": 10}],
                         best_metric=0.9, best_global_step=10, best_model_checkpoint="x/checkpoint-10",
                         stateful_callbacks=[TrainerControl(should_save=True), EarlyStoppingCallback(3)])
    path = tmp_path / "state.json"
    state.save_to_json(str(path))
    loaded = TrainerState.load_from_json(str(path))
    assert loaded == state
    assert loaded.stateful_callbacks["EarlyStoppingCallback"]["args"]["early_stopping_patience"] == 3
    data = json.loads(path.read_text())
    data["from_a_future_version"] = 1
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        again = TrainerState.load_from_json(str(path))
    assert again.global_step == 12 and "from_a_future_version" in caplog.text
    for name in ("num_input_tokens_seen", "total_flos", "is_hyper_param_search", "trial_name", "trial_params",
                 "train_batch_size", "eval_steps", "logging_steps", "save_steps", "num_train_epochs"):
        assert hasattr(state, name)


def train_digits(tmp_path, callbacks=None, **kwargs):
    train, evaluation = digits(256, 64)
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=32, learning_rate=5e-3, disable_tqdm=True,
                  eval_strategy="steps", eval_steps=4, save_steps=4, logging_steps=4)
    values.update(kwargs)
    trainer = Trainer(make_model(hidden=16), TrainingArguments(**values), train_dataset=train,
                      eval_dataset=evaluation, compute_metrics=accuracy, callbacks=callbacks)
    trainer.train()
    return trainer


def test_best_model_tracked_rotation_keeps_best_and_newest(tmp_path):
    trainer = train_digits(tmp_path, max_steps=24, save_total_limit=1, metric_for_best_model="loss",
                           load_best_model_at_end=True)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert trainer.state.best_metric == best["eval_loss"]
    assert trainer.state.best_global_step == best["step"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    kept = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert kept == sorted({best["step"], 24})
    # load_best_model_at_end: the model now holds the best checkpoint's weights
    from trainer_lib.checkpoint import load_weights

    best_weights = load_weights(trainer.state.best_model_checkpoint)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, best_weights[key])


def test_save_strategy_best_saves_only_on_improvement(tmp_path):
    trainer = train_digits(tmp_path, max_steps=16, save_strategy="best", metric_for_best_model="accuracy")
    improving, best = [], None
    for e in trainer.state.log_history:
        if "eval_accuracy" in e and (best is None or e["eval_accuracy"] > best):
            best = e["eval_accuracy"]
            improving.append(e["step"])
    saved = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert saved == sorted(set(improving))


def test_early_stopping_stops_at_patience(tmp_path):
    es = EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=10.0)
    trainer = train_digits(tmp_path, callbacks=[es], max_steps=100, metric_for_best_model="loss", save_strategy="no")
    # nothing improves by > 10: the first eval sets the best, the next two count, training stops at the third eval
    evals = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    assert evals == [4, 8, 12]
    assert trainer.state.global_step == 12


def test_early_stopping_needs_metric_and_eval_strategy(tmp_path):
    train, _ = digits(32, 8)
    trainer = Trainer(make_model(), TrainingArguments(output_dir=str(tmp_path), max_steps=2, disable_tqdm=True),
                      train_dataset=train, callbacks=[EarlyStoppingCallback()])
    with pytest.raises(ValueError, match="metric_for_best_model"):
        trainer.train()


def test_metric_for_best_model_missing_from_evaluation_is_named(tmp_path):
    with pytest.raises(KeyError, match="eval_f1"):
        train_digits(tmp_path, max_steps=4, metric_for_best_model="f1")


def test_eval_strategy_without_eval_data(tmp_path):
    train, _ = digits(32, 8)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, eval_strategy="steps", eval_steps=1)
    with pytest.raises(ValueError, match="eval_dataset"):
        Trainer(make_model(), args, train_dataset=train).train()


def test_empty_dataset_is_a_clear_error(tmp_path):
    from tests.helpers import DictDataset

    empty = DictDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        Trainer(make_model(), TrainingArguments(output_dir=str(tmp_path), max_steps=2), train_dataset=empty).train()


def test_evaluate_and_predict(tmp_path):
    train, evaluation = digits(64, 40)
    seen = []

    class OnPredict(TrainerCallback):
        def on_predict(self, args, state, control, metrics, **kwargs):
            seen.append(metrics)

    trainer = Trainer(make_model(), TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=16,
                                                      disable_tqdm=True),
                      train_dataset=train, eval_dataset=evaluation, compute_metrics=accuracy, callbacks=[OnPredict])
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy", "eval_runtime"} <= set(metrics)
    out = trainer.predict(evaluation)
    assert out.predictions.shape == (40, 10) and out.label_ids.shape == (40,)
    assert out.metrics["test_accuracy"] == metrics["eval_accuracy"]
    assert seen and seen[0] is out.metrics
    custom = trainer.evaluate(metric_key_prefix="holdout")
    assert "holdout_accuracy" in custom


class Exploding(IntegrationCallback):
    integration_name = "exploding"

    def __init__(self):
        self.calls = 0

    def on_log(self, args, state, control, **kwargs):
        self.calls += 1
        raise RuntimeError("backend down")


def test_failing_integration_is_disabled_once_and_training_goes_on(tmp_path, caplog):
    register_integration("exploding", Exploding)
    with caplog.at_level(logging.WARNING):
        trainer = train_digits(tmp_path, max_steps=8, report_to="exploding", eval_strategy="no", logging_steps=1)
    assert trainer.state.global_step == 8
    assert caplog.text.count("Integration 'exploding' failed") == 1
    assert not any(isinstance(cb, Exploding) for cb in trainer.callback_handler.callbacks)


def test_strict_integrations_reraise(tmp_path):
    register_integration("exploding", Exploding)
    with pytest.raises(RuntimeError, match="backend down"):
        train_digits(tmp_path, max_steps=4, report_to="exploding", eval_strategy="no", logging_steps=1,
                     strict_integrations=True)


def test_user_callback_errors_are_not_swallowed(tmp_path):
    class Broken(TrainerCallback):
        def on_step_end(self, *a, **k):
            raise ZeroDivisionError("user bug")

    with pytest.raises(ZeroDivisionError):
        train_digits(tmp_path, max_steps=4, callbacks=[Broken], eval_strategy="no")


def test_report_to_unknown_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid names are .*mlflow"):
        Trainer(make_model(), TrainingArguments(output_dir=str(tmp_path), report_to="mlfow"))


TRACKER_MODULES = ("mlflow", "wandb", "comet_ml", "neptune", "clearml", "codecarbon", "dvclive", "dagshub", "flytekit",
                   "tensorboard", "azureml")


def test_importing_trainer_lib_imports_no_tracker():
    code = (
        "import sys, trainer_lib, callbacks, callbacks._common\n"
        f"bad = [m for m in {TRACKER_MODULES!r} if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_callbacks_exports_every_integration_class_lazily():
    code = (
        "import sys, callbacks\n"
        "from callbacks import *\n"
        "from trainer_lib.registry import available_names, resolve_report_to\n"
        "names = [n for n in available_names() if n.isidentifier()]\n"
        "by_name = {n: resolve_report_to(n)[0] if n != 'azure_ml' else None for n in names}\n"
        "exported = {getattr(callbacks, c) for c in callbacks.__all__}\n"
        "missing = sorted(n for n, c in by_name.items() if c is not None and c not in exported)\n"
        f"bad = [m for m in {TRACKER_MODULES!r} if m in sys.modules]\n"
        "print(len(callbacks.__all__), missing, bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "11 [] []"
    with pytest.raises(AttributeError, match="NoSuchCallback"):
        import callbacks

        callbacks.NoSuchCallback  # noqa: B018


def test_on_train_error_reaches_every_callback_and_the_error_propagates(tmp_path):
    seen = []

    class Watcher(TrainerCallback):
        def on_train_error(self, args, state, control, error=None, **kwargs):
            seen.append((type(error).__name__, state.global_step))
            raise RuntimeError("a broken hook must not hide the training error")

    class Broken(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise ZeroDivisionError("user bug")

    with pytest.raises(ZeroDivisionError):
        train_digits(tmp_path, max_steps=6, callbacks=[Watcher, Broken], eval_strategy="no")
    assert seen == [("ZeroDivisionError", 3)]


class GrowingDataset(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base, self.n = base, 40

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.base[i]


def test_eval_loader_is_reused_only_while_the_dataset_is_the_same(tmp_path):
    train, evaluation = digits(64, 64)
    growing = GrowingDataset(evaluation)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=16, disable_tqdm=True)
    trainer = Trainer(make_model(), args, eval_dataset=growing, compute_metrics=accuracy)
    first = trainer.get_eval_dataloader()
    assert trainer.get_eval_dataloader() is first
    assert trainer.evaluate()["eval_samples_per_second"] > 0
    assert len(trainer.get_eval_dataloader(evaluation)) == 4 and trainer.get_eval_dataloader(evaluation) is not first
    growing.n = 64  # the dataset grew: a new loader that sees every sample
    assert trainer.get_eval_dataloader() is not first
    assert sum(len(b["labels"]) for b in trainer.get_eval_dataloader()) == 64
    trainer.args.per_device_eval_batch_size = 32
    assert len(trainer.get_eval_dataloader()) == 2
