"""Run the Flyte entry point the way pyflyte and a cluster do, on local folders: no mocks, real flytekit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainer_lib import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
RESOLVER = "flytekit.core.python_auto_container.default_task_resolver"


def flyte_env(tmp_path, **extra: str) -> dict[str, str]:
    """Environment of a pyflyte subprocess: temp files under ``tmp_path``, no local cache, no docker, one thread."""
    tmp = os.path.join(str(tmp_path), "tmp")
    os.makedirs(tmp, exist_ok=True)
    env = dict(os.environ)
    env.update(
        TMPDIR=tmp,
        HOME=str(tmp_path),  # flytekit's local cache and config live under ~/.flyte
        FLYTE_LOCAL_CACHE_ENABLED="false",
        DOCKER_HOST="unix:///nonexistent/docker.sock",  # an ImageSpec must never build or pull in a test
        FLYTRAIN_REGISTRY="localhost:30000",
        OMP_NUM_THREADS="1",  # the in-process reference run uses one thread too: identical float reductions
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def pyflyte_run(tmp_path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, str, list[str]]:
    """``pyflyte run`` of the training workflow: the process, its output, and the lines not only box drawing."""
    proc = subprocess.run(
        [os.path.join(BIN, "pyflyte"), "run", "workflows/training.py", "training_workflow", *args],
        cwd=REPO, env=flyte_env(tmp_path, PYTHONPATH=REPO, COLUMNS="100", **env), capture_output=True, text=True,
        timeout=280,
    )
    output = proc.stdout + proc.stderr
    return proc, output, [line for line in output.splitlines() if line.strip(" │╭╮╰╯─")]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    signalled: bool = False


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def run(cmd: list[str], env: dict[str, str], log_dir: str, timeout: float = 400) -> Finished:
    return run_until(cmd, env, log_dir, None, timeout=timeout)


def run_until(
    cmd: list[str],
    env: dict[str, str],
    log_dir: str,
    ready: Callable[[], bool] | None,
    sig: int = signal.SIGKILL,
    timeout: float = 400,
) -> Finished:
    """Run ``cmd``; when ``ready()`` turns true, send ``sig`` and wait for the process to end."""
    os.makedirs(log_dir, exist_ok=True)
    out, err = os.path.join(log_dir, "stdout.txt"), os.path.join(log_dir, "stderr.txt")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
        signalled = False
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{cmd[:3]} ran longer than {timeout} s; stderr:\n{_read(err)[-3000:]}")
                if ready is not None and not signalled and ready():
                    proc.send_signal(sig)
                    signalled = True
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Finished(proc.returncode, _read(out), _read(err), signalled)


def complete_checkpoint(folder: str) -> str | None:
    """The newest checkpoint folder in ``folder`` whose manifest and checksums are all good (quietly)."""
    for path in reversed(ckpt.list_checkpoints(folder)):
        try:
            ckpt.validate_checkpoint(path)
        except (ckpt.CheckpointError, OSError):
            continue
        return path
    return None


def write_inputs(path: str, values: dict[str, Any], types: dict[str, Any]) -> str:
    """Convert Python inputs to a Flyte LiteralMap with flytekit's TypeEngine and write its protobuf to ``path``."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine

    literal_map = TypeEngine.dict_to_literal_map(FlyteContextManager.current_context(), values, type_hints=types)
    with open(path, "wb") as f:
        f.write(literal_map.to_flyte_idl().SerializeToString())
    return path


def execute_command(root: str, name: str, task: str, checkpoint: str, prev_checkpoint: str) -> list[str]:
    """The command a Flyte cluster runs for one attempt of ``workflows.training.<task>``; files under ``root``."""
    return [
        os.path.join(BIN, "pyflyte-execute"),
        "--inputs", os.path.join(root, "inputs.pb"),
        "--output-prefix", os.path.join(root, name, "out"),
        "--raw-output-data-prefix", os.path.join(root, name, "raw"),
        "--checkpoint-path", checkpoint,
        "--prev-checkpoint", prev_checkpoint,
        "--resolver", RESOLVER,
        "--", "task-module", "workflows.training", "task-name", task,
    ]  # fmt: skip


def read_outputs(output_prefix: str) -> dict[str, Any]:
    """outputs.pb of an attempt: blob URIs (files, folders) or the raw literal, by output name."""
    from flyteidl.core import literals_pb2

    literal_map = literals_pb2.LiteralMap()
    with open(os.path.join(output_prefix, "outputs.pb"), "rb") as f:
        literal_map.ParseFromString(f.read())
    return {
        name: literal.scalar.blob.uri if literal.scalar.HasField("blob") else literal
        for name, literal in literal_map.literals.items()
    }


def read_error(output_prefix: str):
    """The ContainerError in error.pb of an attempt."""
    from flyteidl.core import errors_pb2

    document = errors_pb2.ErrorDocument()
    with open(os.path.join(output_prefix, "error.pb"), "rb") as f:
        document.ParseFromString(f.read())
    return document.error


def find_files(root: str, name: str) -> list[str]:
    return sorted(os.path.join(d, name) for d, _, files in os.walk(root) if name in files)
