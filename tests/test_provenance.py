"""Provenance facts (git, Flyte, DVC, secrets) and the check that a named tracker can start, before any training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from workflows import pipeline, provenance
from workflows.config import ConfigError, PipelineConfig

GIT_ENV = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")


def git(repo, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_git_commit_and_dirty_are_none_outside_a_git_repository(tmp_path):
    assert provenance.git_info(str(tmp_path)) == {"commit": None, "dirty": None}


def test_git_commit_is_head_and_only_changed_tracked_files_make_the_tree_dirty(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("print(1)\n")
    git(tmp_path, "add", "train.py")
    git(tmp_path, "commit", "-qm", "code")
    head = git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "outputs.txt").write_text("an untracked output\n")
    assert provenance.git_info(str(tmp_path)) == {"commit": head, "dirty": False}
    (tmp_path / "train.py").write_text("print(2)\n")
    assert provenance.git_info(str(tmp_path)) == {"commit": head, "dirty": True}


def test_flyte_ids_come_from_the_running_tasks_context(monkeypatch):
    """A task on a Flyte backend: the execution id, project, domain, task name and attempt of its real context."""
    from flytekit.core.context_manager import ExecutionParameters, ExecutionState, FlyteContextManager
    from flytekit.models.core.identifier import Identifier, ResourceType, WorkflowExecutionIdentifier

    monkeypatch.setenv("FLYTE_ATTEMPT_NUMBER", "2")
    assert provenance.flyte_context() is None  # flytekit imported, but no task running
    ctx = FlyteContextManager.current_context()
    params = (ExecutionParameters.new_builder(ctx.user_space_params) if ctx.user_space_params else
              ExecutionParameters.new_builder())
    params.execution_id = WorkflowExecutionIdentifier("flytrain", "development", "f8c1e2a9b")
    params.task_id = Identifier(ResourceType.TASK, "flytrain", "development", "workflows.training.train_model", "v3")
    state = (ctx.execution_state or ExecutionState(working_dir="/tmp")).with_params(
        mode=ExecutionState.Mode.TASK_EXECUTION, user_space_params=params.build())
    with FlyteContextManager.with_context(ctx.with_execution_state(state)):
        facts = provenance.flyte_context()
    assert facts == {"mode": "cluster", "execution_id": "f8c1e2a9b", "project": "flytrain", "domain": "development",
                     "task": "workflows.training.train_model", "attempt": 2}
    assert provenance.default_run_name("0" * 64, facts, None) == "f8c1e2a9b"


def test_run_name_is_the_dvc_experiment_else_the_config_hash_and_the_config_wins(monkeypatch):
    config = PipelineConfig()
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert provenance.collect(config, "ab12cd34ef", {}, [])["run_name"] == "mlp-ab12cd34"
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-fern")
    facts = provenance.collect(config, "ab12cd34ef", {}, [])
    assert facts["run_name"] == "sunny-fern" and facts["dvc"] == {"experiment": "sunny-fern"}
    config.training.run_name = "baseline-lr3"
    assert provenance.collect(config, "ab12cd34ef", {}, [])["run_name"] == "baseline-lr3"


def test_no_secret_reaches_provenance_json_or_the_tags(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-9f8e7d6c")
    facts = provenance.collect(PipelineConfig(), "ab" * 32, {"train": "sha256:00"}, [])
    facts["trackers"] = {"mlflow": {"run_id": "r1", "tracking_uri": "https://bob:pw-9f8e7d6c@mlflow.example/",
                                    "experiment_id": "1"},
                         "dagshub": {"run_id": "r2", "tracking_uri": "https://carol:other-pass@dagshub.example/x.mlflow"}}
    text = (open(provenance.write(facts, str(tmp_path))).read())
    tags = json.dumps(provenance.as_tags(facts))
    for secret in ("pw-9f8e7d6c", "other-pass"):
        assert secret not in text and secret not in tags
    assert json.loads(text)["trackers"]["dagshub"]["tracking_uri"] == "https://dagshub.example/x.mlflow"


def test_a_named_tracker_that_cannot_start_fails_the_stage_before_training_with_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"training": {"max_steps": 5, "report_to": ["dagshub"]}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSHUB_", "MLFLOW_TRACKING_"))}
    env["MLFLOW_TRACKING_URI"] = "https://dagshub.com/alice/digits.mlflow"
    base = [sys.executable, "-m", "workflows", "--params", str(params)]
    subprocess.run(base + ["prepare", "--data-dir", "data"], cwd=tmp_path, env=env, check=True, capture_output=True)
    proc = subprocess.run(base + ["train", "--data-dir", "data", "--checkpoint-dir", "ckpt", "--model-dir", "model"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training.report_to: 'dagshub' cannot start"), proc.stderr
    assert "DAGSHUB_USER_TOKEN" in lines[0]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "model").exists()  # nothing was trained


def test_strict_integrations_reaches_the_trainer_and_a_missing_token_is_a_config_error(tmp_path, monkeypatch):
    config = PipelineConfig.from_dict({"training": {"strict_integrations": True, "run_name": "r"}})
    args = pipeline.training_arguments(config, str(tmp_path))
    assert args.strict_integrations is True and args.run_name == "r"
    monkeypatch.setenv("DAGSHUB_REPO_OWNER", "alice")
    monkeypatch.setenv("DAGSHUB_REPO_NAME", "digits")
    with pytest.raises(ConfigError, match="'dagshub' cannot start.*DAGSHUB_USER_TOKEN"):
        pipeline.check_trackers(["dagshub"])
    with pytest.raises(ConfigError, match="training.report_to: unknown integration 'mlfow'"):
        pipeline.train(PipelineConfig.from_dict({"training": {"report_to": ["mlfow"]}}), str(tmp_path / "no-data"),
                       str(tmp_path / "ckpt"), str(tmp_path / "model"))
    assert not (tmp_path / "ckpt").exists()
    monkeypatch.setenv("DAGSHUB_USER_TOKEN", "tok-123456")
    assert [cls.integration_name for cls in pipeline.check_trackers(["dagshub"])] == ["dagshub"]


def test_tensorboard_run_gets_the_provenance_text_and_the_test_metrics_at_the_last_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_registry import independent_hash

    config = PipelineConfig.from_dict({"model": {"hidden_sizes": [16]}, "training": {
        "max_steps": 20, "eval_strategy": "no", "save_strategy": "no", "report_to": ["tensorboard"]}})
    metrics = pipeline.run(config, str(tmp_path))
    facts = json.loads((tmp_path / "model" / "provenance.json").read_text())
    acc = EventAccumulator(facts["trackers"]["tensorboard"]["log_dir"], size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("test/accuracy")] == [(20, metrics["test_accuracy"])]
    # at train begin (what is known then), and with the whole record (the run's end, its log dir) at evaluate
    begin, end = acc.Tensors("provenance/text_summary")
    assert (begin.step, end.step) == (0, 20)
    text = json.loads(end.tensor_proto.string_val[0].decode())
    assert text["flytrain.data.split_hashes.test"] == independent_hash(tmp_path / "data", "test")
    assert text["flytrain.trackers.tensorboard.log_dir"] == facts["trackers"]["tensorboard"]["log_dir"]
    assert text["flytrain.ended_at"] == facts["ended_at"] and text["data.source"] == "digits"
