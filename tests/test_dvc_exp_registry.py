"""`dvc exp run` against a real MLflow server: the run is named after the DVC experiment, provenance.json records
the experiment and the commit it ran on, and the evaluate stage registers a version of the model."""

from __future__ import annotations

import json
import uuid

from tests import test_registry
from tests.test_dvc import copy_project, run, write_params
from tests.test_registry import runs_of

tracking = test_registry.tracking  # the shared server, a fresh experiment, a client

#: eval_strategy "no" would not survive `-S`: DVC writes params.yaml back with a bare no, which YAML 1.1 reads as false
TINY = {
    "model": {"hidden_sizes": [16]},
    "training": {"max_steps": 20, "logging_steps": 10, "eval_strategy": "steps", "eval_steps": 20,
                 "save_strategy": "steps", "save_steps": 10, "report_to": ["mlflow"]},
}


def test_exp_run_names_the_mlflow_run_after_the_experiment_and_registers_a_version(tmp_path, tracking):
    name = f"digits-{uuid.uuid4().hex[:6]}"
    repo = tmp_path / "project"
    repo.mkdir()
    copy_project(repo)
    write_params(repo, {**TINY, "model": {**TINY["model"], "registered_name": name}})
    run(repo, "git", "init", "-q")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "config", "core.analytics", "false")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "project")
    baseline = run(repo, "git", "rev-parse", "HEAD").stdout.strip()

    run(repo, "dvc", "exp", "run", "-n", "lr-two", "-S", "training.learning_rate=0.002")

    (mlflow_run,) = runs_of(tracking)
    facts = json.loads((repo / "models" / "model" / "provenance.json").read_text())
    assert facts["dvc"] == {"experiment": "lr-two"} and facts["run_name"] == "lr-two"
    assert mlflow_run.info.run_name == "lr-two" and mlflow_run.data.tags["flytrain.dvc.experiment"] == "lr-two"
    assert mlflow_run.data.params["learning_rate"] == "0.002"
    assert facts["git"]["commit"] == baseline == mlflow_run.data.tags["mlflow.source.git.commit"]
    assert facts["trackers"]["mlflow"]["run_id"] == mlflow_run.info.run_id
    test_metrics = json.loads((repo / "metrics" / "metrics.json").read_text())
    assert mlflow_run.data.metrics["test_accuracy"] == test_metrics["test_accuracy"]
    version = tracking["client"].get_model_version_by_alias(name, "candidate")
    assert version.version == "1" and version.run_id == mlflow_run.info.run_id
    assert version.tags["flytrain.dvc.experiment"] == "lr-two"
    # the train stage's DVCLive output stays what training wrote (test metrics are metrics/metrics.json):
    # the experiment is complete, nothing left to reproduce
    assert "test" not in json.loads((repo / "dvclive" / "metrics.json").read_text())
    assert json.loads(run(repo, "dvc", "status", "--json").stdout) == {}
