"""What a user sees: a live bar on a terminal, compact lines elsewhere, and notices when a run resumes, stops early
or is interrupted (real subprocesses, a real pseudo-terminal, real signals)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

from tests.flyte_helpers import BIN, complete_checkpoint, flyte_env, run_until
from tests.helpers import accuracy, digits, make_model
from trainer_lib import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from trainer_lib.checkpoint import checkpoint_step, list_checkpoints
from trainer_lib.console import format_log_line
from workflows import pipeline
from workflows.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
TIMING = re.compile(r"runtime|per_second|total_flos")

#: a small training that logs and evaluates (90 steps of a tiny MLP)
SMALL_TRAINING = r"""
import sys
from tests.flyte_helpers import BIN, complete_checkpoint, flyte_env, run_until
from tests.helpers import accuracy, digits, make_model
from trainer_lib import Trainer, TrainingArguments

train, val = digits(256, 64)
args = TrainingArguments(output_dir=sys.argv[1], max_steps=90, per_device_train_batch_size=16, learning_rate=1e-2,
                         logging_steps=30, eval_strategy="steps", eval_steps=30, save_strategy="no")
Trainer(make_model(), args, train_dataset=train, eval_dataset=val, compute_metrics=accuracy).train()
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("FLYTRAIN_PROGRESS", None)
    env.update(extra)
    return env


def run_in_terminal(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a 120-column pseudo-terminal; returns (status, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


@pytest.fixture(autouse=True)
def _progress_setting_from_the_test_only(monkeypatch):
    monkeypatch.delenv("FLYTRAIN_PROGRESS", raising=False)


def log_lines(text: str) -> list[str]:
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # the cursor moves of a redrawn bar
    return [line for line in re.split(r"[\r\n]+", text) if line.startswith("step ")]


def heads(lines: list[str]) -> list[str]:
    """The ``step N/M`` that leads each console line."""
    return [re.match(r"step +\d+/\d+", line).group() for line in lines]


def test_console_line_shows_step_epoch_and_grouped_metrics_without_timing_keys():
    logs = {"eval_loss": 0.123456789, "eval_accuracy": 0.974074074, "eval_runtime": 0.0123,
            "eval_samples_per_second": 135235.5, "eval_steps_per_second": 1000.25, "epoch": 3.0}
    assert format_log_line(logs, 120, 1200) == "step  120/1200  epoch 3.00  eval: loss 0.1235  accuracy 0.9741"
    train = {"loss": 0.05894123, "grad_norm": 0.46851, "learning_rate": 0.000833333, "epoch": 5.0}
    assert format_log_line(train, 200, 1200) == (
        "step  200/1200  epoch 5.00  loss 0.05894  grad_norm 0.4685  learning_rate 0.0008333")
    summary = {"train_runtime": 4.2, "train_samples_per_second": 9000.1, "train_steps_per_second": 280.0,
               "total_flos": 0.0, "train_loss": 0.0746, "epoch": 30.0}
    assert format_log_line(summary, 1200, 1200) == "step 1200/1200  epoch 30.00  train: loss 0.0746"


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_default_job_prints_one_short_line_per_log_event_without_a_terminal(tmp_path, capsys):
    config = PipelineConfig()
    pipeline.prepare(config, str(tmp_path / "data"))
    # the default job itself (1200 steps), stopped after two epochs: two evaluations, two train logs, the summary
    pipeline.train(config, str(tmp_path / "data"), str(tmp_path / "ckpt"), str(tmp_path / "model"),
                   callbacks=[StopAt(80)])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert heads(lines) == [
        "step    1/1200", "step   40/1200", "step   50/1200", "step   80/1200", "step   80/1200"], out
    assert all(len(line) <= 120 for line in lines), out
    assert not any(TIMING.search(line) for line in lines), out
    assert "eval: loss" in lines[1] and "accuracy" in lines[1]
    assert "train: loss" in lines[-1] and "grad_norm" in lines[2] and "epoch 1.25" in lines[2]
    assert "\r" not in out + err and "step/s" not in err  # no bar without a terminal


@pytest.mark.parametrize("terminal, progress", [(True, None), (False, None), (True, "0")])
def test_progress_bar_drawn_only_on_a_terminal(tmp_path, terminal, progress):
    argv = [sys.executable, "-c", SMALL_TRAINING, str(tmp_path / "out")]
    env = _env(**({"FLYTRAIN_PROGRESS": progress} if progress else {}))
    if terminal:
        status, output = run_in_terminal(argv, env, tmp_path)
    else:
        done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True)
        status, output = done.returncode, done.stdout + done.stderr
    assert status == 0, output
    bar = re.search(r"train: +100%\|.*\| 90/90 \[.*step/s, loss=[0-9.]+, lr=", output)
    if terminal and progress is None:
        assert bar, output
        assert re.search(r"eval: .*batch", output), output  # the evaluation bar
    else:
        assert bar is None and "step/s" not in output, output
    lines = log_lines(output)
    assert heads(lines) == ["step 30/90"] * 2 + ["step 60/90"] * 2 + ["step 90/90"] * 3
    assert not any(TIMING.search(line) for line in lines)


def test_bad_progress_setting_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYTRAIN_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="FLYTRAIN_PROGRESS='sometimes'"):
        Trainer(make_model(), TrainingArguments(output_dir=str(tmp_path)))


