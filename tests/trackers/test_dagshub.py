"""DagsHub: tracking goes to the real local MLflow server; the real dagshub client uploads to a local stub of
DagsHub's content API, which records what it was sent. The token never shows up anywhere but the auth header."""

from __future__ import annotations

import email
import email.policy
import json
import logging
import os
import threading
import uuid
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from callbacks._common import REDACTED
from callbacks.dagshub import DagsHubCallback, configure_mlflow_credentials, require_token, resolve_repo
from tests.helpers import make_model
from tests.helpers import make_trainer as shared_trainer
from trainer_lib import TrainingArguments

TOKEN = "dh-t0ken-4f8a9c2e71"
OWNER, REPO = "alice", "digits"
#: the token's user: a collaborator on alice's repository, not its owner
TOKEN_USER = "carol"


def _repo_json(host: str) -> dict:
    user = {"id": 1, "login": OWNER, "full_name": OWNER, "avatar_url": None, "public_email": None, "website": None,
            "company": None, "description": None, "username": OWNER}
    return {
        "id": 7, "owner": user, "name": REPO, "full_name": f"{OWNER}/{REPO}", "description": "", "private": False,
        "fork": False, "parent": None, "empty": False, "mirror": False, "size": 1, "html_url": f"{host}/{OWNER}/{REPO}",
        "ssh_url": None, "clone_url": f"{host}/{OWNER}/{REPO}.git", "website": None, "stars_count": 0,
        "forks_count": 0, "watchers_count": 0, "open_issues_count": 0, "default_branch": "main",
        "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z", "permissions": None,
    }


def _branch_json(branch: str) -> dict:
    commit = {"id": "a" * 40, "message": "init", "url": "", "author": None, "committer": None, "added": None,
              "removed": None, "modified": None, "timestamp": "2024-01-01T00:00:00Z"}
    return {"name": branch, "commit": commit}


