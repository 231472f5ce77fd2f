"""Coalesced log delivery (callbacks._common.TrackerCallback): TensorBoard, W&B and DVCLive hold log events for their send
interval, yet send everything before a checkpoint, at the end, and when training raises."""

from __future__ import annotations

import csv
import os

import pytest

from callbacks import DVCLiveCallback, TensorBoardCallback
from tests.helpers import make_trainer as shared_trainer
from tests.trackers.test_tensorboard import read_events, scalars
from tests.trackers.test_wandb import read_run, wandb_env  # noqa: F401 (fixture)
from trainer_lib import Trainer, TrainerCallback


def dvclive_steps(folder) -> list[int]:
    path = os.path.join(folder, "plots", "metrics", "train", "loss.tsv")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f, delimiter="\t")]


class Probe(TrainerCallback):
    """Reads what the trackers have written so far, after they handled each event (user callbacks run last)."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[list[int], list[int]]] = {}

    def _look(self, when, state, kwargs):
        tb = next(cb for cb in self.handler.callbacks if isinstance(cb, TensorBoardCallback))
        live = next(cb for cb in self.handler.callbacks if isinstance(cb, DVCLiveCallback))
        tb_steps = [s for s, _ in scalars(read_events(tb.log_dir), "train/loss")] if "train/loss" in (
            read_events(tb.log_dir).Tags()["scalars"]) else []
        self.seen[f"{when}@{state.global_step}"] = (tb_steps, dvclive_steps(live.live.dir))

    def on_log(self, args, state, control, **kwargs):
        self._look("log", state, kwargs)

    def on_save(self, args, state, control, **kwargs):
        self._look("save", state, kwargs)


def make_trainer(out, callbacks=(), **overrides) -> Trainer:
    overrides = {"report_to": ["tensorboard", "dvclive"], "eval_strategy": "no", **overrides}
    trainer = shared_trainer(out, callbacks=list(callbacks), **overrides)
    for cb in callbacks:
        cb.handler = trainer.callback_handler
    return trainer


def test_events_wait_for_the_interval_but_a_checkpoint_sends_them_all(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYTRAIN_TRACKER_SEND_INTERVAL", "3600")
    probe = Probe()
    make_trainer(tmp_path / "out", [probe]).train()
    # the first event goes out at once (nothing was sent yet); the next waits for the interval ...
    assert probe.seen["log@5"] == ([5], [5])
    # ... until a checkpoint: everything logged up to it is on disk before on_save
    assert probe.seen["save@10"] == ([5, 10], [5, 10])
    assert probe.seen["log@15"] == ([5, 10], [5, 10])
    final = dvclive_steps(tmp_path / "out" / "dvclive")
    assert final == [5, 10, 15, 20]


@pytest.mark.parametrize("clock_origin", [0.0, 3.5, 1e9])
def test_the_first_event_goes_out_at_once_whatever_the_clock_origin(tmp_path, monkeypatch, clock_origin):
    """time.monotonic() counts from boot on Linux: on a machine up for seconds it is far below the interval."""
    import callbacks._common as common

    monkeypatch.setattr(common.time, "monotonic", lambda: clock_origin)  # a clock that stands still near boot
    monkeypatch.setenv("FLYTRAIN_TRACKER_SEND_INTERVAL", "3600")
    probe = Probe()
    make_trainer(tmp_path / "out", [probe], save_strategy="no").train()
    assert probe.seen["log@5"] == ([5], [5])
    assert probe.seen["log@15"] == ([5], [5])  # the clock never advanced: the rest waits for the end
    assert dvclive_steps(tmp_path / "out" / "dvclive") == [5, 10, 15, 20]


def test_send_due_treats_never_sent_as_due(monkeypatch):
    import callbacks._common as common

    monkeypatch.setattr(common.time, "monotonic", lambda: 1.0)
    assert common.send_due(None, 3600.0)
    assert not common.send_due(0.0, 3600.0)  # the old rule: last send at 0 on a clock that reads 1 s after boot
    assert common.send_due(0.0, 0.5)


def test_interval_zero_sends_every_event(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYTRAIN_TRACKER_SEND_INTERVAL", "3600")
    monkeypatch.setenv("FLYTRAIN_TENSORBOARD_SEND_INTERVAL", "0")  # the per-tracker variable wins
    probe = Probe()
    make_trainer(tmp_path / "out", [probe], save_strategy="no").train()
    assert probe.seen["log@15"] == ([5, 10, 15], [5])


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 13:
            raise RuntimeError("boom at step 13")


def test_a_raising_training_keeps_every_logged_step(tmp_path, monkeypatch, wandb_env):  # noqa: F811
    monkeypatch.setenv("FLYTRAIN_TRACKER_SEND_INTERVAL", "3600")
    trainer = make_trainer(tmp_path / "out", [Boom()], save_strategy="no",
                           report_to=["tensorboard", "dvclive", "wandb"])
    with pytest.raises(RuntimeError, match="boom at step 13"):
        trainer.train()
    tb = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback))
    assert [s for s, _ in scalars(read_events(tb.log_dir), "train/loss")] == [5, 10]
    assert dvclive_steps(tmp_path / "out" / "dvclive") == [5, 10]
    (run_dir,) = [p for p in (wandb_env / "wandb").iterdir() if p.name.startswith("offline-run-")]
    run = read_run(str(run_dir))
    assert [row["train/global_step"] for row in run["history"]] == [5, 10]
    assert run["exit"] == 1  # the W&B run ends failed, not left open


@pytest.mark.parametrize("name", ["FLYTRAIN_TRACKER_SEND_INTERVAL", "FLYTRAIN_DVCLIVE_SEND_INTERVAL"])
def test_a_bad_interval_names_the_variable(tmp_path, monkeypatch, name):
    monkeypatch.setenv(name, "soon")
    with pytest.raises(ValueError, match=name):
        make_trainer(tmp_path / "out")
