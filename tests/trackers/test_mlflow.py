"""MLflow: runs on a real tracking server, read back with MlflowClient (params, step metrics, artifacts, status)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from functools import partial
from pathlib import Path

import pytest

from callbacks._common import REDACTED
from callbacks.mlflow import MLflowCallback, sanitize_name
from tests.conftest import free_port
from tests.helpers import make_model
from tests.helpers import make_trainer as shared_trainer
from trainer_lib import TrainerCallback, TrainerState, TrainingArguments

SECRET = "mlf-s3cr3t-value-7731"
HUB_SECRET = "hf_hub_s3cr3t_9911"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class HubArgs(TrainingArguments):
    """Arguments with a credential field, as the reference Trainer has (hub_token)."""

    hub_token: str | None = None


make_trainer = partial(shared_trainer, report_to=["mlflow"], strict_integrations=False)


@pytest.fixture
def experiment(monkeypatch, mlflow_server) -> str:
    """A fresh experiment on the shared server, selected through the environment."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)
    return name


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def runs_of(client, name: str):
    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"experiment {name} was not created"
    return client.search_runs([exp.experiment_id])


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def integration_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trainer_lib.callback" and r.levelno >= logging.WARNING]


def test_sanitize_name():
    assert sanitize_name("eval_accuracy") == "eval_accuracy"
    assert sanitize_name("a:b*c/d e.f-g") == "a_b_c/d e.f-g"
    assert sanitize_name("/x//y/./z/") == "x/y/z"
    assert sanitize_name("") == "_"


def test_params_metrics_artifacts_and_finished(experiment, mlflow_server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "true")
    monkeypatch.setenv("MLFLOW_FLATTEN_PARAMS", "1")
    monkeypatch.setenv("MLFLOW_TAGS", json.dumps({"team": "vision", "purpose": "test"}))
    extra = {"hub_token": HUB_SECRET, "note": f"uses {SECRET}", "long": "x" * 7000}
    extra.update({f"k{i:03d}": i for i in range(120)})  # > 100 params: several batches
    trainer = make_trainer(tmp_path / "out", args_cls=HubArgs, hub_token=HUB_SECRET, extra=extra)
    caplog.set_level(logging.WARNING)
    trainer.train()
    trainer.log({"comment": "not a number", "odd:name": 3.0})
    trainer.log({"comment": "still not a number"})

    client = client_for(mlflow_server)
    (run,) = runs_of(client, experiment)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["learning_rate"] == str(trainer.args.learning_rate)
    assert params["max_steps"] == "20"
    assert params["model.hidden"] == "32" and params["model.class"] == "TinyMLP"
    assert params["extra.k119"] == "119" and params["extra.note"] == f"uses {REDACTED}"
    assert params["hub_token"] == REDACTED and params["extra.hub_token"] == REDACTED
    assert "extra.long" not in params
    assert tags["team"] == "vision" and tags["purpose"] == "test"
    everything = json.dumps([params, tags, run.data.metrics])
    assert SECRET not in everything and HUB_SECRET not in everything

    logged = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key not in ("step", "epoch"):
                logged.setdefault(key, []).append((entry["step"], value))
    for key in ("loss", "learning_rate", "grad_norm", "eval_accuracy", "eval_loss", "train_loss"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        want = logged[key]
        assert [s for s, _ in history] == [s for s, _ in sorted(want)], key
        assert [v for _, v in history] == pytest.approx([v for _, v in sorted(want)]), key
    assert steps(client, run.info.run_id, "loss") == [5, 10, 15, 20]
    assert steps(client, run.info.run_id, "odd_name") == [20]  # logged after training: same run
    assert "comment" not in run.data.metrics

    messages = [r.getMessage() for r in caplog.records if r.name == "callbacks.mlflow"]
    assert sum("'comment'" in m for m in messages) == 1  # one warning per non-numeric key
    assert any("extra.long" in m for m in messages)

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert top == {"checkpoint-10", "checkpoint-20", "final_model"}
    files = {os.path.basename(a.path) for a in client.list_artifacts(run.info.run_id, "checkpoint-20")}
    assert {"model.safetensors", "trainer_state.json", "training_args.json", "manifest.json"} <= files
    local = client.download_artifacts(run.info.run_id, "checkpoint-20/training_args.json", str(tmp_path / "dl"))
    uploaded = Path(local).read_text()
    assert HUB_SECRET not in uploaded and SECRET not in uploaded and REDACTED in uploaded


def test_artifacts_follow_checkpoint_rotation_and_the_final_model_is_logged(experiment, mlflow_server, tmp_path,
                                                                           monkeypatch):
    """save_total_limit=1: a checkpoint deleted locally is deleted from the run too (no stale copy left as the only
    one), and the final model's files are logged at train end."""
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "true")
    out = tmp_path / "out"
    trainer = make_trainer(out, max_steps=30, save_total_limit=1, eval_strategy="no")
    trainer.train()
    client = client_for(mlflow_server)
    (run,) = runs_of(client, experiment)
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-30"]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == kept + ["final_model"]
    final = {os.path.basename(a.path) for a in client.list_artifacts(run.info.run_id, "final_model")}
    assert final == {"model.safetensors", "config.json"}
    from safetensors.torch import load_file

    weights = load_file(client.download_artifacts(run.info.run_id, "final_model/model.safetensors", str(tmp_path / "dl")))
    assert all((weights[k] == v.cpu()).all() for k, v in trainer.model.state_dict().items())


