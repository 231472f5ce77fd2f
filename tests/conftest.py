"""Tracker test fixtures: a real ``mlflow server`` (sqlite, 127.0.0.1, a free port) and a quiet, offline env.

``mlflow_server`` (session) yields the URI of one shared server; ``mlflow_server_factory`` starts private servers
(``MlflowServer`` objects a test may stop) and stops them after the test.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from unittest import mock

import pytest

START_TIMEOUT_S = 60.0


def pytest_addoption(parser) -> None:
    parser.addoption("--shuffle-seed", type=int, default=None, metavar="N",
                     help="run the collected tests in a random order drawn from N (finds tests that depend on order)")


def pytest_report_header(config) -> str | None:
    seed = config.getoption("--shuffle-seed")
    return None if seed is None else f"test order shuffled with --shuffle-seed {seed}"


def pytest_collection_modifyitems(config, items) -> None:
    seed = config.getoption("--shuffle-seed")
    if seed is not None:
        random.Random(seed).shuffle(items)

#: prefixes of every tracker's settings: a test neither inherits them from the shell nor leaks them to the next test
#: (ClearML also leaves TRAINS_* behind in a process that used it; DagsHub sets MLFLOW_TRACKING_* credentials)
_TRACKER_ENV_PREFIXES = (
    "MLFLOW_", "DAGSHUB_", "CLEARML_", "TRAINS_", "WANDB_", "COMET_", "NEPTUNE_", "CODECARBON_", "AZUREML_",
    "FLYTRAIN_TRACKER_", "HF_MLFLOW_", "HF_DAGSHUB_", "HF_DVCLIVE_",
)
_TRACKER_ENV_NAMES = ("DISABLE_MLFLOW_INTEGRATION", "BRANCH")


def is_tracker_env(name: str) -> bool:
    """Whether ``name`` configures a tracker integration (see ``_tracker_env``)."""
    return (name.startswith(_TRACKER_ENV_PREFIXES) or name in _TRACKER_ENV_NAMES
            or (name.startswith("FLYTRAIN_") and name.endswith("_SEND_INTERVAL")))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """One ``mlflow server`` subprocess in its own process group, so stopping it stops its workers too."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.log_path = self.root / "server.log"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        exe = Path(sys.executable).parent / "mlflow"
        base = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
        return base + [
            "server", "--backend-store-uri", self.db_uri, "--default-artifact-root", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]

    def start(self, timeout: float = START_TIMEOUT_S) -> str:
        """Start and wait until ``/health`` answers; a clear error with the server's output otherwise."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
        env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
        deadline = time.monotonic() + timeout
        for _ in range(3):  # a port taken between free_port() and the bind: try another
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    cwd=self.root, start_new_session=True,
                )
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if self._healthy():
                    return self.uri
                time.sleep(0.2)
            self.stop()
            if "address already in use" not in self.output().lower() or time.monotonic() >= deadline:
                break
        raise RuntimeError(f"mlflow server did not answer within {timeout:g}s; its output:\n{self.output()[-4000:]}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, kill: bool = False) -> None:
        """Terminate the server's process group (SIGKILL after 10 s, or at once with ``kill``); safe to repeat."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        signals = ((signal.SIGKILL, 5),) if kill else ((signal.SIGTERM, 10), (signal.SIGKILL, 5))
        for sig, wait in signals:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # uvicorn's worker may outlive the parent for a moment; make sure the group is gone
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """The URI of a real MLflow tracking server shared by the session."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def mlflow_server_factory(tmp_path):
    """Start private servers (``factory() -> MlflowServer``); each is stopped after the test."""
    servers: list[MlflowServer] = []

    def start() -> MlflowServer:
        server = MlflowServer(tmp_path / f"mlflow-server-{len(servers)}")
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def _tracker_env():
    """Every tracker's variables cleared for the test and the whole environment restored after it (also what a
    tracker set by itself); short MLflow retries and timeouts, no telemetry."""
    with mock.patch.dict(os.environ):
        for name in [n for n in os.environ if is_tracker_env(n)]:
            del os.environ[name]
        os.environ.update(
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10",
            MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0", MLFLOW_HTTP_REQUEST_BACKOFF_JITTER="0",
            MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
        )
        yield
