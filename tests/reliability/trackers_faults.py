"""Tracker faults with real trackers and a real MLflow server: R3 outages, R6 canary secret, R7 concurrent runs.

Each function returns a list of (case, held, detail), like ``checks.py``: the tests assert on them and
``python -m tests.reliability.report`` prints them as figures.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import logging
import os
import secrets
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from unittest import mock

from trainer_lib import TrainerCallback
from trainer_lib.callback import EVENTS, IntegrationCallback
from trainer_lib.redaction import REDACTED

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


# -- R6: a canary secret in every credential variable and in the arguments appears in no file or output ----------
CANARY_ENV = ("WANDB_API_KEY", "COMET_API_KEY", "NEPTUNE_API_TOKEN", "DAGSHUB_USER_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY", "HF_TOKEN",
              "MY_SERVICE_TOKEN")
CANARY_TRACKERS = ["tensorboard", "mlflow", "wandb", "comet_ml", "clearml", "codecarbon", "dvclive"]  # + neptune

CANARY_SCRIPT = r"""
import json, logging, os, sys
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
from callbacks.neptune import NeptuneCallback
from tests.helpers import accuracy, digits, make_model
from trainer_lib import Trainer, TrainingArguments

canary = os.environ["MY_SERVICE_TOKEN"]
out = sys.argv[1]
train, evaluation = digits(160, 32)
args = TrainingArguments(output_dir=out, max_steps=10, logging_steps=2, save_steps=5, eval_strategy="steps",
                         eval_steps=5, per_device_train_batch_size=16, report_to={trackers!r},
                         strict_integrations=True, run_name="canary-run",
                         extra={{"hub_token": canary, "db_password": canary}})
trainer = Trainer(make_model(), args, train_dataset=train, eval_dataset=evaluation, compute_metrics=accuracy,
                  callbacks={callbacks})
trainer.train()
trainer.save_model(os.path.join(out, "final"))
ml = next(c for c in trainer.callback_handler.callbacks if getattr(c, "integration_name", "") == "mlflow")
names = sorted(c.integration_name for c in trainer.callback_handler.callbacks if getattr(c, "integration_name", ""))
print("RESULT " + json.dumps({{"mlflow_run_id": ml.state()["attributes"]["_resume_run_id"],
                              "steps": trainer.state.global_step, "integrations": names}}))