class DagsHubStub:
    """Just enough of DagsHub's repo API for ``dagshub.upload.Repo``: repo info, branch head, content upload."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        #: with ``stall`` set, a content PUT is received and then left unanswered until ``release`` is set
        self.stall, self.release = False, threading.Event()
        self.unanswered = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, payload: dict | None = None) -> None:
                body = json.dumps(payload or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if self.command == "PUT":
                    self.send_header("ETag", "b" * 40)
                self.end_headers()
                self.wfile.write(body)

            def _record(self, body: bytes = b"") -> dict:
                entry = {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                stub.requests.append(entry)
                return entry

            def do_GET(self) -> None:
                self._record()
                base = f"/api/v1/repos/{OWNER}/{REPO}"
                if self.path == base:
                    self._reply(200, _repo_json(stub.url))
                elif self.path.startswith(base + "/branches/"):
                    self._reply(200, _branch_json(self.path.rsplit("/", 1)[1]))
                elif self.path == "/api/v1/user" and self.headers.get("Authorization") == f"Bearer {TOKEN}":
                    self._reply(200, {"id": 2, "login": TOKEN_USER, "username": TOKEN_USER, "full_name": TOKEN_USER})
                else:
                    self._reply(404)

            def do_PUT(self) -> None:
                entry = self._record(self._body())
                message = email.message_from_bytes(
                    f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + entry["body"],
                    policy=email.policy.HTTP,
                )
                entry["fields"], entry["files"] = {}, {}
                for part in message.iter_parts():
                    payload = part.get_payload(decode=True)
                    if part.get_filename():
                        entry["files"][part.get_filename()] = payload
                    else:
                        entry["fields"][part.get_param("name", header="content-disposition")] = payload.decode()
                if stub.stall:
                    stub.unanswered += 1
                    stub.release.wait(120)
                    stub.unanswered -= 1
                self._reply(200)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = DagsHubStub()
    yield server
    server.close()


@pytest.fixture
def dagshub_env(monkeypatch, mlflow_server, stub, tmp_path) -> str:
    """Tracking on the local MLflow server, the repo named explicitly, the client pointed at the stub."""
    name = f"dagshub-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    monkeypatch.setenv("DAGSHUB_REPO_OWNER", OWNER)
    monkeypatch.setenv("DAGSHUB_REPO_NAME", REPO)
    monkeypatch.setenv("DAGSHUB_CLIENT_HOST", stub.url)
    monkeypatch.setenv("DAGSHUB_USER_TOKEN", TOKEN)
    monkeypatch.setenv("DAGSHUB_HTTP_TIMEOUT", "10")
    monkeypatch.setenv("DAGSHUB_CLIENT_TOKENS_CACHE", str(tmp_path / "no-token-cache"))
    monkeypatch.setenv("HF_DAGSHUB_LOG_ARTIFACTS", "true")
    monkeypatch.setenv("BRANCH", "main")
    return name


make_trainer = partial(shared_trainer, report_to=["dagshub"], max_steps=10, save_steps=10,
                       strict_integrations=False, extra={"hub_token": TOKEN})


def test_run_tracked_and_model_committed_without_leaking_the_token(dagshub_env, mlflow_server, stub, tmp_path,
                                                                    caplog, capfd, monkeypatch):
    caplog.set_level(logging.DEBUG)
    trainer = make_trainer(tmp_path / "out", strict_integrations=True)
    trainer.train()

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(dagshub_env).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["max_steps"] == "10" and run.data.params["extra"] == json.dumps({"hub_token": REDACTED})
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10]

    puts = [r for r in stub.requests if r["method"] == "PUT"]
    assert len(puts) == 1, [(r["method"], r["path"]) for r in stub.requests]
    (put,) = puts
    assert put["path"] == f"/api/v1/repos/{OWNER}/{REPO}/content/main/artifacts"
    assert put["headers"]["Authorization"] == f"Bearer {TOKEN}"  # sent to DagsHub, and only there
    assert put["fields"]["commit_choice"] == "direct" and run.info.run_id in put["fields"]["commit_summary"]
    assert set(put["files"]) == {"model.safetensors", "training_args.json", "config.json"}
    out = tmp_path / "out"
    assert put["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()
    weights = load_file(str(out / "model.safetensors"))
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(weights[key], value), key
    uploaded_args = json.loads(put["files"]["training_args.json"])
    assert uploaded_args["max_steps"] == 10 and uploaded_args["extra"] == {"hub_token": REDACTED}
    assert json.loads(put["files"]["config.json"]) == {"dropout": 0.1, "hidden": 32}

    # The token is nowhere else: not in the run, not in the uploaded files, not in any log line or console output.
    run = client.get_run(run.info.run_id)
    assert TOKEN not in json.dumps([run.data.params, run.data.tags, run.data.metrics])
    assert all(TOKEN.encode() not in body for body in put["files"].values())
    assert TOKEN not in caplog.text
    captured = capfd.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err
    # MLflow was not handed the token: the tracking server is not the DagsHub host.
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_without_token_fails_at_once_and_calls_nobody(dagshub_env, stub, tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSHUB_USER_TOKEN")
    trainer = make_trainer(tmp_path / "out", strict_integrations=True)
    with pytest.raises(RuntimeError, match="DAGSHUB_USER_TOKEN.*MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused when training began, before any step
    assert stub.requests == []


def test_without_token_training_goes_on_with_one_warning(dagshub_env, stub, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("DAGSHUB_USER_TOKEN")
    caplog.set_level(logging.WARNING)
    output = make_trainer(tmp_path / "out").train()
    assert output.global_step == 10
    warnings = [r.getMessage() for r in caplog.records if r.name == "trainer_lib.callback"]
    assert len(warnings) == 1 and "DAGSHUB_USER_TOKEN" in warnings[0]


@pytest.mark.parametrize("uri", ["https://dagshub.com/alice", "https://dagshub.com/alice/digits", "not a uri", ""])
def test_malformed_tracking_uri_is_a_clear_value_error(monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_URI.*<owner>/<repo>\.mlflow"):
        resolve_repo()


def test_malformed_tracking_uri_fails_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://dagshub.com/alice")
    monkeypatch.setenv("DAGSHUB_USER_TOKEN", TOKEN)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        DagsHubCallback()._open(TrainingArguments(output_dir=str(tmp_path)), None, make_model())


def test_repo_from_tracking_uri_or_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:pw@127.0.0.1:8123/bob/proj.mlflow/")
    repo = resolve_repo()
    assert (repo.owner, repo.name, repo.host, repo.branch) == ("bob", "proj", "http://127.0.0.1:8123", "main")
    monkeypatch.setenv("DAGSHUB_CLIENT_HOST", "http://127.0.0.1:9")
    monkeypatch.setenv("BRANCH", "exp")
    assert (resolve_repo().host, resolve_repo().branch) == ("http://127.0.0.1:9", "exp")
    monkeypatch.setenv("DAGSHUB_REPO_OWNER", "carol")
    monkeypatch.setenv("DAGSHUB_REPO_NAME", "other")
    assert (resolve_repo().owner, resolve_repo().name) == ("carol", "other")


def test_mlflow_logs_in_as_the_tokens_user_and_only_on_the_repos_own_host(monkeypatch, stub):
    """Precedence: an MLflow login in the environment, else the token as DAGSHUB_USERNAME, else as the user DagsHub
    says the token belongs to (not the repository's owner: wrong for collaborators and organisations)."""
    monkeypatch.setenv("DAGSHUB_USER_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{stub.url}/{OWNER}/{REPO}.mlflow")
    configure_mlflow_credentials(10)
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == TOKEN_USER and os.environ["MLFLOW_TRACKING_PASSWORD"] == TOKEN

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("DAGSHUB_USERNAME", "dave")
    configure_mlflow_credentials(10)
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "dave"

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "erin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "erins-token")
    configure_mlflow_credentials(10)  # the user's own MLflow login wins
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("erin", "erins-token")
    monkeypatch.delenv("DAGSHUB_USER_TOKEN")
    assert require_token() == "erins-token"  # and its password is the DagsHub token for the upload too

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("DAGSHUB_USER_TOKEN", TOKEN)
    monkeypatch.setenv("DAGSHUB_CLIENT_HOST", "https://elsewhere.example")
    configure_mlflow_credentials(10)
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_upload_that_never_answers_gives_up_reported_once_and_the_run_ends(dagshub_env, mlflow_server, stub, tmp_path,
                                                                          monkeypatch, caplog):
    """DAGSHUB_HTTP_TIMEOUT bounds the upload: the stub takes the content PUT and never answers while training
    runs; train() returns with the PUT still unanswered, one warning names the timeout, the MLflow run is ended (as
    FAILED: a disabled integration ends its run failed, its model was not committed)."""
    monkeypatch.setenv("DAGSHUB_HTTP_TIMEOUT", "0.5")
    stub.stall = True
    caplog.set_level(logging.WARNING)
    trainer = make_trainer(tmp_path / "out")
    output = trainer.train()

    assert output.global_step == 10
    assert [r["method"] for r in stub.requests].count("PUT") == 1 and stub.unanswered == 1  # given up, not answered
    warnings = [r.getMessage() for r in caplog.records if r.name == "trainer_lib.callback"]
    assert len(warnings) == 1 and "DAGSHUB_HTTP_TIMEOUT" in warnings[0], warnings

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(dagshub_env).experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10]
    assert run.info.status == "FAILED"
