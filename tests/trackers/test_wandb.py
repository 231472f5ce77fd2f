"""W&B in offline mode: the run's transaction log (.wandb) is read back record by record."""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import time
from functools import partial

import pytest
from google.protobuf.message import DecodeError

from tests.helpers import make_trainer as shared_trainer

SECRET = "wb-s3cr3t-value-42"
BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) framed chunks


def wandb_records(path: str):
    """Yield the protobuf ``Record`` messages of an offline run's .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or last piece
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def items(updates) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in updates}


def read_run(run_dir: str, timeout: float = 20.0) -> dict:
    """The run's records; waits for its exit record, since wandb's service may still be flushing the file."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            run = _read_run_once(run_dir)
        except DecodeError:
            run = None
        if (run is not None and run["exit"] is not None) or time.monotonic() > deadline:
            assert run is not None, f"{run_dir}: unreadable W&B transaction log"
            return run
        time.sleep(0.1)


def _read_run_once(run_dir: str) -> dict:
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    run = {"history": [], "summary": {}, "config": {}, "artifacts": [], "exit": None, "raw": open(path, "rb").read()}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"], run["project"], run["name"] = record.run.run_id, record.run.project, record.run.display_name
            run["config"].update(items(record.run.config.update))
        elif kind == "config":
            run["config"].update(items(record.config.update))
        elif kind == "history":
            run["history"].append(items(record.history.item))
        elif kind == "summary":
            run["summary"].update(items(record.summary.update))
        elif kind == "artifact":
            run["artifacts"].append((record.artifact.name, [f.path for f in record.artifact.manifest.contents]))
        elif kind == "exit":
            run["exit"] = record.exit.exit_code
    return run


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.makedirs(tmp_path / name, exist_ok=True)
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)
    for name in ("WANDB_DISABLED", "WANDB_PROJECT", "WANDB_LOG_MODEL", "WANDB_WATCH", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path / "WANDB_DIR"
    import sys

    if "wandb" in sys.modules:  # wandb keeps its settings (WANDB_DIR included) per process: reset them
        sys.modules["wandb"].teardown()


make_trainer = partial(shared_trainer, report_to=["wandb"], run_name="digits-mlp",
                       extra={"service_token": SECRET, "note": f"uses {SECRET}"})


def test_offline_run_config_metrics_artifacts_and_resume(wandb_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_LOG_MODEL", "checkpoint")
    out = tmp_path / "out"
    first = make_trainer(out)
    first.train()
    (run_dir,) = glob.glob(str(wandb_env / "wandb" / "offline-run-*"))
    run = read_run(run_dir)

    assert run["project"] == "flytrain" and run["name"] == "digits-mlp"
    assert run["config"]["learning_rate"] == first.args.learning_rate
    assert run["config"]["model.hidden"] == 32
    assert SECRET not in run["config"]["extra"] and SECRET.encode() not in run["raw"]
    losses = [(h["train/global_step"], h["train/loss"]) for h in run["history"] if "train/loss" in h]
    assert losses == [(e["step"], pytest.approx(e["loss"])) for e in first.state.log_history if "loss" in e]
    assert [h["train/global_step"] for h in run["history"] if "eval/accuracy" in h] == [10, 20]
    assert run["summary"]["train/loss"] == pytest.approx(losses[-1][1])
    assert "train/train_runtime" in run["summary"]
    assert not any("train/train_runtime" in h for h in run["history"])  # one-off values: summary only
    names = [name for name, _ in run["artifacts"]]
    assert names == [f"model-{run['id']}"] * 3  # checkpoint-10, checkpoint-20, final model
    assert "trainer_state.json" in run["artifacts"][0][1] and "model.safetensors" in run["artifacts"][-1][1]
    assert run["exit"] == 0

    state = json.load(open(out / "checkpoint-10" / "trainer_state.json"))
    assert state["stateful_callbacks"]["WandbCallback"]["attributes"]["run_id"] == run["id"]

    monkeypatch.setenv("WANDB_LOG_MODEL", "false")
    resumed = make_trainer(out)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-10"))
    (second_dir,) = set(glob.glob(str(wandb_env / "wandb" / "offline-run-*"))) - {run_dir}
    second = read_run(second_dir)
    assert second["id"] == run["id"]
    assert [h["train/global_step"] for h in second["history"] if "train/loss" in h] == [15, 20]
    assert second["artifacts"] == [] and second["exit"] == 0


def test_wandb_disabled_does_nothing(wandb_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DISABLED", "true")
    trainer = make_trainer(tmp_path / "out", max_steps=5, eval_strategy="no")
    trainer.train()
    assert trainer.state.global_step == 5
    assert os.listdir(wandb_env) == []


@pytest.mark.parametrize("name", ["WANDB_LOG_MODEL", "WANDB_WATCH"])
def test_invalid_environment_is_a_clear_error(wandb_env, tmp_path, monkeypatch, name):
    monkeypatch.setenv(name, "sometimes")
    with pytest.raises(ValueError, match=name):
        make_trainer(tmp_path / "out")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("watch, present, absent", [("gradients", "gradients/", "parameters/"),
                                                    ("parameters", "parameters/", "gradients/")])
def test_watch_histograms_and_the_model_logged_at_the_end(wandb_env, tmp_path, monkeypatch, watch, present, absent):
    monkeypatch.setenv("WANDB_WATCH", watch)
    monkeypatch.setenv("WANDB_LOG_MODEL", "end")
    # wandb.watch logs every max(100, logging_steps) batches: 200 steps give two histogram rows
    trainer = make_trainer(tmp_path / "out", max_steps=200, logging_steps=20, save_steps=100, eval_strategy="no")
    model = trainer.model
    trainer.train()
    (run_dir,) = glob.glob(str(wandb_env / "wandb" / "offline-run-*"))
    run = read_run(run_dir)

    # a histogram is stored as nested items: <kind>/<parameter>/{_type, values, bins}; wandb prefixes the names
    # with graph_<n> from the second watched model of a process on
    rows = [{re.sub(r"/graph_\d+", "/", key): value for key, value in row.items()} for row in run["history"]]
    keys = {key for row in rows for key in row}
    assert {f"{present}net.0.weight/_type", f"{present}net.3.bias/values"} <= keys, sorted(keys)
    assert not any(key.startswith(absent) for key in keys)
    rows = [row for row in rows if f"{present}net.0.weight/_type" in row]
    assert len(rows) == 2
    assert all(row[f"{present}net.0.weight/_type"] == "histogram" and sum(row[f"{present}net.0.weight/values"]) > 0
               for row in rows)
    # no hooks left on the model once the run is over
    assert not any(p._backward_hooks for p in model.parameters() if p._backward_hooks is not None)
    assert not model._forward_hooks

    # WANDB_LOG_MODEL=end: one model artifact, the final model files (no checkpoint folder), after training
    ((name, files),) = run["artifacts"]
    assert name == f"model-{run['id']}"
    assert "model.safetensors" in files and "trainer_state.json" not in files
    assert run["exit"] == 0
