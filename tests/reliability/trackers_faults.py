"""Tracker faults with real trackers and a real MLflow server: R3 outages, R7 concurrent runs (R6: canary.py).

Each function returns a list of (case, held, detail), like ``checks.py``: the tests assert on them and
``python -m tests.reliability.report`` prints them as figures.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from unittest import mock

from trainer_lib import TrainerCallback
from trainer_lib.callback import EVENTS, IntegrationCallback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAILED_NAME = "flytrain_always_fails"


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set (``None``: remove) environment variables for the block; patch.dict restores them after."""
    with mock.patch.dict(os.environ, {k: v for k, v in values.items() if v is not None}):
        for key in [k for k, v in values.items() if v is None]:
            os.environ.pop(key, None)
        yield


class _Records(logging.Handler):
    """Collects the WARNING+ records of our loggers and mlflow's (mlflow's do not propagate to the root)."""

    NAMES = ("trainer_lib", "callbacks", "mlflow")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _Records:
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)


def tensorboard_steps(logging_dir: str, tag: str = "train/loss") -> list[int]:
    """The steps of ``tag`` in TensorBoard's event files, read with TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logging_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def dvclive_steps(output_dir: str, name: str = "loss") -> list[int]:
    """The steps of DVCLive's plot file ``plots/metrics/train/<name>.tsv``."""
    path = os.path.join(output_dir, "dvclive", "plots", "metrics", "train", f"{name}.tsv")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f, delimiter="\t")]


# -- R3: a tracker fails; training and the other trackers go on --------------------------------------------------
class AlwaysFails(IntegrationCallback):
    """A third-party integration (registered at run time) whose every event raises."""

    integration_name = FAILED_NAME


def _raise(self, args, state, control, **kwargs):
    raise ConnectionError(f"{FAILED_NAME} is down")


for _event in EVENTS:
    setattr(AlwaysFails, _event, _raise)


class StopServerAt(TrainerCallback):
    """At ``on_step_end`` of ``step``: wait until MLflow shows every step logged before it, then SIGKILL the server,
    so the outage starts in the middle of the run, after data reached the server."""

    def __init__(self, server, step: int) -> None:
        self.server, self.step, self.mlflow_callback, self.seen = server, step, None, []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step or self.mlflow_callback is None:
            return
        import mlflow

        client = mlflow.MlflowClient(self.server.uri)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self.seen = sorted(m.step for m in client.get_metric_history(self.mlflow_callback._run_id, "loss"))
            if set(range(1, self.step)) <= set(self.seen):  # async batches may land out of order: wait for all
                break
            time.sleep(0.05)
        self.server.stop(kill=True)


def _store_steps(db_path: str, run_id: str, key: str = "loss") -> list[int]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute("SELECT step FROM metrics WHERE run_uuid = ? AND key = ?", (run_id, key)).fetchall()
    return sorted(r[0] for r in rows)


def _outage_case(work: str, failing: str, env: dict[str, str | None], setup: Callable | None = None):
    """One tiny training with TensorBoard + DVCLive + the failing tracker; returns (problems, trainer)."""
    from tests.helpers import digits, make_model
    from trainer_lib import Trainer, TrainingArguments

    out = os.path.join(work, "out")
    train, _ = digits(192, 16)
    args = TrainingArguments(output_dir=out, max_steps=12, logging_steps=1, save_steps=6,
                             per_device_train_batch_size=16, report_to=["tensorboard", "dvclive", failing],
                             disable_tqdm=True)
    start = time.monotonic()
    problems: list[str] = []
    with contextlib.chdir(work), _environ(**env), _Records() as records, contextlib.redirect_stdout(io.StringIO()):
        extra = setup() if setup else None
        trainer = Trainer(make_model(), args, train_dataset=train, callbacks=[extra] if extra else None)
        if extra is not None:
            extra.mlflow_callback = next(c for c in trainer.callback_handler.callbacks
                                         if getattr(c, "integration_name", "") == "mlflow")
        try:
            trainer.train()
        except Exception as error:
            problems.append(f"training raised {type(error).__name__}: {error}")
    seconds = time.monotonic() - start
    if trainer.state.global_step != args.max_steps:
        problems.append(f"stopped at step {trainer.state.global_step}")
    reports = [r for r in records.records if r.name == "trainer_lib.callback"
               and r.getMessage().startswith(f"Integration {failing!r} failed")]
    own = [r for r in records.records if r.name.startswith("callbacks.")]
    if len(reports) != 1:
        problems.append(f"failure reported {len(reports)} times by the handler")
    if own:
        problems.append(f"{len(own)} more warnings from our integrations: {[r.getMessage()[:80] for r in own]}")
    others = [r.name for r in records.records if r not in reports and r not in own]
    logged = [e["step"] for e in trainer.state.log_history if "loss" in e]
    tb, live = tensorboard_steps(args.logging_dir), dvclive_steps(out)
    if tb != logged:
        problems.append(f"TensorBoard train/loss steps {tb} != logged {logged}")
    if live != logged:
        problems.append(f"DVCLive loss.tsv steps {live} != logged {logged}")
    detail = (f"{seconds:.1f} s, 1 report, TB and DVCLive have all {len(logged)} steps"
              + (f"; other libraries' warnings: {len(others)}" if others else ""))
    return problems, trainer, detail


