"""The pipeline against a real ``mlflow server`` through each entry point: one run per training with params, train
and test metrics, provenance tags and the MLflow Model, and a registry version whose alias loads in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from urllib.parse import unquote

import numpy as np
import pytest
import yaml

from tests.flyte_helpers import BIN, flyte_env
from tests.flyte_helpers import run as run_flyte
from workflows import pipeline
from workflows.config import PipelineConfig

SMALL = {
    "model": {"hidden_sizes": [32]},
    "training": {"max_steps": 40, "logging_steps": 10, "eval_strategy": "no", "save_strategy": "steps",
                 "save_steps": 20, "report_to": ["mlflow"]},
}


def small(**model) -> dict:
    values = json.loads(json.dumps(SMALL))
    values["model"].update(model)
    return values


def independent_hash(data_dir, split: str) -> str:
    """The split's content hash computed here, not by the product: sha256 over float32 features then int64 labels."""
    import hashlib

    with np.load(os.path.join(data_dir, f"{split}.npz")) as data:
        raw = data["x"].astype(np.float32).tobytes() + data["y"].astype(np.int64).tobytes()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    """The shared server, a fresh experiment for this test, and a client on it."""
    import mlflow

    experiment = f"registry-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    client = mlflow.MlflowClient(mlflow_server)
    return {"uri": mlflow_server, "experiment": experiment, "client": client}


def runs_of(tracking) -> list:
    experiment = tracking["client"].get_experiment_by_name(tracking["experiment"])
    return tracking["client"].search_runs([experiment.experiment_id]) if experiment else []


def load_and_predict(uri: str, model_uri: str, data_dir) -> list[str]:
    """``mlflow.pyfunc.load_model`` in a fresh process (cwd elsewhere): the test split's predicted classes."""
    code = (
        "import json, sys, numpy as np, mlflow.pyfunc\n"
        f"model = mlflow.pyfunc.load_model({model_uri!r})\n"
        f"x = np.load({os.path.join(str(data_dir), 'test.npz')!r})['x']\n"
        "print(json.dumps([str(c) for c in model.predict(x)]))\n"
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def evaluate_classes(metrics_dir) -> list[str]:
    lines = (metrics_dir / "confusion.csv").read_text().splitlines()[1:]
    return [line.split(",")[1] for line in lines]


def check_run(tracking, run, workdir, model_dir, metrics_dir) -> None:
    """One training's run: params, train metrics, test metrics, provenance tags and the logged MLflow Model."""
    client = tracking["client"]
    facts = json.loads((model_dir / "provenance.json").read_text())
    assert facts["trackers"]["mlflow"]["run_id"] == run.info.run_id
    assert run.info.run_name == facts["run_name"] and os.sep not in run.info.run_name
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["data.source"] == "digits"
    assert run.data.params["model.hidden_sizes"] == "[32]"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 10, 20, 30, 40]
    test_metrics = json.loads((metrics_dir / "metrics.json").read_text())
    assert {k: round(v, 6) for k, v in run.data.metrics.items() if k.startswith("test_")} == test_metrics
    for split in ("train", "val", "test"):
        assert run.data.tags[f"flytrain.data.split_hashes.{split}"] == independent_hash(workdir / "data", split)
        assert facts["data"]["split_hashes"][split] == independent_hash(workdir / "data", split)
    assert run.data.tags["flytrain.config_hash"] == facts["config_hash"]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")]
    assert artifacts == ["evaluation/confusion.csv", "evaluation/confusion.svg"]
    models = tracking_models(tracking, run)
    assert len(models) == 1 and models[0].name == "model"  # logged once, at the end


def tracking_models(tracking, run) -> list:
    return tracking["client"].search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )


def test_python_pipeline_registers_a_loadable_version_and_a_second_run_registers_version_2(tmp_path, tracking):
    name = f"digits-{uuid.uuid4().hex[:6]}"
    config = PipelineConfig.from_dict(small(registered_name=name))
    first, second = tmp_path / "first", tmp_path / "second"
    pipeline.run(config, str(first))
    (run,) = runs_of(tracking)
    check_run(tracking, run, first, first / "model", first / "metrics")
    assert run.data.tags["mlflow.source.git.commit"] == json.loads(
        (first / "model" / "provenance.json").read_text())["git"]["commit"]

    client = tracking["client"]
    version = client.get_model_version_by_alias(name, "candidate")
    assert version.version == "1" and version.run_id == run.info.run_id
    assert version.tags["flytrain.data.split_hashes.test"] == independent_hash(first / "data", "test")
    predicted = load_and_predict(tracking["uri"], f"models:/{name}@candidate", first / "data")
    assert predicted == evaluate_classes(first / "metrics")

    pipeline.run(config, str(second))
    assert len(runs_of(tracking)) == 2  # one run per training
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["2", "1"]
    assert client.get_model_version_by_alias(name, "candidate").version == "2"