def test_a_resumed_training_says_where_it_resumes(tmp_path, capsys):
    train, val = digits(256, 64)

    def trainer(*callbacks):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=16,
                                 save_steps=30, logging_steps=1000, learning_rate=1e-2)
        return Trainer(make_model(), args, train_dataset=train, callbacks=list(callbacks))

    trainer(StopAt(30)).train()
    assert "resuming" not in capsys.readouterr().err
    trainer().train(resume_from_checkpoint=True)
    err = capsys.readouterr().err
    # 16 steps per epoch: step 30 is epoch 1.875
    assert "resuming from checkpoint-30 (step 30 of 60, epoch 1.88)\n" in err, err


def test_early_stopping_says_at_which_step_and_why(tmp_path, capsys):
    train, val = digits(256, 64)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=300, per_device_train_batch_size=16,
                             eval_strategy="steps", eval_steps=20, save_strategy="no", logging_steps=1000,
                             metric_for_best_model="accuracy", learning_rate=1e-2)
    # an improvement must beat the best by more than 10: none does, so the second evaluation exhausts patience 1
    stopper = EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0)
    trainer = Trainer(make_model(), args, train_dataset=train, eval_dataset=val, compute_metrics=accuracy,
                      callbacks=[stopper])
    trainer.train()
    assert trainer.state.global_step == 40
    notices = [line for line in capsys.readouterr().err.splitlines() if "stopped early" in line]
    assert notices == ["stopped early at step 40 (patience exhausted: eval_accuracy did not improve for "
                       "1 evaluations)"]


def _start_training(workdir: Path) -> tuple[subprocess.Popen, Path]:
    err = workdir / f"stderr-{len(list(workdir.glob('stderr-*')))}.txt"
    argv = [sys.executable, "-m", "workflows", "--params", str(workdir / "params.yaml"), "train", "--data-dir",
            str(workdir / "data"), "--checkpoint-dir", str(workdir / "ckpt"), "--model-dir", str(workdir / "model")]
    with open(err, "w") as stderr:
        proc = subprocess.Popen(argv, cwd=workdir, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    return proc, err


def _wait_for_checkpoint_after(proc: subprocess.Popen, folder: Path, step: int, log: Path) -> None:
    """Wait (no time limit: the event decides) until a checkpoint beyond ``step`` is complete."""
    while not any(checkpoint_step(p) > step for p in list_checkpoints(str(folder))):
        assert proc.poll() is None, log.read_text()
        time.sleep(0.02)


def test_ctrl_c_and_sigterm_stop_with_one_notice_and_the_same_command_resumes(tmp_path):
    config = PipelineConfig.from_dict({
        "model": {"hidden_sizes": [32]},
        "training": {"max_steps": 100000, "per_device_train_batch_size": 16, "logging_steps": 100000,
                     "eval_strategy": "no", "save_strategy": "steps", "save_steps": 50},
    })
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(config.to_dict()))
    pipeline.prepare(config, str(tmp_path / "data"))
    expected = r"interrupted at step (\d+) of 100000; checkpoint-(\d+) kept; run the same command to continue"

    kept = -1
    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        proc, log = _start_training(tmp_path)
        _wait_for_checkpoint_after(proc, tmp_path / "ckpt", kept, log)
        proc.send_signal(signum)
        assert proc.wait() == status, log.read_text()
        lines = log.read_text().splitlines()
        if kept >= 0:  # the second run resumed the first one's checkpoint and said so first
            assert re.fullmatch(rf"resuming from checkpoint-{kept} \(step {kept} of 100000, epoch [0-9.]+\)",
                                lines.pop(0)), lines
        assert len(lines) == 1, lines  # one notice, no traceback
        step, kept = map(int, re.fullmatch(expected, lines[0]).groups())
        assert kept <= step and (tmp_path / "ckpt" / f"checkpoint-{kept}").is_dir()
    assert not (tmp_path / "model").exists()