def tracker_outage_trials(start_server: Callable[[], object]) -> list[tuple[str, bool, str]]:
    """R3: MLflow killed mid-run, MLflow at a dead port, and a registered integration that always raises.

    ``start_server()`` returns a started private ``tests.conftest.MlflowServer`` (this function kills it).
    """
    from tests.conftest import free_port
    from trainer_lib.registry import register_integration

    quick = {"FLYTRAIN_MLFLOW_SEND_INTERVAL": "0", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
             "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "FLYTRAIN_TRACKER_TIMEOUT": "0",
             "MLFLOW_RUN_ID": None, "MLFLOW_EXPERIMENT_NAME": "outage", "HF_MLFLOW_LOG_ARTIFACTS": None}
    results = []

    with tempfile.TemporaryDirectory() as work:
        server = start_server()
        stopper: list = []

        def make_stopper():
            stopper.append(StopServerAt(server, 6))
            return stopper[0]

        problems, trainer, detail = _outage_case(work, "mlflow", {**quick, "MLFLOW_TRACKING_URI": server.uri},
                                                 make_stopper)
        run_id = stopper[0].mlflow_callback._run_id if stopper and stopper[0].mlflow_callback else None
        stored = _store_steps(str(server.root / "mlflow.db"), run_id) if run_id else []
        if not stopper or 5 not in stopper[0].seen:
            problems.append(f"step 5 never reached MLflow before the kill (saw {stopper[0].seen if stopper else []})")
        if stored != list(range(1, len(stored) + 1)) or len(stored) < 5:
            problems.append(f"MLflow store lost steps before the outage: {stored}")
        results.append(("mlflow server SIGKILLed at step 6 of 12", not problems,
                        "; ".join(problems) or f"{detail}; MLflow kept steps {stored[0]}..{stored[-1]}"))

    with tempfile.TemporaryDirectory() as work:
        dead = f"http://127.0.0.1:{free_port()}"
        problems, _, detail = _outage_case(work, "mlflow", {**quick, "MLFLOW_TRACKING_URI": dead})
        results.append(("mlflow URI at a dead port from the start", not problems, "; ".join(problems) or detail))

    register_integration(FAILED_NAME, AlwaysFails)
    with tempfile.TemporaryDirectory() as work:
        problems, _, detail = _outage_case(work, FAILED_NAME, {})
        results.append(("registered integration raising on every event", not problems, "; ".join(problems) or detail))
    return results


# -- R7: several trainings log to one MLflow server at once ------------------------------------------------------
LOAD_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {root!r})
from tests.helpers import digits, make_model
from trainer_lib import Trainer, TrainingArguments

out, seed = sys.argv[1], int(sys.argv[2])
train, _ = digits(320, 16)
args = TrainingArguments(output_dir=out, max_steps={steps}, logging_steps=1, save_strategy="no",
                         per_device_train_batch_size=16, report_to=["mlflow"], disable_tqdm=True,
                         strict_integrations=True, run_name=f"load-{{seed}}", seed=seed)
trainer = Trainer(make_model(seed), args, train_dataset=train)
trainer.train()
ml = next(c for c in trainer.callback_handler.callbacks if getattr(c, "integration_name", "") == "mlflow")
print("RESULT " + json.dumps({{"run_id": ml.state()["attributes"]["_resume_run_id"],
                              "losses": [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e]}}))
"""


def concurrent_mlflow_trials(mlflow_uri: str, processes: int = 4, steps: int = 30) -> list[tuple[str, bool, str]]:
    """R7: ``processes`` trainings at once against one server; every run FINISHED with each logged step once."""
    import mlflow

    results = []
    with tempfile.TemporaryDirectory() as work:
        script = os.path.join(work, "train_load.py")
        with open(script, "w") as f:
            f.write(LOAD_SCRIPT.format(root=ROOT, steps=steps))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=mlflow_uri,
                   MLFLOW_EXPERIMENT_NAME=f"load-{secrets.token_hex(4)}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
                   MLFLOW_HTTP_REQUEST_TIMEOUT="20", MLFLOW_DISABLE_TELEMETRY="true")
        start = time.monotonic()
        procs = [subprocess.Popen([sys.executable, script, os.path.join(work, f"out{i}"), str(i)], env=env,
                                  cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(processes)]
        outputs = [p.communicate(timeout=600) for p in procs]
        seconds = time.monotonic() - start
        client = mlflow.MlflowClient(mlflow_uri)
        for i, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
            case = f"training {i + 1} of {processes} at once"
            lines = [line for line in stdout.decode().splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                results.append((case, False, f"rc={proc.returncode}: {stderr.decode()[-800:]}"))
                continue
            result = json.loads(lines[0][7:])
            history = sorted((m.step, m.value) for m in client.get_metric_history(result["run_id"], "loss"))
            expected = sorted((s, v) for s, v in result["losses"])
            status = client.get_run(result["run_id"]).info.status
            problems = []
            if [s for s, _ in history] != [s for s, _ in expected]:
                problems.append(f"MLflow loss steps {[s for s, _ in history]} != logged {[s for s, _ in expected]}")
            elif any(abs(a[1] - b[1]) > 1e-6 * max(1.0, abs(b[1])) for a, b in zip(history, expected)):
                problems.append("MLflow loss values differ from the training's")
            if status != "FINISHED":
                problems.append(f"run status {status}")
            results.append((case, not problems, "; ".join(problems) or
                            f"{len(history)} steps once each, FINISHED ({seconds:.0f} s for all)"))
    return results
