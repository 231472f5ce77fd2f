"""The evaluate stage's results in every tracker run the training used, read back from what each tracker wrote in
its offline mode: test metrics at the training's last step, the provenance as config/params/others, the confusion
matrix as a file where the tracker keeps files (W&B, DVCLive, Comet); an offline Neptune run, which cannot be
reopened, is said so and left as it is."""

from __future__ import annotations

import glob
import json
import logging

import pytest

from tests.test_registry import independent_hash
from tests.trackers import test_clearml, test_comet, test_neptune, test_wandb
from tests.trackers.test_clearml import read_sessions
from tests.trackers.test_comet import read_archive, series
from tests.trackers.test_neptune import read_runs
from tests.trackers.test_wandb import read_run, wandb_records
from workflows import pipeline
from workflows.config import PipelineConfig

TRACKERS = ["wandb", "dvclive", "comet_ml", "neptune"]
# each tracker's offline settings, as its own tests use them
wandb_env, comet_env = test_wandb.wandb_env, test_comet.comet_env
neptune_env, clearml_env = test_neptune.neptune_env, test_clearml.clearml_env


def wandb_files(run_dir: str) -> list[str]:
    (path,) = glob.glob(f"{run_dir}/run-*.wandb")
    return [f.path for r in wandb_records(path) if r.WhichOneof("record_type") == "files" for f in r.files.files]


@pytest.mark.timeout(240)
def test_test_metrics_provenance_and_confusion_matrix_reach_every_trackers_training_run(
        wandb_env, comet_env, neptune_env, tmp_path, caplog):
    config = PipelineConfig.from_dict({"model": {"hidden_sizes": [16]}, "training": {
        "max_steps": 12, "logging_steps": 4, "eval_strategy": "no", "save_strategy": "no", "report_to": TRACKERS}})
    caplog.set_level(logging.INFO)
    work = tmp_path / "work"
    metrics = pipeline.run(config, str(work))
    facts = json.loads((work / "model" / "provenance.json").read_text())
    test_hash = independent_hash(work / "data", "test")
    assert set(facts["trackers"]) == set(TRACKERS)

    # W&B: the training's offline run resumed by id; test metrics at step 12, provenance in the config, the files
    trained_dir, evaluated_dir = sorted(glob.glob(str(wandb_env / "wandb" / "offline-run-*")))
    trained, evaluated = read_run(trained_dir), read_run(evaluated_dir)
    assert evaluated["id"] == trained["id"] == facts["trackers"]["wandb"]["run_id"]
    assert [(h["train/global_step"], h["test/accuracy"]) for h in evaluated["history"] if "test/accuracy" in h] == [
        (12, pytest.approx(metrics["test_accuracy"]))]
    assert trained["config"]["flytrain.data.split_hashes.test"] == test_hash  # from train begin on
    assert evaluated["config"]["flytrain.trackers.wandb.run_id"] == trained["id"]
    assert evaluated["config"]["data.source"] == "digits"
    assert {"confusion.csv", "confusion.svg"} <= set(wandb_files(evaluated_dir))
    assert "learning_rate" not in evaluated["config"]  # the training's parameters are not logged again

    # DVCLive: the training's folder continued (resume=True): the summary holds the test metrics, nothing lost
    live_dir = facts["trackers"]["dvclive"]["dir"]
    summary = json.load(open(f"{live_dir}/metrics.json"))
    assert summary["test"]["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert summary["train"]["loss"] == pytest.approx(facts_loss(work))
    assert not glob.glob(f"{live_dir}/plots/metrics/test/*")  # a summary value, not a one-point plot
    params = open(f"{live_dir}/params.yaml").read()
    assert test_hash in params and "learning_rate" in params

    # Comet: a second offline archive of the same experiment key
    archives = [read_archive(p) for p in glob.glob(str(comet_env / "*.zip"))]
    key = facts["trackers"]["comet_ml"]["experiment"]
    assert [a["experiment"]["offline_id"] for a in archives] == [key, key]
    (later,) = [a for a in archives if series(a, "test/accuracy")]
    assert series(later, "test/accuracy") == [(12, pytest.approx(metrics["test_accuracy"]))]
    assert {"confusion.csv", "confusion.svg"} <= set(later["uploads"])
    assert '"flytrain.data.split_hashes.test"' in later["records"].decode() and test_hash in later["records"].decode()

    # Neptune offline: no id to reopen the run by; said so, and no second run appears
    (run,) = read_runs(neptune_env)
    assert facts["trackers"]["neptune"] == {"run_id": None, "offline": True}
    assert test_hash in run["raw"].decode(errors="replace")  # the provenance, logged at train begin
    assert any("offline run cannot be reopened" in r.getMessage() for r in caplog.records)


def facts_loss(work) -> float:
    """The last training loss the model's log history holds (what DVCLive's summary kept from training)."""
    history = json.loads((work / "model" / "log_history.json").read_text())
    return [e["loss"] for e in history if "loss" in e][-1]


@pytest.mark.timeout(180)
def test_clearml_gets_the_provenance_at_train_begin_and_a_closed_task_is_not_reopened(clearml_env, tmp_path, caplog):
    config = PipelineConfig.from_dict({"model": {"hidden_sizes": [16]}, "training": {
        "max_steps": 8, "logging_steps": 4, "eval_strategy": "no", "save_strategy": "no", "report_to": ["clearml"]}})
    caplog.set_level(logging.INFO)
    work = tmp_path / "work"
    pipeline.run(config, str(work))
    facts = json.loads((work / "model" / "provenance.json").read_text())
    (session,) = read_sessions(clearml_env)  # no second task
    assert facts["trackers"]["clearml"]["task_id"] == session["task"]["id"]
    section = {name: entry["value"] for name, entry in session["task"]["hyperparams"]["provenance"].items()}
    assert section["flytrain.data.split_hashes.test"] == independent_hash(work / "data", "test")
    assert section["data.source"] == "digits"
    assert any("task was closed at train end" in r.getMessage() for r in caplog.records)
