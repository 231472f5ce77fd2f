"""R6: a canary secret in every credential variable, in the arguments (nested, in URLs, under key names like
``private_key``), in the model's config and in the MLflow URI's password appears in no file written anywhere, no
tracker store and no output. Trackers run with the product's default settings (only modes and folders are set: offline,
under the test's folder); every archive found is opened, and one that cannot be opened fails the scan.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import secrets
import struct
import subprocess
import sys
import tempfile
import time
import zipfile

from trainer_lib.redaction import REDACTED

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
                         extra={{"hub_token": canary, "db_password": canary, "private_key": canary, "ssh_key": canary,
                                "auth": {{"user": "canary-user", "password": canary}},
                                "warehouse": f"postgresql://reader:{{canary}}@db.example/features"}})
model = make_model()
model.config.update(auth_token=canary, connection={{"dsn": canary}},
                    source=f"https://reader:{{canary}}@data.example/set.csv")
trainer = Trainer(model, args, train_dataset=train, eval_dataset=evaluation, compute_metrics=accuracy,
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


#: what _blob_hits reports for an archive it could not open (the scan then fails: it cannot vouch for it)
UNREADABLE = "UNREADABLE "


def _blob_hits(needle: bytes, name: str, data: bytes, depth: int = 0) -> list[str]:
    """Where ``needle`` is in ``data`` (a file's bytes), inside zip/gzip members too; unopenable archives listed."""
    hits = [name] if needle in data else []
    if name.endswith(".wandb") and needle in _wandb_payload(data):
        hits = [name]
    if depth < 3 and data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    hits += _blob_hits(needle, f"{name}!{member}", archive.read(member), depth + 1)
        except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, NotImplementedError) as error:
            hits.append(f"{UNREADABLE}{name} ({type(error).__name__}: {error})")
    if depth < 3 and data[:2] == b"\x1f\x8b":
        try:
            hits += _blob_hits(needle, f"{name}!gunzip", gzip.decompress(data), depth + 1)
        except (OSError, EOFError) as error:
            hits.append(f"{UNREADABLE}{name} ({type(error).__name__}: {error})")
    return hits


def scan_tree(needle: bytes, root: str, skip: list[str] = ()) -> tuple[int, list[str]]:
    """(files scanned, paths holding ``needle`` or archives that could not be opened), looking inside zip and gzip
    files and W&B logs too."""
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


