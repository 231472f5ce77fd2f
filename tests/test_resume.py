"""Exact resume: mid-epoch, after kill -9, from damaged checkpoints, and never unpickling anything."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import make_trainer as shared_make_trainer
from tests.reliability.hostile import StepCounter
from trainer_lib import CheckpointError, EarlyStoppingCallback, Trainer
from trainer_lib.checkpoint import load_weights

TIMING = ("_runtime", "_per_second")


def comparable(history):
    return [{k: v for k, v in e.items() if not k.endswith(TIMING)} for e in history]


#: the resume tests' run: 3 epochs of 13 micro-batches with gradient accumulation 2, so checkpoints fall mid epoch
RESUME_RUN = dict(
    n_train=200, n_eval=40, model_kwargs={"dropout": 0.3}, max_steps=-1, per_device_train_batch_size=16,
    num_train_epochs=3, learning_rate=3e-3, logging_steps=4, save_steps=5, eval_strategy="steps", eval_steps=7,
    metric_for_best_model="accuracy", gradient_accumulation_steps=2, weight_decay=0.01, warmup_steps=3,
)


def make_trainer(out, callbacks=None, **overrides):
    return shared_make_trainer(out, callbacks=callbacks, **{**RESUME_RUN, **overrides})


def assert_same_run(a: Trainer, b: Trainer):
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    opt_a, opt_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    for pid, st in opt_a["state"].items():
        for name, tensor in st.items():
            assert torch.equal(tensor, opt_b["state"][pid][name]), (pid, name)
    assert comparable(a.state.log_history) == comparable(b.state.log_history)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_resume_mid_epoch_is_bit_exact(tmp_path, asynchronous, caplog):
    full = make_trainer(tmp_path / "full", async_checkpointing=asynchronous)
    full.train()
    # 200 samples / 16 = 13 micro-batches per epoch, gas 2 → 7 updates per epoch; step 10 is mid epoch 2
    partial_dir = tmp_path / "partial"
    shutil.copytree(tmp_path / "full" / "checkpoint-10", partial_dir / "checkpoint-10")
    counter = StepCounter()
    resumed = make_trainer(partial_dir, async_checkpointing=asynchronous, callbacks=[counter])
    with caplog.at_level(logging.INFO, logger="trainer_lib"):
        resumed.train(resume_from_checkpoint=str(partial_dir / "checkpoint-10"))
    assert resumed.state.global_step == full.state.global_step == 21
    assert counter.steps == 21 - 10  # it continued from step 10, it did not train again from scratch
    assert f"Resuming from {partial_dir / 'checkpoint-10'} at global step 10" in caplog.text
    assert_same_run(full, resumed)


class EpochShuffle(torch.utils.data.Sampler):
    """A user's sampler: its order depends only on the epoch it is told (as a DistributedSampler's does)."""

    def __init__(self, size):
        self.size, self.epoch, self.epochs_set = size, 0, []

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.epochs_set.append(epoch)

    def __len__(self):
        return self.size

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(100 + self.epoch)).tolist())


class OwnLoaderTrainer(Trainer):
    """A get_train_dataloader override, as users of the reference write them."""

    def get_train_dataloader(self):
        from trainer_lib.data import default_data_collator

        self.user_sampler = EpochShuffle(len(self.train_dataset))
        return torch.utils.data.DataLoader(self.train_dataset, batch_size=16, sampler=self.user_sampler,
                                           collate_fn=default_data_collator)


def _own_loader_trainer(out, callbacks=None):
    from tests.helpers import digits, make_model
    from trainer_lib import TrainingArguments

    train, _ = digits(200, 8)  # 13 batches an epoch
    args = TrainingArguments(output_dir=str(out), max_steps=-1, num_train_epochs=2, per_device_train_batch_size=16,
                             logging_steps=4, save_steps=5, disable_tqdm=True, learning_rate=3e-3)
    return OwnLoaderTrainer(make_model(dropout=0.3), args, train_dataset=train, callbacks=callbacks)


def test_a_get_train_dataloader_override_trains_and_resumes_mid_epoch(tmp_path):
    """The loader is the user's: its sampler is told each epoch, and a resumed epoch drops the batches already
    trained, so an order that depends only on the epoch resumes exactly."""
    full = _own_loader_trainer(tmp_path / "full")
    full.train()
    assert full.state.global_step == 26 and full.user_sampler.epochs_set == [0, 1]
    partial_dir = tmp_path / "partial"
    shutil.copytree(tmp_path / "full" / "checkpoint-15", partial_dir / "checkpoint-15")  # epoch 1, its 3rd batch
    counter = StepCounter()
    resumed = _own_loader_trainer(partial_dir, callbacks=[counter])
    resumed.train(resume_from_checkpoint=str(partial_dir / "checkpoint-15"))
    assert counter.steps == 26 - 15 and resumed.user_sampler.epochs_set == [1]
    assert_same_run(full, resumed)


def test_a_loader_without_a_length_is_named(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter({"x": torch.zeros(64), "labels": torch.tensor(0)} for _ in range(8))

    class StreamTrainer(OwnLoaderTrainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(Stream(), batch_size=4)

    trainer = _own_loader_trainer(tmp_path)
    trainer.__class__ = StreamTrainer
    with pytest.raises(ValueError, match="get_train_dataloader.. returned a DataLoader without a length"):
        trainer.train()


def test_resume_true_takes_the_newest_valid_checkpoint(tmp_path, caplog):
    full = make_trainer(tmp_path / "full")
    full.train()
    out = tmp_path / "run"
    for step in (5, 10, 15):
        shutil.copytree(tmp_path / "full" / f"checkpoint-{step}", out / f"checkpoint-{step}")
    # damage the newest one: resume must fall back to checkpoint-10 with a warning naming the file
    weights = out / "checkpoint-15" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    counter = StepCounter()
    resumed = make_trainer(out, callbacks=[counter])
    with caplog.at_level(logging.INFO, logger="trainer_lib"):
        resumed.train(resume_from_checkpoint=True)
    assert "checkpoint-15" in caplog.text and "model.safetensors" in caplog.text
    assert f"Resuming from {out / 'checkpoint-10'} at global step 10" in caplog.text
    assert counter.steps == 21 - 10
    assert_same_run(full, resumed)


def test_resume_true_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no valid checkpoint"):
        make_trainer(tmp_path / "empty").train(resume_from_checkpoint=True)


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncate_weights", "model.safetensors"),
        ("delete_optimizer", "optimizer.safetensors"),
        ("flip_bytes", "optimizer.safetensors"),
        ("delete_state", "trainer_state.json"),
        ("delete_manifest", "manifest.json"),
    ],
)
def test_damaged_checkpoint_is_refused_and_nothing_is_loaded(tmp_path, damage, expected):
    source = make_trainer(tmp_path / "src", max_steps=5, eval_strategy="no")
    source.train()
    ck = tmp_path / "src" / "checkpoint-5"
    if damage == "truncate_weights":
        (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:50])
    elif damage == "delete_optimizer":
        (ck / "optimizer.safetensors").unlink()
    elif damage == "flip_bytes":
        data = bytearray((ck / "optimizer.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ck / "optimizer.safetensors").write_bytes(bytes(data))
    elif damage == "delete_state":
        (ck / "trainer_state.json").unlink()
    else:
        (ck / "manifest.json").unlink()
    trainer = make_trainer(tmp_path / "other", max_steps=8, eval_strategy="no")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=expected):
        trainer.train(resume_from_checkpoint=str(ck))
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key])
    assert not (tmp_path / "other").exists() or not list((tmp_path / "other").glob("checkpoint-*"))


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_in_checkpoint_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = make_trainer(tmp_path / "src", max_steps=5, eval_strategy="no")
    source.train()
    ck = tmp_path / "src" / "checkpoint-5"
    with open(ck / "scheduler.pt", "wb") as f:
        pickle.dump({"state": Boom()}, f)
    # make the manifest agree, as an attacker would
    manifest = json.loads((ck / "manifest.json").read_text())
    import zlib

    blob = (ck / "scheduler.pt").read_bytes()
    manifest["files"]["scheduler.pt"] = {"size": len(blob), "crc32": f"{zlib.crc32(blob):08x}"}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="weights_only"):
        make_trainer(tmp_path / "other", max_steps=8, eval_strategy="no").train(resume_from_checkpoint=str(ck))
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_contents_and_atomicity(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=5, eval_strategy="no")
    trainer.train()
    ck = tmp_path / "checkpoint-5"
    names = {p.name for p in ck.iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.pt", "rng_state.pt", "trainer_state.json",
            "loop_state.json", "training_args.json", "manifest.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    weights = load_weights(str(ck))
    assert set(weights) == set(trainer.model.state_dict())
    args = json.loads((ck / "training_args.json").read_text())
    assert args["max_steps"] == 5


def test_early_stopping_counter_survives_resume(tmp_path):
    es = EarlyStoppingCallback(early_stopping_patience=100)
    trainer = make_trainer(tmp_path, callbacks=[es], eval_steps=1, save_steps=1, max_steps=6, greater_is_better=False,
                           metric_for_best_model="loss", learning_rate=1.0)
    trainer.train()
    counter = es.early_stopping_patience_counter
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"] == counter
    es2 = EarlyStoppingCallback(early_stopping_patience=100)
    resumed = make_trainer(tmp_path, callbacks=[es2], eval_steps=1, save_steps=1, max_steps=6,
                           greater_is_better=False, metric_for_best_model="loss", learning_rate=1.0)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert counter > 0  # a counter of 0 would survive a resume that restores nothing
    assert es2.early_stopping_patience_counter == counter


KILL_SCRIPT = r"""
import logging, sys, time
sys.path.insert(0, {root!r})
from tests.reliability.hostile import StepCounter
from tests.test_resume import make_trainer
from trainer_lib import TrainerCallback

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        time.sleep(0.05)

