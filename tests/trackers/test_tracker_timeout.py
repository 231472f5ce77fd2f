"""FLYTRAIN_TRACKER_TIMEOUT bounds the TOTAL time a tracker backend that stops answering adds to the process:
inside training and at exit. A real loopback server accepts connections and never answers (from the start, or from
the middle of the run on through a freezing proxy in front of a real mlflow server); the time is measured around a
subprocess, against the same training without the hung tracker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
#: the configured budget; the HTTP client's own timeout is set far above it, so only the budget can stop a wait
BUDGET_S = 4.0

SCRIPT = """
import json, os, socket, sys, threading, time

import mlflow  # imported before any timing: importing is not waiting on the backend

from tests.helpers import make_trainer
from trainer_lib import TrainerCallback

out, mode, upstream = sys.argv[1], sys.argv[2], sys.argv[3]
frozen = threading.Event()
held = []


def pipe(source, target):
    try:
        while data := source.recv(65536):
            if frozen.is_set():
                return  # keep both sockets open and answer nothing from now on
            target.sendall(data)
    except OSError:
        pass


def serve(listener):
    while True:
        client, _ = listener.accept()
        held.append(client)  # accepted; with no upstream (or frozen) it never gets an answer
        if mode == "never" or frozen.is_set():
            continue
        server = socket.create_connection(("127.0.0.1", int(upstream)))
        held.append(server)
        for a, b in ((client, server), (server, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


listener = socket.create_server(("127.0.0.1", 0))
threading.Thread(target=serve, args=(listener,), daemon=True).start()


class FreezeAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if mode == "mid_run" and state.global_step == 8:
            frozen.set()


settings = dict(eval_strategy="no", save_strategy="no", max_steps=20, logging_steps=2, strict_integrations=False)
start = time.monotonic()
make_trainer(os.path.join(out, "baseline"), report_to=[], **settings).train()
baseline = time.monotonic() - start
os.environ["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{listener.getsockname()[1]}"
with open(os.path.join(out, "times.json"), "w") as f:
    json.dump({"baseline": baseline, "hung_start_wall": time.time()}, f)
trainer = make_trainer(os.path.join(out, "hung"), report_to=["mlflow"], callbacks=[FreezeAt()], **settings)
output = trainer.train()
assert output.global_step == 20
print("TRAINED", flush=True)
"""


def _added_seconds(tmp_path: Path, mode: str, upstream: str) -> float:
    """Run the script; the seconds the hung tracker added to the process, exit included."""
    script = tmp_path / "hung.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FLYTRAIN_TRACKER_TIMEOUT": str(BUDGET_S),
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "300", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "FLYTRAIN_TRACKER_SEND_INTERVAL": "0"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), mode, upstream], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    exited_wall = time.time()
    assert proc.returncode == 0 and "TRAINED" in proc.stdout, proc.stderr[-3000:]
    assert "FLYTRAIN_TRACKER_TIMEOUT" in proc.stderr  # the one warning says why the tracker was given up
    times = json.loads((tmp_path / "times.json").read_text())
    return exited_wall - times["hung_start_wall"] - times["baseline"]


# Without the bound a single call waits MLFLOW_HTTP_REQUEST_TIMEOUT (300 s). The margin (half the budget) is for the
# process teardown and the noise between two trainings on a loaded machine; both are far below it.
LIMIT_S = 1.5 * BUDGET_S


def test_a_backend_that_never_answers_adds_at_most_the_tracker_timeout_in_total(tmp_path):
    added = _added_seconds(tmp_path, "never", "0")
    assert added <= LIMIT_S, f"the hung tracker added {added:.1f}s; FLYTRAIN_TRACKER_TIMEOUT={BUDGET_S:g}s"


@pytest.mark.slow
def test_a_backend_that_stops_answering_mid_run_adds_at_most_the_tracker_timeout(mlflow_server, tmp_path):
    added = _added_seconds(tmp_path, "mid_run", mlflow_server.rsplit(":", 1)[1])
    assert added <= LIMIT_S, f"the hung tracker added {added:.1f}s; FLYTRAIN_TRACKER_TIMEOUT={BUDGET_S:g}s"