def _scanner_control(work: str) -> tuple[bool, str]:
    """The scanner must find a planted canary in a zip, a gzip and across a W&B block boundary, and report a damaged
    archive. A precondition of R6 (not a row of its own): if it fails, the whole figure fails."""
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
    with open(os.path.join(folder, "broken.zip"), "wb") as f:
        f.write(b"PK\x03\x04" + b"\x00" * 40)  # a zip header and nothing behind it
    count, hits = scan_tree(canary, folder)
    unreadable = [h for h in hits if h.startswith(UNREADABLE)]
    found = sorted(h for h in hits if not h.startswith(UNREADABLE))
    held = found == ["a.zip!inner.json", "b.gz!gunzip", "run-x.wandb"] and len(unreadable) == 1 \
        and canary not in framed
    return held, f"{hits}"


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
    """One training with every offline-capable tracker on, artifacts on, a canary in every credential variable
    and in the arguments; the canary must appear in no file written anywhere and in no output.
    With ``report_to_all`` the trackers come from report_to="all", which must pick exactly those eight."""
    canary = "canary-" + secrets.token_hex(12)
    needle = canary.encode()
    results = []
    with tempfile.TemporaryDirectory() as work:
        control, detail = _scanner_control(work)
        if not control:
            return [("the scanner finds planted canaries and reports damaged archives", False, detail)]
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
            # the password of the URI's userinfo is the canary too (the server has no auth and ignores it)
            MLFLOW_TRACKING_URI=mlflow_uri.replace("://", f"://canary-user:{canary}@", 1),
            MLFLOW_EXPERIMENT_NAME="canary", HF_MLFLOW_LOG_ARTIFACTS="true",
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10", MLFLOW_DISABLE_TELEMETRY="true",
            DO_NOT_TRACK="true",
            WANDB_MODE="offline", WANDB_LOG_MODEL="checkpoint", WANDB_DIR=dirs["wandb"],
            WANDB_CACHE_DIR=dirs["wandb"], WANDB_CONFIG_DIR=dirs["wandb"], WANDB_DATA_DIR=dirs["wandb"],
            WANDB_ARTIFACT_DIR=dirs["wandb"],
            COMET_MODE="offline", COMET_OFFLINE_DIRECTORY=dirs["comet"], COMET_PROJECT_NAME="canary",
            COMET_LOG_ASSETS="true",
            NEPTUNE_MODE="offline", NEPTUNE_PROJECT="flytrain/canary",
            CLEARML_CONFIG_FILE=conf, CLEARML_CACHE_DIR=dirs["clearml-cache"], CLEARML_OFFLINE_MODE="1",
            CLEARML_API_HOST=NOWHERE, CLEARML_WEB_HOST=NOWHERE, CLEARML_FILES_HOST=NOWHERE,
            CLEARML_LOG_MODEL="true", CLEARML_PROJECT="canary", CLEARML_TASK="canary",
            CODECARBON_COUNTRY="fra",
        )
        start = time.monotonic()
        proc = subprocess.run([sys.executable, script, dirs["out"]], cwd=run, env=env, capture_output=True,
                              timeout=600)
        seconds = time.monotonic() - start
        stdout, stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        result = next((json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")), None)
        if proc.returncode != 0 or result is None or result["steps"] != 10:  # no row can hold without the run
            return [("training with 8 trackers at once", False, f"rc={proc.returncode}: {stderr[-1500:]}")]
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
            redacted = _found(scan_tree(REDACTED.encode(), folder, skip=inner)[1]) if folder != run else ["-"]
            problems = [f"canary in or unreadable: {hits[:8]}"] if hits else []
            if not written[case]:
                problems.append("the tracker wrote nothing to check")
            if not redacted:
                problems.append("no redacted argument found: were the arguments logged at all?")
            results.append((case, not problems, "; ".join(problems) or
                            f"{count} files, no canary" + (f"; {REDACTED} in {len(redacted)}" if folder != run
                                                          else "") + (f" ({seconds:.0f} s training)"
                                                                      if folder == dirs["out"] else "")))
        root = mlflow_root or _mlflow_root(mlflow_uri, result["mlflow_run_id"])
        if root is None:
            results.append(("MLflow server store (sqlite DB, artifact root, server log)", False,
                            "could not locate the server's storage"))
        else:
            count, hits = scan_tree(needle, root)
            artifacts = _glob(root, "trainer_state.json")
            redacted = _found(scan_tree(REDACTED.encode(), root)[1])
            problems = [f"canary in or unreadable: {hits[:8]}"] if hits else []
            if not artifacts or not redacted:
                problems.append(f"{len(artifacts)} checkpoint artifacts, {REDACTED} in {len(redacted)} files")
            results.append(("MLflow server store (sqlite DB, artifact root, server log)", not problems,
                            "; ".join(problems) or f"{count} files, {len(artifacts)} checkpoint artifacts, "
                            f"no canary; {REDACTED} in {len(redacted)}"))
        hits = [n for n, text in (("stdout", stdout), ("stderr with DEBUG log records", stderr)) if canary in text]
        results.append(("captured stdout, stderr and DEBUG log records", not hits,
                        f"{len(stdout) + len(stderr)} chars, no canary" if not hits else f"canary in {hits}"))
    return results


def _found(hits: list[str]) -> list[str]:
    return [h for h in hits if not h.startswith(UNREADABLE)]


def _glob(root: str, suffix: str) -> list[str]:
    return [os.path.join(d, n) for d, _, files in os.walk(root) for n in files if n.endswith(suffix)]
