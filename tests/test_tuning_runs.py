"""Hyperparameter search in the trackers and Flyte's cache: parent/child MLflow runs and W&B groups from the Trainer
API, and the tuning workflow through real ``pyflyte run`` with its search section read from a params.yaml."""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
import yaml

from tests.helpers import accuracy, digits, make_model
from tests.trackers.test_wandb import wandb_env, wandb_records  # noqa: F401 (wandb_env is a fixture)

optuna = pytest.importorskip("optuna")


def wandb_groups(wandb_dir) -> dict[str, str]:
    """Each offline W&B run's display name -> its group, read from the run records of the .wandb files."""
    groups = {}
    for path in glob.glob(os.path.join(str(wandb_dir), "**", "offline-run-*", "run-*.wandb"), recursive=True):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                groups[record.run.display_name] = record.run.run_group
    return groups


def test_api_search_opens_one_parent_mlflow_run_with_a_child_per_trial_and_one_wandb_group(
        tmp_path, mlflow_server, wandb_env, monkeypatch):  # noqa: F811
    from mlflow import MlflowClient

    from trainer_lib import Trainer, TrainingArguments

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"api-search-{tmp_path.name}")
    train, val = digits(128, 64)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=32,
                             eval_strategy="steps", eval_steps=4, save_strategy="no", logging_steps=4,
                             report_to=["mlflow", "wandb"], disable_tqdm=True, strict_integrations=True)
    trainer = Trainer(args=args, model_init=lambda: make_model(0), train_dataset=train, eval_dataset=val,
                      compute_metrics=accuracy)
    best = trainer.hyperparameter_search(
        hp_space=lambda t: {"learning_rate": t.suggest_float("learning_rate", 1e-3, 1e-1, log=True)},
        compute_objective=lambda m: m["eval_accuracy"], n_trials=2, direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=1), study_name="lr-study")

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(f"api-search-{tmp_path.name}")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("flytrain.role") == "study"]
    assert parent.info.run_name == "lr-study" and parent.data.tags["flytrain.study"] == "lr-study"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_objective"] == pytest.approx(best.objective)
    assert json.loads(parent.data.params["best.learning_rate"]) == pytest.approx(best.hyperparameters["learning_rate"])
    assert parent.data.tags["flytrain.best_trial"] == best.run_id
    children = {int(r.data.tags["flytrain.trial"]): r for r in runs if r is not parent}
    assert sorted(children) == [0, 1] and len(runs) == 3
    for number, child in children.items():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_name == f"run-{number}" and child.info.status == "FINISHED"
        assert float(child.data.params["learning_rate"]) == pytest.approx(
            json.loads(child.data.tags["trial.learning_rate"]))
    assert children[int(best.run_id)].data.metrics["eval_accuracy"] == pytest.approx(best.objective)

    # W&B: both trials' runs in the study's group
    assert wandb_groups(wandb_env) == {"run-0": "lr-study", "run-1": "lr-study"}
    assert "WANDB_RUN_GROUP" not in os.environ and "MLFLOW_TAGS" not in os.environ  # restored after the search


# -- the tuning workflow through pyflyte: the search from a params.yaml, the cache keyed on the run fingerprint -------
SEARCH = {"sampler": "grid", "n_trials": 2, "parallelism": 2, "seed": 0,
          "params": {"model.hidden_sizes": {"type": "categorical", "choices": [[8], [16]]}}}
TRAINING = {"max_steps": 6, "logging_steps": 3, "eval_strategy": "steps", "eval_steps": 3, "save_strategy": "steps",
            "save_steps": 3, "report_to": ["wandb"]}


def _trained(stderr: str) -> list[int]:
    return sorted(int(n) for n in re.findall(r"workflows\.tuning: trial-(\d+): training", stderr))


def test_tuning_workflow_reads_the_search_from_params_yaml_and_caches_trials_on_the_run_fingerprint(tmp_path):
    """A 2-trial search given as ``--config params.yaml --search params.yaml``; run again with only settings outside
    the run fingerprint changed (trackers, strict_integrations) it trains nothing; with another weight decay, both."""
    from tests.flyte_helpers import BIN, flyte_env, run
    from workflows import search as study_file
    from workflows.config import PipelineConfig, SearchConfig
    from workflows.tuning import study_key

    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    env = flyte_env(tmp_path, FLYTE_LOCAL_CACHE_ENABLED="true", WANDB_MODE="offline", WANDB_SILENT="true",
                    WANDB_DIR=str(wandb_dir), WANDB_CACHE_DIR=str(wandb_dir), WANDB_CONFIG_DIR=str(wandb_dir))

    def tune(name: str, **training):
        params = tmp_path / f"{name}.yaml"
        params.write_text(yaml.safe_dump({"training": {**TRAINING, **training}, "search": SEARCH}))
        done = run([os.path.join(BIN, "pyflyte"), "run", "workflows/tuning.py", "tuning_workflow",
                    "--config", str(params), "--search", str(params)], env, str(tmp_path / name))
        assert done.returncode == 0, done.stderr[-3000:]
        return done, PipelineConfig.load(str(params))

    first, config = tune("first")
    assert _trained(first.stderr) == [0, 1]
    study = study_file.trials(SearchConfig.from_dict(SEARCH), re.search(r"study=(\S+?\.log)", first.stdout).group(1))
    assert sorted(json.dumps(t["params"]["model.hidden_sizes"]) for t in study) == ["[16]", "[8]"]  # not the default
    group = f"study-{study_key(config, SearchConfig.from_dict(SEARCH))[:8]}"
    assert wandb_groups(wandb_dir) == {"trial-0": group, "trial-1": group}
    objective = re.search(r"best_objective=([0-9.]+)", first.stdout).group(1)

    observed, _ = tune("observed", report_to=[], strict_integrations=True)
    assert _trained(observed.stderr) == [], observed.stderr[-3000:]
    assert re.search(r"best_objective=([0-9.]+)", observed.stdout).group(1) == objective

    changed, _ = tune("changed", report_to=[], weight_decay=0.3)
    assert _trained(changed.stderr) == [0, 1], changed.stderr[-3000:]

