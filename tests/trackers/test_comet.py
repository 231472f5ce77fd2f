"""Comet in offline mode: the archives it writes (experiment.json + messages.json, one JSON message a line) are read."""

from __future__ import annotations

import glob
import json
import os
import zipfile
from functools import partial

import pytest

from tests.helpers import make_trainer as shared_trainer

API_KEY = "comet-dummy-key-0123456789"
SECRET = "comet-s3cr3t-value-42"


def read_archive(path: str) -> dict:
    """An offline archive: its experiment.json, its messages grouped by type, and its raw bytes."""
    with zipfile.ZipFile(path) as archive:
        raw = b"".join(archive.read(name) for name in archive.namelist())
        records = archive.read("experiment.json") + archive.read("messages.json")
        experiment = json.loads(archive.read("experiment.json"))
        messages: dict[str, list] = {}
        for line in archive.read("messages.json").decode().splitlines():
            message = json.loads(line)
            messages.setdefault(message["type"], []).append(message["payload"])
    metrics = [m["metric"] for m in messages.get("metric_msg", [])]
    params = {p["param"]["paramName"]: p["param"]["paramValue"] for p in messages.get("parameter_msg", [])
              if p["param"]["source"] == "manual"}
    uploads = [u["additional_params"].get("fileName") for u in messages.get("file_upload", [])]
    return {"experiment": experiment, "metrics": metrics, "params": params, "uploads": uploads, "raw": raw,
            "records": records}


def series(archive: dict, name: str) -> list[tuple[int, float]]:
    return [(m["step"], m["metricValue"]) for m in archive["metrics"] if m["metricName"] == name]


@pytest.fixture
def comet_env(tmp_path, monkeypatch):
    offline = tmp_path / "comet-offline"
    monkeypatch.setenv("COMET_MODE", "offline")
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(offline))
    monkeypatch.setenv("COMET_API_KEY", API_KEY)
    monkeypatch.setenv("COMET_PROJECT_NAME", "flytrain-tests")
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)
    # Comet's extras that read the machine, the git repo or the network: off, so a run takes a second
    for name in ("AUTO_LOG_CO2", "AUTO_LOG_ENV_DETAILS", "AUTO_LOG_GIT_METADATA", "AUTO_LOG_GIT_PATCH",
                 "AUTO_LOG_CODE", "AUTO_LOG_CLI_ARGUMENTS", "ERROR_TRACKING_ENABLE", "AUTO_LOG_GRAPH"):
        monkeypatch.setenv(f"COMET_{name}", "false")
    monkeypatch.setenv("COMET_DISABLE_AUTO_LOGGING", "1")
    monkeypatch.setenv("COMET_DISPLAY_SUMMARY_LEVEL", "0")
    for name in ("COMET_LOG_ASSETS", "COMET_EXPERIMENT_KEY", "COMET_START_MODE", "COMET_START_ONLINE"):
        monkeypatch.delenv(name, raising=False)
    return offline


make_trainer = partial(shared_trainer, report_to=["comet_ml"], max_steps=8, logging_steps=2, save_steps=4,
                       eval_steps=4, run_name="digits-mlp", extra={"service_token": SECRET})


@pytest.mark.timeout(120)
def test_offline_archive_holds_params_metrics_assets_later_evaluation_and_resume(comet_env, tmp_path, monkeypatch):
    monkeypatch.setenv("COMET_LOG_ASSETS", "true")
    trainer = make_trainer(tmp_path / "out")
    trainer.train()

    (path,) = glob.glob(str(comet_env / "*.zip"))
    run = read_archive(path)
    assert run["experiment"]["project_name"] == "flytrain-tests"
    key = run["experiment"]["offline_id"]
    callback = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "CometCallback")
    assert callback.experiment_key == key

    history = trainer.state.log_history
    expected_losses = [(e["step"], pytest.approx(e["loss"])) for e in history if "loss" in e]
    assert len(expected_losses) == 4
    assert series(run, "train/loss") == expected_losses
    assert series(run, "eval/accuracy") == [(e["step"], pytest.approx(e["eval_accuracy"]))
                                            for e in history if "eval_accuracy" in e]
    assert [s for s, _ in series(run, "train/train_runtime")] == [8]
    assert {m["epoch"] for m in run["metrics"] if m["metricName"] == "train/loss"} == {
        e["epoch"] for e in history if "loss" in e}

    assert run["params"]["learning_rate"] == trainer.args.learning_rate
    assert run["params"]["max_steps"] == 8
    assert run["params"]["model.hidden"] == 32
    assert run["params"]["model.class"] == "TinyMLP"
    assert API_KEY.encode() not in run["raw"]
    # checked in Comet's own records only: the uploaded checkpoints' training_args.json is written by trainer_lib
    assert SECRET.encode() not in run["records"]

    # COMET_LOG_ASSETS: the output folder's files, named under the folder's name
    assert {"out/checkpoint-4/model.safetensors", "out/checkpoint-8/trainer_state.json"} <= set(run["uploads"])

    # state saved with the checkpoint: a resumed training continues this experiment
    saved = json.load(open(tmp_path / "out" / "checkpoint-8" / "trainer_state.json"))
    assert saved["stateful_callbacks"]["CometCallback"]["attributes"]["experiment_key"] == key

    # after train end the experiment is ended; an evaluation is appended to the same experiment key
    metrics = trainer.evaluate()
    (later,) = set(glob.glob(str(comet_env / "*.zip"))) - {path}
    appended = read_archive(later)
    assert appended["experiment"]["offline_id"] == key
    assert series(appended, "eval/loss") == [(8, pytest.approx(metrics["eval_loss"]))]
    assert appended["params"] == {}

    # resuming from a checkpoint continues the saved experiment: same key, only the new steps, no second params
    monkeypatch.setenv("COMET_LOG_ASSETS", "false")
    resumed = make_trainer(tmp_path / "out")
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    (third,) = set(glob.glob(str(comet_env / "*.zip"))) - {path, later}
    continued = read_archive(third)
    assert continued["experiment"]["offline_id"] == key
    assert [s for s, _ in series(continued, "train/loss")] == [6, 8]
    assert continued["params"] == {} and continued["uploads"] == []


@pytest.mark.timeout(60)
def test_disabled_mode_writes_nothing(comet_env, tmp_path, monkeypatch):
    monkeypatch.setenv("COMET_MODE", "DISABLED")
    trainer = make_trainer(tmp_path / "out", max_steps=2, eval_strategy="no")
    trainer.train()
    assert trainer.state.global_step == 2
    assert not comet_env.exists() or os.listdir(comet_env) == []


def test_invalid_mode_is_a_clear_error(comet_env, tmp_path, monkeypatch):
    monkeypatch.setenv("COMET_MODE", "sometimes")
    with pytest.raises(ValueError, match="COMET_MODE"):
        make_trainer(tmp_path / "out")