def test_disabled_by_env_sends_nothing(experiment, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "true")
    make_trainer(tmp_path / "out", max_steps=5, eval_strategy="no").train()
    assert client_for(mlflow_server).get_experiment_by_name(experiment) is None


def test_resume_continues_the_same_run_each_step_once(experiment, mlflow_server, tmp_path):
    out = tmp_path / "out"
    make_trainer(out).train()
    client = client_for(mlflow_server)
    (first,) = runs_of(client, experiment)
    saved = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["MLflowCallback"]["attributes"]["_resume_run_id"] == first.info.run_id

    # A fresh Trainer resumed from step 10 logs steps 15 and 20 again: they are already in the run.
    trainer = make_trainer(out)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-10"))
    (run,) = runs_of(client, experiment)
    assert run.info.run_id == first.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert steps(client, run.info.run_id, "loss") == [5, 10, 15, 20]
    assert steps(client, run.info.run_id, "eval_accuracy") == [10, 20]
    assert steps(client, run.info.run_id, "train_loss") == [20]


class RaiseAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"stopped at step {self.step}")


def test_steps_after_the_crash_come_from_the_resumed_process(experiment, mlflow_server, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="stopped at step 12"):
        make_trainer(out, callbacks=[RaiseAt(12)]).train()
    client = client_for(mlflow_server)
    (run,) = runs_of(client, experiment)
    assert steps(client, run.info.run_id, "loss") == [5, 10]
    # another data order after the checkpoint: steps 15 and 20 get losses no uninterrupted run would log
    resumed = make_trainer(out, shuffled_data=True)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-10"))
    (run,) = runs_of(client, experiment)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(history) == [5, 10, 15, 20]
    logged = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    assert [history[15], history[20]] == pytest.approx([logged[15], logged[20]], rel=1e-6)


def test_env_run_id_wins_and_integration_error_marks_failed(experiment, mlflow_server, tmp_path, monkeypatch):
    client = client_for(mlflow_server)
    exp_id = client.create_experiment(experiment)
    target = client.create_run(exp_id, run_name="given").info.run_id
    client.set_terminated(target, "FINISHED")
    monkeypatch.setenv("MLFLOW_RUN_ID", target)
    callback = MLflowCallback()
    callback._resume_run_id = "0" * 32  # a checkpoint's id: the environment's wins
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    callback._ensure_setup(args, TrainerState(), make_model())
    assert callback.state()["attributes"]["_resume_run_id"] == target
    assert client.get_run(target).info.status == "RUNNING"
    callback.on_integration_error("on_log", RuntimeError("boom"))
    assert client.get_run(target).info.status == "FAILED"


FAILING_SCRIPT = """
import sys
from tests.helpers import digits, make_model
from trainer_lib import Trainer, TrainerCallback, TrainingArguments

class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 7:
            raise RuntimeError("boom at step 7")

train, _ = digits(128, 16)
args = TrainingArguments(output_dir=sys.argv[1], max_steps=20, logging_steps=5, save_steps=100,
                         per_device_train_batch_size=16, report_to=["mlflow"], disable_tqdm=True)
Trainer(make_model(), args, train_dataset=train, callbacks=[Boom()]).train()
"""


