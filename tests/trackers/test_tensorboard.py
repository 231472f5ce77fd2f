"""TensorBoard: event files read back with TensorBoard's own EventAccumulator; a resumed run logs each step once."""

from __future__ import annotations

import json

import pytest

from tests.helpers import accuracy, digits, make_model
from trainer_lib import Trainer, TrainingArguments

SECRET = "tb-s3cr3t-value-42"


def make_trainer(out, **overrides) -> Trainer:
    train, evaluation = digits(256, 64)
    values = dict(
        output_dir=str(out), max_steps=20, logging_steps=5, save_steps=10, eval_strategy="steps", eval_steps=10,
        per_device_train_batch_size=16, report_to=["tensorboard"], disable_tqdm=True, strict_integrations=True,
        extra={"service_token": SECRET, "note": f"uses {SECRET}"},
    )
    values.update(overrides)
    return Trainer(make_model(), TrainingArguments(**values), train_dataset=train, eval_dataset=evaluation,
                   compute_metrics=accuracy)


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def text(acc, tag):
    (event,) = acc.Tensors(f"{tag}/text_summary")
    return event.tensor_proto.string_val[0].decode()


def logged(trainer, key):
    return [(e["step"], e[key]) for e in trainer.state.log_history if key in e]


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)


def test_scalars_and_texts_read_back_step_by_step(tmp_path):
    trainer = make_trainer(tmp_path / "out")
    trainer.train()
    acc = read_events(trainer.args.logging_dir)

    for tag, key in (("train/loss", "loss"), ("eval/accuracy", "eval_accuracy"), ("train/learning_rate", "learning_rate")):
        got = scalars(acc, tag)
        want = logged(trainer, key)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag
    assert [s for s, _ in scalars(acc, "train/loss")] == [5, 10, 15, 20]
    assert [s for s, _ in scalars(acc, "eval/accuracy")] == [10, 20]
    epoch_steps = [s for s, _ in scalars(acc, "train/epoch")]
    assert epoch_steps == sorted(set(epoch_steps))  # epoch rides on every log but is written once per step
    assert [s for s, _ in scalars(acc, "train/train_loss")] == [20]

    args_text = text(acc, "args")
    assert json.loads(args_text)["learning_rate"] == trainer.args.learning_rate
    assert SECRET not in args_text
    assert json.loads(text(acc, "model_config")) == {"hidden": 32, "dropout": 0.1}


def test_resumed_run_writes_each_step_once_into_the_same_dir(tmp_path):
    out = tmp_path / "out"
    first = make_trainer(out)
    first.train()  # goes to step 20; the resumed run below redoes steps 11-20
    log_dir = first.args.logging_dir

    resumed = make_trainer(out, logging_dir=str(tmp_path / "another_dir"))
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-10"))

    assert not (tmp_path / "another_dir").exists()  # the log dir came from the checkpoint
    acc = read_events(log_dir)
    loss = scalars(acc, "train/loss")
    assert [s for s, _ in loss] == [5, 10, 15, 20]
    assert [v for _, v in loss[2:]] == pytest.approx([v for s, v in logged(resumed, "loss") if s > 10], rel=1e-6)
    assert [s for s, _ in scalars(acc, "eval/accuracy")] == [10, 20]
    assert [s for s, _ in scalars(acc, "train/train_runtime")] == [20]