logging.basicConfig(level=logging.INFO)
counter = StepCounter()
t = make_trainer(sys.argv[1], callbacks=[Slow(), counter], save_steps=3, async_checkpointing=sys.argv[3] == "async")
t.train(resume_from_checkpoint=(sys.argv[2] == "resume") or None)
print("OPTIMIZER_STEPS", counter.steps)
"""


@pytest.mark.parametrize("kill_after_checkpoints, mode", [(1, "sync"), (3, "sync"), (2, "async")])
def test_kill_9_then_resume_matches_uninterrupted(tmp_path, kill_after_checkpoints, mode):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(root=root))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "fresh", mode])
    deadline = time.time() + 120
    while time.time() < deadline:
        if len(list(out.glob("checkpoint-*"))) >= kill_after_checkpoints:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the child was not killed by SIGKILL (it finished first)"
    at_kill = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert at_kill, "no checkpoint was written before the kill"
    assert 21 not in at_kill, "the run had finished its last checkpoint: the kill tests no resume"
    k = at_kill[-1]
    done = subprocess.run([sys.executable, str(script), str(out), "resume", mode], check=True, capture_output=True,
                          text=True)
    assert f"Resuming from {out / f'checkpoint-{k}'} at global step {k}" in done.stderr
    assert f"OPTIMIZER_STEPS {21 - k}" in done.stdout  # exactly the steps after checkpoint-k
    full = make_trainer(tmp_path / "full", save_steps=3)
    full.train()
    final = json.loads((out / "checkpoint-21" / "trainer_state.json").read_text())
    assert comparable(final["log_history"]) == comparable(
        json.loads((tmp_path / "full" / "checkpoint-21" / "trainer_state.json").read_text())["log_history"]
    )
    resumed_weights = load_weights(str(out / "checkpoint-21"))
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed_weights[key], value), key
    steps = [e["step"] for e in final["log_history"] if "loss" in e]
    assert steps == sorted(set(steps))