def test_sigterm_of_pyflyte_run_prints_a_few_lines_and_the_same_command_resumes(tmp_path):
    """`kill -TERM` of a local `pyflyte run … --workdir DIR`: the notice, exit 143; started again, it resumes."""
    config = {"model": {"hidden_sizes": [16]},
              "training": {"max_steps": 100000, "logging_steps": 100000, "eval_strategy": "no",
                           "save_strategy": "steps", "save_steps": 50}}
    checkpoints = tmp_path / "work" / "checkpoints"
    cmd = [os.path.join(BIN, "pyflyte"), "run", "workflows/training.py", "training_workflow",
           "--config", json.dumps(config), "--workdir", str(tmp_path / "work")]
    expected = r"interrupted at step (\d+) of 100000; (checkpoint-\d+) kept; run the same command to continue"

    kept = None
    for attempt in ("first", "second"):
        def newer(previous=kept) -> bool:  # the event decides when to signal: a checkpoint this run wrote
            found = complete_checkpoint(str(checkpoints))
            return found is not None and os.path.basename(found) != previous

        done = run_until(cmd, flyte_env(tmp_path), str(tmp_path / attempt), newer, sig=signal.SIGTERM)
        output = done.stdout + done.stderr
        assert done.signalled and done.returncode == 143, output[-3000:]
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) <= 15 and "Traceback" not in output, output[-3000:]
        notices = [re.fullmatch(expected, line) for line in lines if line.startswith("interrupted")]
        assert len(notices) == 1 and notices[0], lines
        if kept:  # the same command continued from the checkpoint the first run kept, and said so
            assert any(re.search(rf"resuming from \S+/{kept}\b", line) for line in lines), lines
        step, kept = int(notices[0].group(1)), notices[0].group(2)
        assert (checkpoints / kept).is_dir() and int(kept.split("-")[1]) <= step


class CountingStream:
    """stdout that records each write (a console capture such as W&B's sends one record per write)."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return False


def _train_logging_every_step(tmp_path, steps=40):
    train, _ = digits(256, 64)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=16,
                             logging_steps=1, save_strategy="no", learning_rate=1e-2)
    trainer = Trainer(make_model(), args, train_dataset=train)
    trainer.train()
    return trainer


@pytest.mark.parametrize("interval, most_writes", [("3600", 2), ("0", None)])
def test_fast_log_lines_are_written_together(tmp_path, monkeypatch, interval, most_writes):
    """Without a bar, lines that come faster than FLYTRAIN_LOG_LINE_INTERVAL share one write: the first at once,
    the rest when the interval has passed or at the end; every line, in order. 0 writes each line at once."""
    monkeypatch.setenv("FLYTRAIN_LOG_LINE_INTERVAL", interval)
    stream = CountingStream()
    monkeypatch.setattr(sys, "stdout", stream)
    _train_logging_every_step(tmp_path)
    text = "".join(stream.writes)
    assert heads(text.splitlines()) == [f"step {s:>2}/40" for s in range(1, 41)] + ["step 40/40"]
    assert all(write.endswith("\n") for write in stream.writes)
    if most_writes is None:
        assert len(stream.writes) == 41  # one per line
    else:
        assert stream.writes[0].startswith("step  1/40") and stream.writes[0].count("\n") == 1  # at once
        assert len(stream.writes) <= most_writes


@pytest.mark.parametrize("interval, most_writes", [("3600", 2), ("0", None)])
def test_fast_log_lines_above_a_bar_are_written_together(tmp_path, monkeypatch, interval, most_writes):
    """With a bar each line written above it clears and redraws the bar: lines that come faster than the interval
    share one write there too; every line, in order, and the bar still counts every step."""
    monkeypatch.setenv("FLYTRAIN_LOG_LINE_INTERVAL", interval)
    monkeypatch.setenv("FLYTRAIN_PROGRESS", "1")
    stream, bar = CountingStream(), CountingStream()
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setattr(sys, "stderr", bar)
    _train_logging_every_step(tmp_path)
    text = "".join(stream.writes)
    assert heads(text.splitlines()) == [f"step {s:>2}/40" for s in range(1, 41)] + ["step 40/40"]
    batches = [w for w in stream.writes if w.strip()]  # tqdm.write sends the text, then its line end
    if most_writes is None:
        assert len(batches) == 41
    else:
        assert batches[0].startswith("step  1/40") and batches[0].count("\n") == 0  # the first line at once
        assert len(batches) <= most_writes
    assert "40/40" in "".join(bar.writes)


def test_held_log_lines_are_written_when_the_interval_passes_without_another_line(monkeypatch):
    """A training that goes quiet (a long evaluation, a hang) still shows its last lines: a timer writes them."""
    from trainer_lib.console import LineWriter

    stream = CountingStream()
    monkeypatch.setattr(sys, "stdout", stream)
    lines = LineWriter(0.3)
    lines.write("first")
    lines.write("second")
    lines.write("third")
    assert stream.writes == ["first\n"]
    deadline = time.monotonic() + 30
    while len(stream.writes) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.writes == ["first\n", "second\nthird\n"]
    lines.flush()
    assert len(stream.writes) == 2  # nothing held, nothing written twice


@pytest.mark.parametrize("raw", ["soon", "-1", "nan", "7200"])
def test_bad_log_line_interval_names_the_variable(tmp_path, monkeypatch, raw):
    monkeypatch.setenv("FLYTRAIN_LOG_LINE_INTERVAL", raw)
    with pytest.raises(ValueError, match=f"FLYTRAIN_LOG_LINE_INTERVAL={raw!r}: expected a number of seconds"):
        Trainer(make_model(), TrainingArguments(output_dir=str(tmp_path)))
