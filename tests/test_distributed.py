"""The Trainer under torchrun (DDP with gloo on CPU): sharded data, rank-0-only side effects, identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from trainer_lib.checkpoint import load_weights

SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {root!r})
import torch
from tests.helpers import accuracy, digits, make_model
from trainer_lib import Trainer, TrainingArguments

out, trackers = sys.argv[1], sys.argv[2:] == ["trackers"]
rank = int(os.environ["RANK"])
train, evaluation = digits(128, 40)
# with trackers: every rank is given its own folders, so a rank that wrote anything would leave it behind
extra, callbacks = {{}}, None
if trackers:
    from callbacks.dvclive import DVCLiveCallback
    extra = dict(report_to=["tensorboard"], logging_dir=os.path.join(out, f"tb-rank{{rank}}"))
    callbacks = [DVCLiveCallback(dir=os.path.join(out, f"dvclive-rank{{rank}}"))]
args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, max_steps=8, learning_rate=1e-2,
                         logging_steps=2, save_steps=4, eval_strategy="steps", eval_steps=4, disable_tqdm=True,
                         **extra)
trainer = Trainer(make_model(dropout=0.0), args, train_dataset=train, eval_dataset=evaluation, compute_metrics=accuracy,
                  callbacks=callbacks)
trainer.train()
torch.save(trainer.model.state_dict(), os.path.join(out, f"rank{{rank}}.pt"))
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"zero": trainer.state.is_world_process_zero, "history": trainer.state.log_history,
               "batches": len(trainer.get_train_dataloader())}}, f)
"""


def run_torchrun(tmp_path, *script_args: str):
    """The script above under ``torchrun --nproc_per_node 2`` (gloo on CPU); returns its output folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(root=root))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(out), *script_args],
                   check=True, env=env, timeout=300)
    return out


def test_torchrun_two_processes(tmp_path):
    out = run_torchrun(tmp_path)
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["zero"] and not r1["zero"]
    assert r0["batches"] == 4  # 128 samples / 2 ranks / 16 per batch: each rank loads only its shard
    w0 = torch.load(out / "rank0.pt", weights_only=True)
    w1 = torch.load(out / "rank1.pt", weights_only=True)
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    # the reduced loss and the gathered eval metrics are identical on both ranks
    for a, b in zip(r0["history"], r1["history"]):
        assert (a["step"], a.get("loss"), a.get("eval_accuracy"), a.get("eval_loss")) == (
            b["step"], b.get("loss"), b.get("eval_accuracy"), b.get("eval_loss"))
    assert any("eval_accuracy" in e for e in r0["history"])
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-4", "checkpoint-8"]
    saved = load_weights(str(out / "checkpoint-8"))
    for key in w0:
        assert torch.equal(saved[key], w0[key])


def test_torchrun_only_rank_zero_writes_tracker_output(tmp_path):
    """TensorBoard (through report_to) and DVCLive (a callback instance), each rank given its own folders: rank 0's
    hold every logged step, rank 1 created nothing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_torchrun(tmp_path, "trackers")
    r0 = json.loads((out / "rank0.json").read_text())
    losses = [(e["step"], e["loss"]) for e in r0["history"] if "loss" in e]
    r1 = json.loads((out / "rank1.json").read_text())  # rank 1 trained to the end
    assert [(e["step"], e["loss"]) for e in r1["history"] if "loss" in e] == losses
    assert [s for s, _ in losses] == [2, 4, 6, 8]

    events = EventAccumulator(str(out / "tb-rank0"))
    events.Reload()
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == [(s, round(v, 5)) for s, v in losses]
    with open(out / "dvclive-rank0" / "plots" / "metrics" / "train" / "loss.tsv") as f:
        assert [int(line.split("\t")[0]) for line in f.read().splitlines()[1:]] == [2, 4, 6, 8]
    assert not (out / "tb-rank1").exists() and not (out / "dvclive-rank1").exists()
