"""Neptune in offline mode: the run's on-disk operation queue (.neptune/offline/run__*/data-*.log) is read back."""

from __future__ import annotations

import glob
import json
import logging
import os
from functools import partial

import pytest

from callbacks.neptune import NeptuneCallback
from tests.helpers import make_trainer as shared_trainer
from trainer_lib.checkpoint import list_checkpoints

TOKEN = "neptune-dummy-api-token-0123456789"
SECRET = "nep-s3cr3t-value-42"


def read_runs(root) -> list[dict]:
    """Every offline run under ``root/.neptune``: its metadata, operations and raw bytes, oldest first."""
    runs = []
    for folder in glob.glob(str(root / ".neptune" / "offline" / "run__*")):
        metadata = json.load(open(os.path.join(folder, "metadata.json")))
        operations, raw = [], b""
        for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
            if os.path.isfile(path):
                raw += open(path, "rb").read()
        for path in sorted(glob.glob(os.path.join(folder, "data-*.log"))):
            operations += [json.loads(line)["obj"] for line in open(path) if line.strip()]
        runs.append({"metadata": metadata, "operations": operations, "raw": raw})
    return sorted(runs, key=lambda r: r["metadata"]["createdAt"])


def logged(run: dict, path: str) -> list[tuple[int, float]]:
    return [(v["step"], v["value"]) for op in run["operations"]
            if op["type"] == "LogFloats" and "/".join(op["path"]) == path for v in op["values"]]


def assigned(run: dict, path: str) -> list:
    return [op.get("value", op.get("file_globs")) for op in run["operations"] if "/".join(op["path"]) == path
            and op["type"].startswith(("Assign", "UploadFileSet"))]


@pytest.fixture
def neptune_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # offline runs are written to ./.neptune
    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    monkeypatch.setenv("NEPTUNE_PROJECT", "flytrain/tests")
    monkeypatch.setenv("NEPTUNE_API_TOKEN", TOKEN)
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)
    return tmp_path


make_trainer = partial(shared_trainer, report_to=["neptune"], max_steps=8, logging_steps=2, save_steps=4,
                       eval_steps=4, extra={"service_token": SECRET})


@pytest.mark.timeout(90)
def test_offline_run_holds_parameters_and_metric_series(neptune_env, caplog):
    trainer = make_trainer(neptune_env / "out")
    trainer.train()

    (run,) = read_runs(neptune_env)
    assert run["metadata"]["mode"] == "offline"
    history = trainer.state.log_history
    expected = [(e["step"], pytest.approx(e["loss"])) for e in history if "loss" in e]
    assert len(expected) == 4
    assert logged(run, "finetuning/train/loss") == expected
    assert logged(run, "finetuning/eval/accuracy") == [(e["step"], pytest.approx(e["eval_accuracy"]))
                                                       for e in history if "eval_accuracy" in e]
    # once-per-run values are single fields, not series
    assert assigned(run, "finetuning/train/epoch")[-1] == pytest.approx(history[-1]["epoch"])
    assert assigned(run, "finetuning/train/train_runtime") and not logged(run, "finetuning/train/train_runtime")

    params = "finetuning/trainer_parameters/"
    assert assigned(run, params + "learning_rate") == [trainer.args.learning_rate]
    assert assigned(run, params + "model.hidden") == [32]
    assert assigned(run, params + "eval_strategy") == ["steps"]
    assert TOKEN.encode() not in run["raw"] and SECRET.encode() not in run["raw"]
    assert not any(op["path"][0] == "finetuning" and "checkpoints" in op["path"] for op in run["operations"])

    # the run was stopped at train end; an offline run cannot be reopened: said once, nothing else written
    with caplog.at_level(logging.WARNING, logger="callbacks"):
        trainer.evaluate()
        trainer.evaluate()
    assert sum("cannot be reopened" in r.getMessage() for r in caplog.records) == 1
    (again,) = read_runs(neptune_env)
    assert again["operations"] == run["operations"]


@pytest.mark.timeout(90)
def test_checkpoints_per_log_checkpoints_and_explicit_arguments(neptune_env):
    callback = NeptuneCallback(api_token=TOKEN, name="digits-mlp", base_namespace="custom/ns",
                               log_checkpoints="best", tags=["unit"])
    trainer = make_trainer(neptune_env / "out", callbacks=[callback], report_to="none", save_total_limit=1,
                           metric_for_best_model="loss", max_steps=12)
    trainer.train()

    (run,) = read_runs(neptune_env)
    assert assigned(run, "sys/name") == ["digits-mlp"]
    assert [op["values"] for op in run["operations"] if op["path"] == ["sys", "tags"]] == [["unit"]]
    assert [s for s, _ in logged(run, "custom/ns/train/loss")] == [2, 4, 6, 8, 10, 12]
    # "best": only checkpoints that were the best so far, each replacing the previous one in a single slot
    uploads = [op for op in run["operations"] if op["path"] == ["custom", "ns", "checkpoints", "best"]]
    steps = assigned(run, "custom/ns/checkpoints/best_step")
    assert uploads and len(uploads) == len(steps) and all(op["reset"] == "True" for op in uploads)
    assert steps[-1] == trainer.state.best_global_step
    assert set(steps) <= {4, 8, 12}
    # save_total_limit rotates checkpoints away: Neptune gets copies, kept for `neptune sync` of an offline run
    assert len(list_checkpoints(str(neptune_env / "out"))) < 3
    for op, step in zip(uploads, steps):
        (folder,) = op["file_globs"]
        assert folder == str(neptune_env / "out" / ".neptune-uploads" / f"checkpoint-{step}")
        assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert TOKEN.encode() not in run["raw"]


@pytest.mark.timeout(60)
def test_a_given_run_is_used_and_left_open_and_every_checkpoint_uploaded(neptune_env):
    import neptune

    run = neptune.init_run(mode="offline", capture_stdout=False, capture_stderr=False,
                           capture_hardware_metrics=False, capture_traceback=False)
    callback = NeptuneCallback(run=run, base_namespace="given", log_parameters=False, log_checkpoints="same")
    trainer = make_trainer(neptune_env / "out", callbacks=[callback], report_to="none", max_steps=4,
                           eval_strategy="no", save_steps=2)
    trainer.train()
    run["after/training"] = 1  # still open: the caller owns it
    run.stop()

    (recorded,) = read_runs(neptune_env)
    assert [s for s, _ in logged(recorded, "given/train/loss")] == [2, 4]
    assert assigned(recorded, "after/training") == [1]
    assert not any(op["path"][:2] == ["given", "trainer_parameters"] for op in recorded["operations"])
    # "same": every checkpoint in its own file set, read from the checkpoint folder itself (no rotation)
    for step in (2, 4):
        folder = str(neptune_env / "out" / f"checkpoint-{step}")
        assert assigned(recorded, f"given/checkpoints/checkpoint-{step}") == [[folder]]


def test_invalid_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="log_checkpoints"):
        NeptuneCallback(log_checkpoints="sometimes")
    with pytest.raises(ValueError, match="base_namespace"):
        NeptuneCallback(base_namespace="")


def test_best_checkpoints_need_a_metric_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match="metric_for_best_model"):
        make_trainer(tmp_path / "out", callbacks=[NeptuneCallback(log_checkpoints="best")], report_to="none")

