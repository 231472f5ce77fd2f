"""The callback API where it follows the reference 5.x in detail: output_dir at construction, on_push_begin, the
learning rate a log reports, and the folder on_save hands to this project's callbacks."""

from __future__ import annotations

import os

import torch

from tests.helpers import digits, make_model
from trainer_lib import (
    CallbackHandler,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from trainer_lib.callback import EVENTS


def test_trainer_creates_an_empty_output_dir_at_construction(tmp_path):
    out = tmp_path / "run"
    Trainer(make_model(), TrainingArguments(output_dir=str(out), disable_tqdm=True))
    assert out.is_dir() and list(out.iterdir()) == []


def test_on_push_begin_is_an_event_a_callback_can_implement():
    seen = []

    class Pushes(TrainerCallback):
        def on_push_begin(self, args, state, control, **kwargs):
            seen.append(sorted(kwargs))

    handler = CallbackHandler([Pushes()], None, None, None, None)
    handler.on_push_begin(TrainingArguments(output_dir="unused"), TrainerState(), TrainerControl())
    assert "on_push_begin" in EVENTS
    assert seen == [["eval_dataloader", "lr_scheduler", "model", "optimizer", "processing_class", "train_dataloader"]]


def test_logged_learning_rate_is_the_rate_the_step_used(tmp_path):
    """The reference 5.x reads the rate after the optimizer step and before the scheduler step: with a linear decay
    from 0.01 over 4 steps, steps 1..4 used 0.01, 0.0075, 0.005, 0.0025 (the rate after step 4 would be 0)."""
    train, _ = digits(64, 0)
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, learning_rate=0.01, max_steps=4,
                             logging_steps=1, per_device_train_batch_size=16, lr_scheduler_type="linear",
                             save_strategy="no", report_to="none")
    trainer = Trainer(make_model(), args, train_dataset=train)
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert rates == [0.01, 0.0075, 0.005, 0.0025]


class _Saves(TrainerCallback):
    def __init__(self):
        self.folders = []

    def on_save(self, args, state, control, checkpoint_folder=None, **kwargs):
        # the folder must be complete and in place when the event fires
        self.folders.append((state.global_step, checkpoint_folder, os.path.isdir(checkpoint_folder or "")))


class _ReferenceStyle:
    """A callback that is not a subclass of this project's TrainerCallback (as one written for the reference)."""

    def __init__(self):
        self.kwargs = []

    def on_save(self, args, state, control, **kwargs):
        self.kwargs.append(sorted(kwargs))


def test_on_save_names_the_folder_just_written_and_only_to_this_projects_callbacks(tmp_path):
    train, _ = digits(64, 0)
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, max_steps=4, save_steps=2,
                             per_device_train_batch_size=16, save_total_limit=1, report_to="none")
    native, reference = _Saves(), _ReferenceStyle()
    Trainer(make_model(), args, train_dataset=train, callbacks=[native, reference]).train()
    assert native.folders == [(2, str(tmp_path / "checkpoint-2"), True), (4, str(tmp_path / "checkpoint-4"), True)]
    expected = ["eval_dataloader", "lr_scheduler", "model", "optimizer", "processing_class", "train_dataloader"]
    assert reference.kwargs == [expected, expected]


def test_gradients_are_clipped_before_on_pre_optimizer_step(tmp_path):
    norms = []

    class Norms(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
            norms.append(float(torch.cat(grads).norm()))

    train, _ = digits(64, 0)
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, max_steps=3, max_grad_norm=0.01,
                             per_device_train_batch_size=16, save_strategy="no", report_to="none")
    trainer = Trainer(make_model(), args, train_dataset=train, callbacks=[Norms()])
    trainer.train()
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(norms) == 3 and all(n <= 0.01 * (1 + 1e-4) for n in norms)
    assert all(g > 0.01 for g in logged)  # the norm before clipping was larger: clipping did something


ENTRY_POINT_MODULE = '''
from trainer_lib import IntegrationCallback

SEEN = []


class PluginCallback(IntegrationCallback):
    integration_name = "plugin_tracker"

    def on_log(self, args, state, control, logs=None, **kwargs):
        SEEN.append(state.global_step)
'''


def test_a_tracker_is_found_through_the_flytrain_integrations_entry_point_group(tmp_path, monkeypatch):
    import importlib
    import sys

    from trainer_lib.registry import ENTRY_POINT_GROUP, resolve_report_to

    (tmp_path / "flytrain_plugin_demo.py").write_text(ENTRY_POINT_MODULE)
    dist = tmp_path / "flytrain_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flytrain-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nplugin_tracker = flytrain_plugin_demo:PluginCallback\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        (cls,) = resolve_report_to(["plugin_tracker"])
        assert cls.__name__ == "PluginCallback"
        train, _ = digits(64, 0)
        args = TrainingArguments(output_dir=str(tmp_path / "out"), disable_tqdm=True, max_steps=4, logging_steps=2,
                                 per_device_train_batch_size=16, save_strategy="no", report_to=["plugin_tracker"])
        Trainer(make_model(), args, train_dataset=train).train()
        assert sys.modules["flytrain_plugin_demo"].SEEN == [2, 4, 4]  # two step logs, then the train summary
    finally:
        sys.modules.pop("flytrain_plugin_demo", None)