def test_a_failed_training_registers_nothing_and_leaves_no_model(tmp_path, tracking):
    from trainer_lib import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 25:
                raise RuntimeError("disk on fire")

    name = f"digits-{uuid.uuid4().hex[:6]}"
    config = PipelineConfig.from_dict(small(registered_name=name))
    pipeline.prepare(config, str(tmp_path / "data"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        pipeline.train(config, str(tmp_path / "data"), str(tmp_path / "ckpt"), str(tmp_path / "model"),
                       callbacks=[Crash()])
    (run,) = runs_of(tracking)
    assert run.info.status == "FAILED"
    assert run.data.tags["flytrain.data.split_hashes.train"] == independent_hash(tmp_path / "data", "train")
    assert not (tmp_path / "model").exists()
    assert tracking["client"].search_registered_models(f"name = '{name}'") == []
    assert tracking_models(tracking, run) == []
    # the checkpoint carries the provenance too
    state = json.loads((tmp_path / "ckpt" / "checkpoint-20" / "trainer_state.json").read_text())
    recorded = state["stateful_callbacks"]["ProvenanceCallback"]["attributes"]["checkpoint_provenance"]
    assert recorded["trackers"]["mlflow"]["run_id"] == run.info.run_id
    assert recorded["data"]["split_hashes"]["val"] == independent_hash(tmp_path / "data", "val")


def test_cli_stages_as_dvc_runs_them_name_the_run_after_the_dvc_experiment(tmp_path, tracking):
    name = f"digits-{uuid.uuid4().hex[:6]}"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(small(registered_name=name)))
    env = dict(os.environ, DVC_EXP_NAME="zesty-lark", OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "workflows", "--params", str(params)]
    for stage in (["prepare", "--data-dir", "data"],
                  ["train", "--data-dir", "data", "--checkpoint-dir", "checkpoints", "--model-dir", "model"],
                  ["evaluate", "--data-dir", "data", "--model-dir", "model", "--out-dir", "metrics"]):
        proc = subprocess.run(base + stage, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs_of(tracking)
    assert run.info.run_name == "zesty-lark" and run.data.tags["flytrain.dvc.experiment"] == "zesty-lark"
    check_run(tracking, run, tmp_path, tmp_path / "model", tmp_path / "metrics")
    assert tracking["client"].get_model_version_by_alias(name, "candidate").run_id == run.info.run_id


def test_pyflyte_run_reports_to_one_run_with_the_flyte_execution_and_registers(tmp_path, tracking):
    name = f"digits-{uuid.uuid4().hex[:6]}"
    config_file = tmp_path / "small.yaml"
    config_file.write_text(yaml.safe_dump(small(registered_name=name, registered_alias="staging")))
    cmd = [os.path.join(BIN, "pyflyte"), "run", "workflows/training.py", "training_workflow",
           "--config", str(config_file)]
    done = run_flyte(cmd, flyte_env(tmp_path), str(tmp_path / "log"))
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs_of(tracking)
    tags = run.data.tags
    # a local pyflyte run has no backend execution (flytekit calls it "local"): recorded as such, named by config
    assert tags["flytrain.flyte.mode"] == "local" and "flytrain.flyte.execution_id" not in tags
    assert run.info.run_name == "mlp-" + tags["flytrain.config_hash"][:8]
    assert {"test_accuracy", "test_loss"} <= set(run.data.metrics)
    assert len(tracking_models(tracking, run)) == 1
    version = tracking["client"].get_model_version_by_alias(name, "staging")
    assert version.run_id == run.info.run_id and version.tags["flytrain.flyte.mode"] == "local"


def test_dagshub_pipeline_logs_registers_under_its_model_name_and_uploads_the_final_model(tmp_path, tracking,
                                                                                          monkeypatch):
    """report_to: [dagshub] through DagsHub's MLflow (here the real local server) and the real dagshub client
    uploading to the stub: same run contents as MLflow, registered as HF_DAGSHUB_MODEL_NAME, files committed."""
    from tests.trackers.test_dagshub import OWNER, REPO, TOKEN, DagsHubStub

    stub = DagsHubStub()
    name = f"dh-{uuid.uuid4().hex[:6]}"
    for key, value in dict(DAGSHUB_REPO_OWNER=OWNER, DAGSHUB_REPO_NAME=REPO, DAGSHUB_CLIENT_HOST=stub.url,
                           DAGSHUB_USER_TOKEN=TOKEN, DAGSHUB_HTTP_TIMEOUT="10", HF_DAGSHUB_LOG_ARTIFACTS="true",
                           HF_DAGSHUB_MODEL_NAME=name,
                           DAGSHUB_CLIENT_TOKENS_CACHE=str(tmp_path / "no-token-cache")).items():
        monkeypatch.setenv(key, value)
    values = small()
    values["training"]["report_to"] = ["dagshub"]
    try:
        pipeline.run(PipelineConfig.from_dict(values), str(tmp_path))
    finally:
        stub.close()
    (run,) = runs_of(tracking)
    facts = json.loads((tmp_path / "model" / "provenance.json").read_text())
    assert facts["trackers"]["dagshub"]["run_id"] == run.info.run_id
    assert {"test_accuracy", "test_loss"} <= set(run.data.metrics)
    assert run.data.tags["flytrain.data.split_hashes.test"] == independent_hash(tmp_path / "data", "test")
    assert len(tracking_models(tracking, run)) == 1
    assert tracking["client"].get_model_version_by_alias(name, "candidate").run_id == run.info.run_id
    (put,) = [r for r in stub.requests if r["method"] == "PUT"]
    assert unquote(put["path"]).endswith(f"/content/main/artifacts/{name}")
    assert {"model.safetensors", "config.json", "training_args.json"} <= set(put["files"])
    assert not any(f.startswith("checkpoint-") for f in put["files"])
    assert TOKEN not in (tmp_path / "model" / "provenance.json").read_text()
