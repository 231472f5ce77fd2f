"""kill -9 after a tracker received steps past the last checkpoint, then a resume with another data order (real
subprocesses): TensorBoard hides the killed process's later steps (purge) and shows the resumed ones; MLflow keeps
each step once (the killed process's step 15) and takes the later steps from the resumed process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.trackers.test_mlflow import client_for, experiment  # noqa: F401 (fixture)
from tests.trackers.test_tensorboard import read_events, scalars

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, signal, sys

from tests.helpers import make_trainer
from trainer_lib import TrainerCallback

out, tracker, mode = sys.argv[1], sys.argv[2], sys.argv[3]


class KillAfter15(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if mode == "kill" and state.global_step == 16:
            for cb in trainer.callback_handler.callbacks:
                if hasattr(cb, "flush"):
                    cb.flush()  # step 15 has reached the tracker
            os.kill(os.getpid(), signal.SIGKILL)


settings = dict(eval_strategy="no", shuffled_data=mode == "resume")
trainer = make_trainer(out, report_to=[tracker], callbacks=[KillAfter15()], **settings)
trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-10") if mode == "resume" else None)
with open(os.path.join(out, "resumed_log.json"), "w") as f:
    json.dump(trainer.state.log_history, f)
"""


def _run(tmp_path: Path, tracker: str, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FLYTRAIN_TRACKER_SEND_INTERVAL": "0"}
    return subprocess.run([sys.executable, str(script), str(tmp_path / "out"), tracker, mode], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def _kill(tmp_path: Path, tracker: str) -> None:
    proc = _run(tmp_path, tracker, "kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoint-10").is_dir() and not (tmp_path / "out" / "checkpoint-20").exists()


def _resume(tmp_path: Path, tracker: str) -> dict[int, float]:
    proc = _run(tmp_path, tracker, "resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "resumed_log.json").read_text())
    return {e["step"]: e["loss"] for e in history if "loss" in e}


@pytest.mark.slow
def test_tensorboard_after_kill_9_shows_the_resumed_steps_only(tmp_path):
    _kill(tmp_path, "tensorboard")
    (log_dir,) = (tmp_path / "out" / "runs").iterdir()
    killed = dict(scalars(read_events(str(log_dir)), "train/loss"))
    assert sorted(killed) == [5, 10, 15]
    resumed = _resume(tmp_path, "tensorboard")
    shown = scalars(read_events(str(log_dir)), "train/loss")
    assert [s for s, _ in shown] == [5, 10, 15, 20]
    assert abs(resumed[15] - killed[15]) > 1e-6  # another data order: the purge, not chance, hides the old step 15
    assert dict(shown)[15] == pytest.approx(resumed[15], rel=1e-6)
    assert dict(shown)[20] == pytest.approx(resumed[20], rel=1e-6)


@pytest.mark.slow
def test_mlflow_after_kill_9_logs_each_step_once(experiment, mlflow_server, tmp_path):  # noqa: F811
    _kill(tmp_path, "mlflow")
    client = client_for(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    killed = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(killed) == [5, 10, 15]
    resumed = _resume(tmp_path, "mlflow")
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 20]  # each step once
    logged = {m.step: m.value for m in history}
    assert logged[15] == killed[15]  # already stored by the killed process: kept, not doubled
    assert logged[20] == pytest.approx(resumed[20], rel=1e-6)  # new steps come from the resumed process
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
