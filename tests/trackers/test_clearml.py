"""ClearML in offline mode: the session folder it writes (task.json, metrics.jsonl, artifacts) is read back."""

from __future__ import annotations

import glob
import json
import os
import zipfile
from functools import partial

import pytest

from tests.helpers import make_trainer as shared_trainer

ACCESS_KEY = "clearml-dummy-access-key"
SECRET_KEY = "clearml-dummy-secret-0123456789"
SECRET = "cml-s3cr3t-value-42"
NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing listens, nothing leaves the machine

CONFIG = """
api {
  api_server: "%(host)s"
  web_server: "%(host)s"
  files_server: "%(host)s"
  credentials { access_key: "%(access)s", secret_key: "%(secret)s" }
}
sdk {
  development {
    # report from a thread, not a forked reporter process, and detect the repository in line: no waits at close
    report_use_subprocess: false
    vcs_repo_detect_async: false
  }
}
"""


@pytest.fixture
def clearml_env(tmp_path, monkeypatch):
    config = tmp_path / "clearml.conf"
    config.write_text(CONFIG % {"host": NOWHERE, "access": ACCESS_KEY, "secret": SECRET_KEY})
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(config))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ClearML keeps a task-reuse cache in ~/.clearml
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    for name in ("API_HOST", "WEB_HOST", "FILES_HOST"):
        monkeypatch.setenv(f"CLEARML_{name}", NOWHERE)
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("CLEARML_PROJECT", "flytrain-tests")
    monkeypatch.setenv("CLEARML_TASK", "digits")
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)
    monkeypatch.delenv("CLEARML_LOG_MODEL", raising=False)
    monkeypatch.delenv("CLEARML_TASK_ID", raising=False)
    return tmp_path / "clearml-cache" / "offline"


def read_sessions(offline) -> list[dict]:
    """Every offline session: task.json, the reported events and the raw bytes of all its files."""
    sessions = []
    for folder in glob.glob(str(offline / "*")):
        if not os.path.isdir(folder):
            continue
        task = json.load(open(os.path.join(folder, "task.json")))
        events = []
        for line in open(os.path.join(folder, "metrics.jsonl")):
            if line.strip():
                events += json.loads(line)
        raw = b"".join(open(p, "rb").read() for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                       if os.path.isfile(p))
        sessions.append({"folder": folder, "task": task, "events": events, "raw": raw})
    return sessions


def scalars(session: dict, title: str, series: str) -> list[tuple[int, float]]:
    return [(e["iter"], e["value"]) for e in session["events"]
            if e["type"] == "training_stats_scalar" and e["metric"] == title and e["variant"] == series]


make_trainer = partial(shared_trainer, report_to=["clearml"], max_steps=8, logging_steps=2, save_steps=4,
                       eval_steps=4, extra={"service_token": SECRET})


@pytest.mark.timeout(120)
def test_offline_session_holds_parameters_scalars_and_checkpoints(clearml_env, tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARML_LOG_MODEL", "true")
    trainer = make_trainer(tmp_path / "out")
    trainer.train()

    (session,) = read_sessions(clearml_env)
    task = session["task"]
    assert task["project_name"] == "flytrain-tests" and task["name"] == "digits"
    assert os.path.isfile(session["folder"] + ".zip")  # closed: the session was packed for import

    history = trainer.state.log_history
    expected = [(e["step"], pytest.approx(e["loss"])) for e in history if "loss" in e]
    assert len(expected) == 4
    assert scalars(session, "train", "loss") == expected
    assert scalars(session, "eval", "accuracy") == [(e["step"], pytest.approx(e["eval_accuracy"]))
                                                    for e in history if "eval_accuracy" in e]
    summary = {e["variant"]: e["value"] for e in session["events"] if e["metric"] == "Summary"}
    assert summary["train_loss"] == pytest.approx(history[-1]["train_loss"])
    assert summary["epoch"] == pytest.approx(history[-1]["epoch"])
    assert not scalars(session, "train", "train_runtime")

    params = {name: entry["value"] for name, entry in task["hyperparams"]["flytrain"].items()}
    assert float(params["learning_rate"]) == trainer.args.learning_rate
    assert params["model.hidden"] == "32" and params["model.class"] == "TinyMLP"
    assert trainer.args.learning_rate == 5e-5  # connect() got a copy: the arguments are untouched

    # CLEARML_LOG_MODEL: every checkpoint is a zipped artifact of the task
    artifacts = {a["key"]: a for a in task["execution"]["artifacts"]}
    assert set(artifacts) == {"checkpoint-4", "checkpoint-8"}
    with zipfile.ZipFile(artifacts["checkpoint-8"]["uri"]) as archive:
        assert {"model.safetensors", "trainer_state.json"} <= set(archive.namelist())

    assert SECRET_KEY.encode() not in session["raw"] and ACCESS_KEY.encode() not in session["raw"]
    # checked in ClearML's own records only: the zipped checkpoints hold trainer_lib's training_args.json
    records = open(os.path.join(session["folder"], "task.json"), "rb").read()
    records += open(os.path.join(session["folder"], "metrics.jsonl"), "rb").read()
    assert SECRET.encode() not in records


@pytest.mark.timeout(120)
def test_a_running_task_is_used_and_left_open(clearml_env, tmp_path):
    from clearml import Task

    Task.set_offline(offline_mode=True)
    own = Task.init(project_name="mine", task_name="outer", auto_connect_frameworks=False)
    try:
        trainer = make_trainer(tmp_path / "out", max_steps=4, eval_strategy="no", save_strategy="no")
        trainer.train()
        assert Task.current_task() is own
        own.get_logger().report_scalar("after", "training", 1.0, iteration=5)
    finally:
        own.close()
    (session,) = read_sessions(clearml_env)
    assert session["task"]["name"] == "outer"
    assert [s for s, _ in scalars(session, "train", "loss")] == [2, 4]
    assert scalars(session, "after", "training") == [(5, 1.0)]


def test_invalid_environment_is_a_clear_error(clearml_env, tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARML_LOG_MODEL", "sometimes")
    with pytest.raises(ValueError, match="CLEARML_LOG_MODEL"):
        make_trainer(tmp_path / "out")