"""

CLEARML_CONF = """
api { api_server: "%(host)s", web_server: "%(host)s", files_server: "%(host)s" }
sdk { development { report_use_subprocess: false, vcs_repo_detect_async: false } }
"""
NOWHERE = "http://127.0.0.1:9"


def _wandb_payload(data: bytes) -> bytes:
    """The record bytes of a W&B transaction log without its 32 KiB block framing (a string may span blocks)."""
    out, pos, block = bytearray(), 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length = struct.unpack("<H", data[pos + 4 : pos + 6])[0]
        out += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
    return bytes(out)


def _blob_hits(needle: bytes, name: str, data: bytes, depth: int = 0) -> list[str]:
    hits = [name] if needle in data else []
    if name.endswith(".wandb") and needle in _wandb_payload(data):
        hits = [name]
    if depth < 3 and data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    hits += _blob_hits(needle, f"{name}!{member}", archive.read(member), depth + 1)
        except (zipfile.BadZipFile, OSError, RuntimeError):
            pass
    if depth < 3 and data[:2] == b"\x1f\x8b":
        try:
            hits += _blob_hits(needle, f"{name}!gunzip", gzip.decompress(data), depth + 1)
        except (OSError, EOFError):
            pass
    return hits


def scan_tree(needle: bytes, root: str, skip: list[str] = ()) -> tuple[int, list[str]]:
    """(files scanned, paths holding ``needle``), looking inside zip and gzip files and W&B logs too."""
    count, hits = 0, []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            count += 1
            with open(path, "rb") as f:
                hits += _blob_hits(needle, os.path.relpath(path, root), f.read())
    return count, hits


def _scanner_control(work: str) -> tuple[str, bool, str]:
    """The scanner must find a planted canary in a zip, a gzip and across a W&B block boundary."""
    canary = b"canary-" + secrets.token_hex(8).encode()
    folder = os.path.join(work, "control")
    os.makedirs(folder)
    with zipfile.ZipFile(os.path.join(folder, "a.zip"), "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("inner.json", b'{"k": "' + canary + b'"}')
    with open(os.path.join(folder, "b.gz"), "wb") as f:
        f.write(gzip.compress(canary))
    record = b"x" * (32768 - 7 - 7 - 10) + canary  # the record crosses into the second block
    first = record[: 32768 - 14]
    framed = b":W&B\x00\x00\x00" + struct.pack("<IHB", 0, len(first), 2) + first
    rest = record[len(first):]
    framed += struct.pack("<IHB", 0, len(rest), 4) + rest
    with open(os.path.join(folder, "run-x.wandb"), "wb") as f:
        f.write(framed)
    count, hits = scan_tree(canary, folder)
    held = len(hits) == 3 and canary not in framed
    return ("scanner control: finds a planted canary in zip, gzip, split W&B record", held, f"{hits}")


def _mlflow_root(uri: str, run_id: str) -> str | None:
    """The server's storage folder, from the run's local artifact location (sqlite DB beside ``artifacts/``)."""
    import mlflow

    artifact_uri = mlflow.MlflowClient(uri).get_run(run_id).info.artifact_uri
    path = artifact_uri.removeprefix("file://")
    if os.sep + "artifacts" + os.sep not in path:
        return None
    root = path.split(os.sep + "artifacts" + os.sep)[0]
    return root if os.path.isfile(os.path.join(root, "mlflow.db")) else None


def canary_trials(mlflow_uri: str, mlflow_root: str | None = None,
                  report_to_all: bool = False) -> list[tuple[str, bool, str]]:
    """R6: one training with every offline-capable tracker on, artifacts on, a canary in every credential variable
    and in the arguments; the canary must appear in no file written anywhere and in no output.
    With ``report_to_all`` the trackers come from report_to="all", which must pick exactly those eight."""
    canary = "canary-" + secrets.token_hex(12)
    needle = canary.encode()
    results = []
    with tempfile.TemporaryDirectory() as work:
        results.append(_scanner_control(work))
        run = os.path.join(work, "run")
        dirs = {k: os.path.join(run, k) for k in ("home", "tmp", "wandb", "comet", "clearml-cache", "out")}
        for d in dirs.values():
            os.makedirs(d)
        conf = os.path.join(run, "clearml.conf")  # written by this test; it holds no credential
        with open(conf, "w") as f:
            f.write(CLEARML_CONF % {"host": NOWHERE})
        script = os.path.join(work, "train_canary.py")
        with open(script, "w") as f:
            f.write(CANARY_SCRIPT.format(
                root=ROOT, trackers="all" if report_to_all else CANARY_TRACKERS,
                callbacks="[]" if report_to_all else '[NeptuneCallback(log_checkpoints="same")]'))
        # TRAINS_* too: ClearML sets TRAINS_PROC_MASTER_ID besides CLEARML_PROC_MASTER_ID in a process that used it
        # (an earlier test), and a child inheriting it takes itself for that task's subprocess
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_", "COMET_", "NEPTUNE_",
                                                                         "CLEARML_", "TRAINS_", "DAGSHUB_", "HF_"))}
        env.update({name: canary for name in CANARY_ENV})
        env.update(
            PYTHONPATH=ROOT, HOME=dirs["home"], TMPDIR=dirs["tmp"], OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
            MLFLOW_TRACKING_URI=mlflow_uri, MLFLOW_EXPERIMENT_NAME="canary", HF_MLFLOW_LOG_ARTIFACTS="true",
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10", MLFLOW_DISABLE_TELEMETRY="true",
            DO_NOT_TRACK="true",
            WANDB_MODE="offline", WANDB_SILENT="true", WANDB_LOG_MODEL="checkpoint", WANDB_DIR=dirs["wandb"],
            WANDB_CACHE_DIR=dirs["wandb"], WANDB_CONFIG_DIR=dirs["wandb"], WANDB_DATA_DIR=dirs["wandb"],
            WANDB_ARTIFACT_DIR=dirs["wandb"],
            COMET_MODE="offline", COMET_OFFLINE_DIRECTORY=dirs["comet"], COMET_PROJECT_NAME="canary",
            COMET_LOG_ASSETS="true", COMET_DISABLE_AUTO_LOGGING="1", COMET_DISPLAY_SUMMARY_LEVEL="0",
            NEPTUNE_MODE="offline", NEPTUNE_PROJECT="flytrain/canary",
            CLEARML_CONFIG_FILE=conf, CLEARML_CACHE_DIR=dirs["clearml-cache"], CLEARML_OFFLINE_MODE="1",
            CLEARML_API_HOST=NOWHERE, CLEARML_WEB_HOST=NOWHERE, CLEARML_FILES_HOST=NOWHERE,
            CLEARML_LOG_MODEL="true", CLEARML_PROJECT="canary", CLEARML_TASK="canary",
            CODECARBON_COUNTRY="fra",
        )
        for name in ("AUTO_LOG_CO2", "AUTO_LOG_ENV_DETAILS", "AUTO_LOG_GIT_METADATA", "AUTO_LOG_GIT_PATCH",
                     "AUTO_LOG_CODE", "AUTO_LOG_CLI_ARGUMENTS", "ERROR_TRACKING_ENABLE", "AUTO_LOG_GRAPH"):
            env[f"COMET_{name}"] = "false"
        start = time.monotonic()
        proc = subprocess.run([sys.executable, script, dirs["out"]], cwd=run, env=env, capture_output=True,
                              timeout=600)
        seconds = time.monotonic() - start
        stdout, stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        result = next((json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")), None)
        if proc.returncode != 0 or result is None or result["steps"] != 10:
            return results + [("training with 8 trackers at once", False,
                                f"rc={proc.returncode}: {stderr[-1500:]}")]
        results.append(("training with 8 trackers at once", True, f"{seconds:.0f} s, strict_integrations"))
        if report_to_all:
            expected = sorted(CANARY_TRACKERS + ["neptune"])
            results.append(('report_to="all" picks every installed tracker', result["integrations"] == expected,
                            f"got {result['integrations']}, expected {expected}"))

        # every file under the run's cwd (which holds HOME, TMPDIR and every tracker folder), grouped by tracker
        groups = {
            "output_dir (checkpoints, final model, TensorBoard, DVCLive, CodeCarbon, Neptune copies)": dirs["out"],
            "W&B offline run dir": dirs["wandb"],
            "Comet offline archives (unzipped)": dirs["comet"],
            "Neptune .neptune": os.path.join(run, ".neptune"),
            "ClearML cache (offline session, artifacts)": dirs["clearml-cache"],
            "anything else in the run's cwd, HOME, TMPDIR": run,
        }
        written = {
            "output_dir (checkpoints, final model, TensorBoard, DVCLive, CodeCarbon, Neptune copies)":
                {"checkpoint-5", "checkpoint-10", "final", "runs", "dvclive", "emissions.csv"}
                <= set(os.listdir(dirs["out"])),
            "W&B offline run dir": bool(_glob(dirs["wandb"], ".wandb")),
            "Comet offline archives (unzipped)": bool(_glob(dirs["comet"], ".zip")),
            "Neptune .neptune": bool(_glob(groups["Neptune .neptune"], ".log")),
            "ClearML cache (offline session, artifacts)": bool(_glob(dirs["clearml-cache"], "task.json")),
            "anything else in the run's cwd, HOME, TMPDIR": True,
        }
        for case, folder in groups.items():
            inner = [f for f in groups.values() if f != folder and f.startswith(folder + os.sep)]
            count, hits = scan_tree(needle, folder, skip=inner)
            redacted = scan_tree(REDACTED.encode(), folder, skip=inner)[1] if folder != run else ["-"]
            problems = [f"canary in {hits[:8]}"] if hits else []
            if not written[case]:
                problems.append("the tracker wrote nothing to check")
            if not redacted:
                problems.append("no redacted argument found: were the arguments logged at all?")
            results.append((case, not problems, "; ".join(problems) or
                            f"{count} files, no canary" + (f"; {REDACTED} in {len(redacted)}" if folder != run
                                                          else "")))
        root = mlflow_root or _mlflow_root(mlflow_uri, result["mlflow_run_id"])
        if root is None:
            results.append(("MLflow server store (sqlite DB, artifact root, server log)", False,
                            "could not locate the server's storage"))
        else:
            count, hits = scan_tree(needle, root)
            artifacts = _glob(root, "trainer_state.json")
            redacted = scan_tree(REDACTED.encode(), root)[1]
            problems = [f"canary in {hits[:8]}"] if hits else []
            if not artifacts or not redacted:
                problems.append(f"{len(artifacts)} checkpoint artifacts, {REDACTED} in {len(redacted)} files")
            results.append(("MLflow server store (sqlite DB, artifact root, server log)", not problems,
                            "; ".join(problems) or f"{count} files, {len(artifacts)} checkpoint artifacts, "
                            f"no canary; {REDACTED} in {len(redacted)}"))
        hits = [n for n, text in (("stdout", stdout), ("stderr with DEBUG log records", stderr)) if canary in text]
        results.append(("captured stdout, stderr and DEBUG log records", not hits,
                        f"{len(stdout) + len(stderr)} chars, no canary" if not hits else f"canary in {hits}"))
    return results


def _glob(root: str, suffix: str) -> list[str]:
    return [os.path.join(d, n) for d, _, files in os.walk(root) for n in files if n.endswith(suffix)]


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
