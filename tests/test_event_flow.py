"""Conformance of the event flow with the reference Trainer's documented order, for several argument sets."""

from __future__ import annotations

import logging

import pytest

from tests.helpers import accuracy, digits, make_model
from trainer_lib import (
    CallbackHandler,
    DefaultFlowCallback,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainingArguments,
)
from trainer_lib.callback import EVENTS


class Recorder(TrainerCallback):
    """Records every event with the kwargs it received."""

    def __init__(self):
        self.events: list[str] = []
        self.kwargs: dict[str, set] = {}

    def __getattribute__(self, name):
        if name in EVENTS:

            def record(args, state, control, **kwargs):
                object.__getattribute__(self, "events").append(name)
                object.__getattribute__(self, "kwargs").setdefault(name, set()).update(kwargs)

            return record
        return object.__getattribute__(self, name)


# The recorder overrides every event through __getattribute__, so the handler must see it as a listener.
for _event in EVENTS:
    setattr(Recorder, _event, lambda self, *a, **k: None)


def run(tmp_path, n_train, n_eval, **kwargs):
    train, evaluation = digits(n_train, n_eval)
    rec = Recorder()
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, learning_rate=1e-3, **kwargs)
    trainer = Trainer(make_model(), args, train_dataset=train, eval_dataset=evaluation, compute_metrics=accuracy,
                      callbacks=[rec])
    trainer.train()
    return rec, trainer


STEP = ["on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"]


def evaluation(batches):
    return ["on_prediction_step"] * batches + ["on_log", "on_evaluate"]


def test_steps_strategies_with_final_eval_and_save(tmp_path):
    # 8 samples, batch 4: 2 steps per epoch, 2 epochs → max_steps 4; eval set of 4 = one eval batch
    rec, trainer = run(
        tmp_path, 8, 4, per_device_train_batch_size=4, per_device_eval_batch_size=4, num_train_epochs=2,
        logging_steps=2, eval_strategy="steps", eval_steps=3, save_steps=2,
    )
    expected = (
        ["on_init_end", "on_train_begin", "on_epoch_begin"]
        + STEP
        + STEP + ["on_log", "on_save"]
        + ["on_epoch_end", "on_epoch_begin"]
        + STEP + evaluation(1)
        + STEP + ["on_log"] + evaluation(1) + ["on_save"]  # last step: final evaluation and save
        + ["on_epoch_end", "on_log", "on_train_end"]
    )
    assert rec.events == expected
    assert trainer.state.global_step == 4
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_final_eval_not_repeated_when_last_step_is_an_eval_step(tmp_path):
    rec, _ = run(
        tmp_path, 8, 4, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=4,
        logging_steps=10, eval_strategy="steps", eval_steps=2, save_strategy="no",
    )
    assert rec.events.count("on_evaluate") == 2


def test_gradient_accumulation_substeps(tmp_path):
    # 16 samples, batch 4: 4 micro-batches per epoch; gas 2 → 2 optimizer steps per epoch
    rec, trainer = run(
        tmp_path, 16, 4, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=1,
        logging_steps=1, save_strategy="no",
    )
    one = ["on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log"]
    expected = ["on_init_end", "on_train_begin", "on_epoch_begin"] + one + one + ["on_epoch_end", "on_log", "on_train_end"]
    assert rec.events == expected
    assert trainer.state.global_step == 2
    assert trainer.state.epoch == 1.0


def test_gradient_accumulation_partial_last_group(tmp_path):
    # 12 samples, batch 4: 3 micro-batches; gas 2 → groups of 2 and 1 → 2 optimizer steps per epoch
    rec, trainer = run(
        tmp_path, 12, 4, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2,
        logging_steps=100, save_strategy="no",
    )
    assert trainer.state.global_step == 4
    assert rec.events.count("on_substep_end") == 2
    assert rec.events.count("on_step_end") == 4


def test_epoch_strategies(tmp_path):
    rec, trainer = run(
        tmp_path, 8, 4, per_device_train_batch_size=4, per_device_eval_batch_size=2, num_train_epochs=2,
        logging_strategy="epoch", eval_strategy="epoch", save_strategy="epoch",
    )
    epoch_end = ["on_epoch_end", "on_log"] + evaluation(2) + ["on_save"]
    expected = (
        ["on_init_end", "on_train_begin", "on_epoch_begin"] + STEP + STEP + epoch_end
        + ["on_epoch_begin"] + STEP + STEP + epoch_end + ["on_log", "on_train_end"]
    )
    assert rec.events == expected
    logs = trainer.state.log_history
    assert [e["step"] for e in logs] == [2, 2, 4, 4, 4]
    assert "eval_accuracy" in logs[1] and "train_loss" in logs[-1]