def test_training_that_raises_leaves_the_run_failed(experiment, mlflow_server, tmp_path):
    script = tmp_path / "train_fails.py"
    script.write_text(textwrap.dedent(FAILING_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "boom at step 7" in proc.stderr, proc.stderr[-2000:]
    client = client_for(mlflow_server)
    (run,) = runs_of(client, experiment)
    assert run.info.status == "FAILED"
    assert steps(client, run.info.run_id, "loss") == [5]


def test_dead_backend_training_completes_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    caplog.set_level(logging.WARNING)
    trainer = make_trainer(tmp_path / "out", eval_strategy="no")
    output = trainer.train()
    assert output.global_step == 20
    warnings = integration_warnings(caplog)
    assert len(warnings) == 1 and "'mlflow'" in warnings[0], warnings
    assert not any(isinstance(cb, MLflowCallback) for cb in trainer.callback_handler.callbacks)


class TcpProxy:
    """A TCP forwarder to the real server; ``cut()`` closes it and every open connection: the backend is gone."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


class AtStep(TrainerCallback):
    def __init__(self, step: int, action) -> None:
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.action()


def outage_after_step_5(uri: str, experiment: str, outage):
    """An action that lets the (asynchronously sent) step-5 metrics reach the server, then takes it away."""

    def action() -> None:
        client, deadline = client_for(uri), time.monotonic() + 30
        while time.monotonic() < deadline:
            runs = runs_of(client, experiment)
            if runs and steps(client, runs[0].info.run_id, "loss") == [5]:
                break
            time.sleep(0.1)
        outage()

    return action


def _train_through_outage(trainer, caplog) -> None:
    caplog.set_level(logging.WARNING)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MLflowCallback))
    output = trainer.train()
    assert output.global_step == 20
    # event-based, no clock: what the failing backend cost stayed within FLYTRAIN_TRACKER_TIMEOUT (the whole bound
    # is tested with a backend that never answers, test_tracker_timeout.py)
    assert callback._budget.spent <= callback._budget.seconds
    assert len([r for r in caplog.records if r.name == "callbacks.mlflow" and "failed" in r.getMessage()]) <= 1
    assert len(integration_warnings(caplog)) <= 1


def test_backend_gone_mid_run_training_completes(experiment, mlflow_server, tmp_path, monkeypatch, caplog):
    proxy = TcpProxy(int(mlflow_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{proxy.port}")
    cut = outage_after_step_5(mlflow_server, experiment, proxy.cut)
    trainer = make_trainer(tmp_path / "out", eval_strategy="no", callbacks=[AtStep(8, cut)])
    _train_through_outage(trainer, caplog)
    client = client_for(mlflow_server)
    (run,) = runs_of(client, experiment)
    assert steps(client, run.info.run_id, "loss") == [5]  # what was sent before the outage is there
    assert run.data.params["max_steps"] == "20"


@pytest.mark.slow
def test_server_killed_mid_run_training_completes(mlflow_server_factory, tmp_path, monkeypatch, caplog):
    server = mlflow_server_factory()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "killed")
    kill = outage_after_step_5(server.uri, "killed", lambda: server.stop(kill=True))
    trainer = make_trainer(tmp_path / "out", eval_strategy="no", callbacks=[AtStep(8, kill)])
    _train_through_outage(trainer, caplog)
    client = client_for(server.db_uri)  # the server is gone: read its database directly
    (run,) = runs_of(client, "killed")
    assert steps(client, run.info.run_id, "loss") == [5]


def test_the_first_metrics_go_out_at_once_on_a_freshly_booted_clock(tmp_path, monkeypatch, experiment):
    """time.monotonic() reads seconds after boot on a new machine: the first batch must not wait for the interval."""
    import callbacks._common as common

    monkeypatch.setattr(common.time, "monotonic", lambda: 1.0)
    monkeypatch.setenv("FLYTRAIN_TRACKER_SEND_INTERVAL", "3600")
    held: dict[int, int] = {}

    class Held(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MLflowCallback))
            held[state.global_step] = len(cb._buffer)

    trainer = make_trainer(tmp_path / "out", callbacks=[Held()], save_strategy="no", eval_strategy="no")
    trainer.train()
    assert held[5] == 0  # sent at once
    assert held[10] > 0  # the next waits: the clock stands still
    client = client_for(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = runs_of(client, experiment)
    assert steps(client, run.info.run_id, "loss") == [5, 10, 15, 20]


@pytest.mark.parametrize("nested", [True, False])
def test_a_run_the_user_opened_is_the_parent_with_mlflow_nested_run_else_the_run_used(
        nested, experiment, mlflow_server, tmp_path, monkeypatch):
    import mlflow

    if nested:
        monkeypatch.setenv("MLFLOW_NESTED_RUN", "true")
    with mlflow.start_run() as outer:  # on the fixture's MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME
        make_trainer(tmp_path / "out", eval_strategy="no", save_strategy="no").train()
        client = client_for(mlflow_server)
        runs = {r.info.run_id: r for r in runs_of(client, experiment)}
        assert client.get_run(outer.info.run_id).info.status == "RUNNING"  # the user's run is left to the user
    if nested:
        (child,) = [r for r in runs.values() if r.info.run_id != outer.info.run_id]
        assert child.data.tags["mlflow.parentRunId"] == outer.info.run_id
        assert child.info.status == "FINISHED" and steps(client, child.info.run_id, "loss") == [5, 10, 15, 20]
    else:
        assert list(runs) == [outer.info.run_id]
        assert steps(client, outer.info.run_id, "loss") == [5, 10, 15, 20]
