"""TensorBoard: event files read back with TensorBoard's own EventAccumulator; a resumed run logs each step once."""

from __future__ import annotations

import json
from functools import partial

import pytest

from tests.helpers import make_trainer as shared_trainer

SECRET = "tb-s3cr3t-value-42"


make_trainer = partial(shared_trainer, report_to=["tensorboard"],
                       extra={"service_token": SECRET, "note": f"uses {SECRET}"})


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

    # another data order after the checkpoint: the resumed run's steps 11-20 see other batches, other losses
    resumed = make_trainer(out, logging_dir=str(tmp_path / "another_dir"), shuffled_data=True)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-10"))

    assert not (tmp_path / "another_dir").exists()  # the log dir came from the checkpoint
    acc = read_events(log_dir)
    loss = scalars(acc, "train/loss")
    assert [s for s, _ in loss] == [5, 10, 15, 20]
    resumed_losses = [v for s, v in logged(resumed, "loss") if s > 10]
    first_losses = [v for s, v in logged(first, "loss") if s > 10]
    assert all(abs(a - b) > 1e-6 for a, b in zip(resumed_losses, first_losses))  # the data order did change
    assert [v for _, v in loss[2:]] == pytest.approx(resumed_losses, rel=1e-6)  # and the resumed run wrote them
    assert [s for s, _ in scalars(acc, "eval/accuracy")] == [10, 20]
    assert [s for s, _ in scalars(acc, "train/train_runtime")] == [20]


def test_one_event_per_log_reads_back_as_add_scalar_per_value(tmp_path):
    """The callback writes a log event's scalars as one TensorBoard event; TensorBoard must read back exactly what
    add_scalar per value gives (tags, steps, float32 values, NaN), also after a purge_step (a resumed run)."""
    import math

    from torch.utils.tensorboard import SummaryWriter

    from callbacks.tensorboard import write_scalars

    events = [(10, [("train/loss", 2.25), ("train/learning_rate", 1e-3), ("train/epoch", 0.5)]),
              (20, [("train/loss", float("nan")), ("eval/accuracy", 0.9375), ("train/flag", 1)]),
              (30, [("train/loss", 0.1234567)])]
    read = {}
    for way in ("per_value", "one_event"):
        for purge in (None, 15):
            writer = SummaryWriter(log_dir=str(tmp_path / f"{way}-{purge}"), purge_step=purge)
            for step, values in events:
                if way == "per_value":
                    for tag, value in values:
                        writer.add_scalar(tag, value, step)
                else:
                    write_scalars(writer, values, step)
            writer.close()
            acc = read_events(tmp_path / f"{way}-{purge}")
            read[way, purge] = {tag: [(e.step, "nan" if math.isnan(e.value) else e.value) for e in acc.Scalars(tag)]
                                for tag in acc.Tags()["scalars"]}
    assert read["one_event", None]["train/loss"][1] == (20, "nan")
    assert set(read["one_event", None]) == {"train/loss", "train/learning_rate", "train/epoch", "eval/accuracy",
                                            "train/flag"}
    assert read["one_event", None] == read["per_value", None]
    assert read["one_event", 15] == read["per_value", 15]
