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
    # one value under "param", a list value under "params"
    entries = [p.get("param") or p["params"] for p in messages.get("parameter_msg", [])]
    params = {p["paramName"]: p["paramValue"] for p in entries if p["source"] == "manual"}
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



def only_archive(directory, known=()) -> tuple[str, dict]:
    (path,) = set(glob.glob(str(directory / "*.zip"))) - set(known)
    return path, read_archive(path)


@pytest.mark.timeout(180)
def test_start_modes_create_get_and_the_experiment_key_variable(comet_env, tmp_path, monkeypatch, caplog):
    # COMET_MODE=create|get leaves online/offline to Comet's own COMET_START_ONLINE
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    monkeypatch.setenv("COMET_MODE", "create")
    first = make_trainer(tmp_path / "a", max_steps=4, save_steps=2, eval_strategy="no")
    first.train()
    path_a, run_a = only_archive(comet_env)
    assert run_a["experiment"]["resume_strategy"] == "create"
    assert run_a["experiment"]["user_provided_experiment_key"] is False
    assert run_a["params"]["max_steps"] == 4 and [s for s, _ in series(run_a, "train/loss")] == [2, 4]

    # create: every training is a new experiment
    make_trainer(tmp_path / "b", max_steps=2, eval_strategy="no").train()
    path_b, run_b = only_archive(comet_env, {path_a})
    assert run_b["experiment"]["offline_id"] != run_a["experiment"]["offline_id"]

    # a resumed training continues its own experiment whatever COMET_MODE says (create would start another)
    make_trainer(tmp_path / "a", max_steps=4, save_steps=2, eval_strategy="no").train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    path_c, run_c = only_archive(comet_env, {path_a, path_b})
    assert run_c["experiment"]["offline_id"] == run_a["experiment"]["offline_id"]
    assert run_c["experiment"]["resume_strategy"] == "get_or_create"
    assert [s for s, _ in series(run_c, "train/loss")] == [4] and run_c["params"] == {}

    # get: the experiment named by Comet's COMET_EXPERIMENT_KEY receives the new training's values
    key = run_b["experiment"]["offline_id"]
    monkeypatch.setenv("COMET_MODE", "get")
    monkeypatch.setenv("COMET_EXPERIMENT_KEY", key)
    make_trainer(tmp_path / "d", max_steps=2, eval_strategy="no").train()
    _, run_d = only_archive(comet_env, {path_a, path_b, path_c})
    assert run_d["experiment"]["offline_id"] == key and run_d["experiment"]["resume_strategy"] == "get"
    assert run_d["experiment"]["user_provided_experiment_key"] is True
    assert [s for s, _ in series(run_d, "train/loss")] == [2]

    # get without a key cannot start: reported once, no archive, the training goes on
    monkeypatch.delenv("COMET_EXPERIMENT_KEY")
    before = set(glob.glob(str(comet_env / "*.zip")))
    trainer = make_trainer(tmp_path / "e", max_steps=2, eval_strategy="no", strict_integrations=False)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert set(glob.glob(str(comet_env / "*.zip"))) == before
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "comet" in r.getMessage().lower()]
    assert len(warnings) == 1, warnings


@pytest.mark.timeout(60)
def test_archives_of_one_key_never_share_a_name_whatever_the_seed(comet_env, tmp_path):
    """Two sessions of one experiment (training, then evaluate) in a process whose `random` was seeded alike: each
    gets its own archive (Comet draws the name suffix from the global `random`)."""
    import random
    import uuid

    import comet_ml  # noqa: F401 (imported before the seeding below, as a training has it by then)

    from callbacks.comet import CometCallback
    from trainer_lib import TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), run_name="digits-mlp", report_to="none")
    key = uuid.uuid4().hex
    for value in (1.0, 2.0):
        random.seed(42)
        callback = CometCallback()
        assert callback.continue_from({"experiment": key})
        callback.report_results(args, TrainerState(global_step=3), {"test_accuracy": value}, {}, {}, [])
    archives = [read_archive(p) for p in glob.glob(str(comet_env / "*.zip"))]
    assert sorted(series(a, "test/accuracy")[0][1] for a in archives) == [1.0, 2.0]