def test_logging_first_step_and_eval_delay(tmp_path):
    rec, trainer = run(
        tmp_path, 16, 4, per_device_train_batch_size=4, max_steps=6, logging_steps=3, logging_first_step=True,
        eval_strategy="steps", eval_steps=2, eval_delay=4, save_strategy="no",
    )
    steps_logged = [e["step"] for e in trainer.state.log_history if "loss" in e]
    assert steps_logged == [1, 3, 6]
    evals = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    assert evals == [4, 6]


def test_every_event_gets_the_reference_kwargs(tmp_path):
    rec, _ = run(tmp_path, 8, 4, per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                 eval_strategy="steps", eval_steps=2, save_steps=2)
    common = {"model", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader", "processing_class"}
    for event, received in rec.kwargs.items():
        assert common <= received, event
    assert "metrics" in rec.kwargs["on_evaluate"]
    assert "logs" in rec.kwargs["on_log"]


def test_train_summary_log(tmp_path):
    _, trainer = run(tmp_path, 8, 4, per_device_train_batch_size=4, max_steps=2, save_strategy="no")
    summary = trainer.state.log_history[-1]
    for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch", "step"):
        assert key in summary


class Replacer(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        new = TrainerControl(should_training_stop=True)
        self.returned = new
        return new


class Observer(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        self.seen = control


def test_returned_control_is_threaded_to_the_next_callback_and_the_loop(tmp_path):
    train, _ = digits(32, 4)
    replacer, observer = Replacer(), Observer()
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, per_device_train_batch_size=4,
                             max_steps=5, save_strategy="no")
    trainer = Trainer(make_model(), args, train_dataset=train, callbacks=[replacer, observer])
    trainer.train()
    assert observer.seen is replacer.returned
    assert trainer.state.global_step == 1  # the replaced control stopped training


def test_callback_order_and_handler_management(tmp_path, caplog):
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True)
    trainer = Trainer(make_model(), args, callbacks=[Recorder])
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names == ["DefaultFlowCallback", "Recorder", "PrinterCallback"]
    trainer2 = Trainer(make_model(), TrainingArguments(output_dir=str(tmp_path)))
    assert isinstance(trainer2.callback_handler.callbacks[-1], ProgressCallback)

    with caplog.at_level(logging.WARNING):
        trainer.add_callback(Recorder())
    assert "already one" in caplog.text
    popped = trainer.pop_callback(Recorder)
    assert isinstance(popped, Recorder)
    assert [type(cb).__name__ for cb in trainer.callback_handler.callbacks].count("Recorder") == 1
    instance = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Recorder))
    trainer.remove_callback(instance)
    assert not any(isinstance(cb, Recorder) for cb in trainer.callback_handler.callbacks)
    assert trainer.pop_callback(PrinterCallback) is not None


def test_handler_resets_flags_like_the_reference():
    handler = CallbackHandler([DefaultFlowCallback], None, None, None, None)
    args = TrainingArguments(output_dir="unused-dir")
    from trainer_lib import TrainerState

    state = TrainerState()
    control = TrainerControl(True, True, True, True, True)
    handler.on_step_begin(args, state, control)
    assert (control.should_log, control.should_evaluate, control.should_save) == (False, False, False)
    assert control.should_training_stop and control.should_epoch_stop
    handler.on_epoch_begin(args, state, control)
    assert not control.should_epoch_stop and control.should_training_stop
    handler.on_train_begin(args, state, control)
    assert not control.should_training_stop
    control.should_log = control.should_evaluate = control.should_save = True
    handler.on_log(args, state, control, logs={})
    handler.on_evaluate(args, state, control, metrics={})
    handler.on_save(args, state, control)
    assert (control.should_log, control.should_evaluate, control.should_save) == (False, False, False)


def test_printer_callback_prints_logs(tmp_path, capsys):
    run(tmp_path, 8, 4, per_device_train_batch_size=4, max_steps=2, logging_steps=1, save_strategy="no")
    out = capsys.readouterr().out
    assert "'loss'" in out and "train_runtime" in out


def test_ratio_steps_resolve_against_max_steps(tmp_path):
    _, trainer = run(tmp_path, 64, 4, per_device_train_batch_size=4, max_steps=10, logging_steps=0.2,
                     save_steps=0.5)
    assert trainer.state.logging_steps == 2 and trainer.state.save_steps == 5
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]


@pytest.mark.parametrize("printer", [True, False])
def test_progress_or_printer_chosen_by_disable_tqdm(tmp_path, printer):
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=printer)
    trainer = Trainer(make_model(), args)
    last = trainer.callback_handler.callbacks[-1]
    assert isinstance(last, PrinterCallback if printer else ProgressCallback)
