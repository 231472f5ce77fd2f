"""Run identity: the fingerprint, resume and rotation by run, the output-folder lock, and the pipeline's marker."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import digits, make_model
from tests.reliability import identity_faults
from trainer_lib import CheckpointError, Trainer, TrainerCallback, TrainingArguments, identity
from trainer_lib.checkpoint import list_checkpoints, load_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_trainer(out, callbacks=None, **overrides) -> Trainer:
    train, _ = digits(128, 0)
    values = dict(output_dir=str(out), per_device_train_batch_size=16, max_steps=10, learning_rate=3e-3,
                  logging_steps=5, save_steps=5, disable_tqdm=True, warmup_steps=2)
    values.update(overrides)
    return Trainer(make_model(), TrainingArguments(**values), train_dataset=train, callbacks=callbacks)


def tree(folder) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with its SHA-256 (what "nothing changed on disk" compares)."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def names(paths) -> list[str]:
    return [os.path.basename(p) for p in paths]


# -- the fingerprint -----------------------------------------------------------------------------------------------
def test_every_training_argument_is_classified_in_or_out_of_the_fingerprint():
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert fields == set(identity.ARGUMENT_ROLES), (
        f"classify {sorted(fields - set(identity.ARGUMENT_ROLES))} in trainer_lib/identity.ARGUMENT_ROLES; "
        f"remove {sorted(set(identity.ARGUMENT_ROLES) - fields)}"
    )
    model = make_model()
    base = identity.fingerprint(model, TrainingArguments(output_dir="a"))
    changed = {"learning_rate": 1e-3, "seed": 7, "gradient_accumulation_steps": 2, "bf16": True, "warmup_ratio": 0.1,
               "lr_scheduler_type": "cosine", "per_device_train_batch_size": 4, "max_grad_norm": 0.5}
    for name, value in changed.items():
        other = identity.fingerprint(model, TrainingArguments(output_dir="a", **{name: value}))
        assert other.digest != base.digest, name
        assert any(line.startswith(f"{name}: ") for line in identity.differences(base, other)), name
    same = {"output_dir": "b", "max_steps": 99, "num_train_epochs": 9.0, "logging_steps": 3, "save_steps": 7,
            "report_to": "tensorboard", "dataloader_num_workers": 2, "eval_strategy": "epoch", "save_total_limit": 1,
            "async_checkpointing": True, "data_seed": 42}
    for name, value in same.items():
        args = TrainingArguments(**{"output_dir": "a", name: value})
        assert identity.fingerprint(model, args).digest == base.digest, name
    assert identity.fingerprint(make_model(hidden=16), TrainingArguments(output_dir="a")).digest != base.digest
    extra = identity.fingerprint(model, TrainingArguments(output_dir="a"), extra={"training_data": "abc"})
    assert extra.digest != base.digest


# -- resume and rotation by run (plain API) ---------------------------------------------------------------------
def test_an_old_runs_checkpoints_are_neither_resumed_nor_rotated_by_a_new_run(tmp_path, caplog):
    out = tmp_path / "out"
    # a schedule that does not depend on max_steps, so the old run continued to step 12 equals a 12-step run
    old_run = dict(save_steps=4, learning_rate=1e-2, lr_scheduler_type="constant_with_warmup")
    make_trainer(out, max_steps=8, **old_run).train()  # the old run: checkpoint-4, -8
    old = tree(out / "checkpoint-4") | {"8/" + k: v for k, v in tree(out / "checkpoint-8").items()}
    new = make_trainer(out, max_steps=15, save_steps=5, save_total_limit=2)  # the new run: 5, 10, 15; keeps 2
    new.train()
    assert names(list_checkpoints(str(out))) == ["checkpoint-4", "checkpoint-8", "checkpoint-10", "checkpoint-15"]
    assert tree(out / "checkpoint-4") | {"8/" + k: v for k, v in tree(out / "checkpoint-8").items()} == old

    caplog.set_level(logging.WARNING)
    resumed = make_trainer(out, max_steps=15, save_steps=5, save_total_limit=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 15
    warnings = [r.getMessage() for r in caplog.records if "other runs" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint-4, checkpoint-8" in warnings[0], warnings
    assert "learning_rate: 0.01 in the checkpoint, 0.003 now" in warnings[0]
    assert os.path.basename(resumed.state.best_model_checkpoint or "") != "checkpoint-8"

    # the old config resumes the old run's newest checkpoint (step 8), never the newer step 15 of the new run
    back = make_trainer(out, max_steps=12, **old_run)
    back.train(resume_from_checkpoint=True)
    assert back.state.global_step == 12
    full = make_trainer(tmp_path / "full", max_steps=12, **old_run)
    full.train()
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, back.model.state_dict()[key]), key


def test_a_checkpoint_name_taken_by_another_run_is_moved_aside_never_overwritten(tmp_path):
    out = tmp_path / "out"
    make_trainer(out, learning_rate=1e-2).train()
    before = tree(out / "checkpoint-5")
    make_trainer(out).train()
    assert identity.belongs_to(str(out / "checkpoint-5"), make_trainer(tmp_path / "x").run_fingerprint())
    (aside,) = (out / identity.OTHER_RUNS).iterdir()
    assert tree(aside / "checkpoint-5") == before


def test_an_explicit_checkpoint_of_another_run_is_refused_unless_fine_tuning_is_asked_for(tmp_path):
    make_trainer(tmp_path / "old", learning_rate=1e-3).train()
    checkpoint = str(tmp_path / "old" / "checkpoint-10")
    trainer = make_trainer(tmp_path / "new", max_steps=20, learning_rate=2e-3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(CheckpointError) as refused:
        trainer.train(resume_from_checkpoint=checkpoint)
    message = str(refused.value)
    assert "learning_rate: 0.001 in the checkpoint, 0.002 now" in message
    assert "new output_dir" in message and "ignore_fingerprint=True" in message
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert not list_checkpoints(str(tmp_path / "new"))

    tuned = make_trainer(tmp_path / "new", max_steps=20, learning_rate=2e-3)
    tuned.train(resume_from_checkpoint=checkpoint, ignore_fingerprint=True)
    assert tuned.state.global_step == 20
    assert [g["initial_lr"] for g in tuned.optimizer.param_groups] == [2e-3]  # the config won
    assert tuned.lr_scheduler.base_lrs == [2e-3]
    written = identity.read_fingerprint(str(tmp_path / "new" / "checkpoint-20"))
    assert written.digest == tuned.run_fingerprint().digest != identity.read_fingerprint(checkpoint).digest


def test_observation_only_changes_and_a_larger_max_steps_continue_the_run(tmp_path):
    make_trainer(tmp_path).train()
    longer = make_trainer(tmp_path, max_steps=15, logging_steps=1, save_steps=3, report_to="none",
                          dataloader_num_workers=0, async_checkpointing=True)
    longer.train(resume_from_checkpoint=True)
    assert longer.state.log_history[0]["step"] == 5  # loaded from checkpoint-10: the first 10 steps not repeated
    assert longer.state.global_step == 15


# -- the lock ------------------------------------------------------------------------------------------------------
HOLDER = r"""
import sys
sys.path.insert(0, {root!r})
from trainer_lib import identity
with identity.folder_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_training_in_a_locked_folder_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT), str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        trainer = make_trainer(out)
        with pytest.raises(identity.RunLockedError, match=rf"{out} is in use by another training \(pid "
                                                          rf"{holder.pid} on host "):
            trainer.train()
        assert not list_checkpoints(str(out)) and holder.poll() is None
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    make_trainer(out).train()
    assert names(list_checkpoints(str(out))) == ["checkpoint-5", "checkpoint-10"]


STUCK_WORKER = r"""
import os, sys, time
sys.path.insert(0, {root!r})
import torch
from tests.helpers import DictDataset, digits
from tests.test_identity import make_trainer

class StuckInWorker(DictDataset):
    def __getitem__(self, i):
        if torch.utils.data.get_worker_info() is not None and i == self.stuck_at:
            with open(sys.argv[2] + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(sys.argv[2] + ".tmp", sys.argv[2])
            time.sleep(120)  # a worker that outlives its parent (the watchdog only looks between items)
        return super().__getitem__(i)

torch.multiprocessing.set_start_method("fork", force=True)
trainer = make_trainer(sys.argv[1], dataloader_num_workers=1)
train = trainer.train_dataset
trainer.train_dataset = StuckInWorker(train.features, train.labels)
trainer.train_dataset.stuck_at = 40
trainer.train()
"""


@pytest.mark.timeout(120)
def test_a_forked_dataloader_worker_does_not_keep_the_lock_of_a_killed_parent(tmp_path):
    out, pid_file = tmp_path / "out", tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, "-c", STUCK_WORKER.format(root=ROOT), str(out), str(pid_file)],
                              cwd=ROOT)
    worker = None
    try:
        while not pid_file.exists():
            assert parent.poll() is None, "the training ended before its worker reached the stuck item"
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        assert worker != parent.pid
        parent.kill()
        parent.wait()
        os.kill(worker, 0)  # the worker lives on (ProcessLookupError here would make the test prove nothing)
        with identity.folder_lock(str(out)):  # what a new run takes first: free although the worker lives
            pass
    finally:
        if parent.poll() is None:
            parent.kill()
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with identity.folder_lock(str(tmp_path)), identity.folder_lock(str(tmp_path)):
        make_trainer(tmp_path, max_steps=5).train()
    with identity.folder_lock(str(tmp_path)):  # released after both exits
        pass


# -- the pipeline ----------------------------------------------------------------------------------------------------
class Crash(TrainerCallback):
    """Stops a training with an exception at a given step, as a crash would (its checkpoints stay)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("crash")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from workflows import pipeline
    from workflows.config import PipelineConfig

    root = tmp_path_factory.mktemp("identity-data")
    config = PipelineConfig.from_dict(identity_faults.CONFIGS["A"])
    pipeline.prepare(config, str(root / "data"))
    pipeline.train(config, str(root / "data"), str(root / "ref-ck"), str(root / "ref-model"), report_to=[])
    return {"config": config, "data": str(root / "data"), "weights": load_weights(str(root / "ref-model"))}


def _interrupted(prepared, tmp_path, at: int = 12) -> str:
    from workflows import pipeline

    checkpoints = str(tmp_path / "checkpoints")
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(prepared["config"], prepared["data"], checkpoints, str(tmp_path / "model"), report_to=[],
                       callbacks=[Crash(at)])
    assert names(list_checkpoints(checkpoints)) == ["checkpoint-5", "checkpoint-10"]
    return checkpoints


@pytest.mark.parametrize("marker", [b'{"fingerprint": "ab', b"\x00\xff garbage"])
def test_a_truncated_or_garbage_run_config_never_blocks_a_rerun(prepared, tmp_path, marker):
    from workflows import pipeline

    checkpoints = _interrupted(prepared, tmp_path)
    (tmp_path / "checkpoints" / pipeline.RUN_CONFIG).write_bytes(marker)
    result = pipeline.train(prepared["config"], prepared["data"], checkpoints, str(tmp_path / "model"),
                            report_to=[])
    assert result["resumed_from"] == os.path.join(checkpoints, "checkpoint-10")
    weights = load_weights(str(tmp_path / "model"))
    assert all(torch.equal(weights[k], v) for k, v in prepared["weights"].items())
    marker = json.loads((tmp_path / "checkpoints" / pipeline.RUN_CONFIG).read_text())
    assert marker["finished"] is True and not [p for p in os.listdir(checkpoints) if ".tmp" in p]


@pytest.mark.parametrize("change", [{"lr_scheduler_type": "bogus"}, {"eval_strategy": "steps", "logging_steps": 0}])
def test_an_invalid_config_changes_nothing_on_disk(prepared, tmp_path, change):
    from workflows import pipeline
    from workflows.config import ConfigError, PipelineConfig

    checkpoints = _interrupted(prepared, tmp_path)
    before = tree(tmp_path)
    values = json.loads(json.dumps(identity_faults.CONFIGS["A"]))
    values["training"].update(change)
    bad = PipelineConfig.from_dict(values)
    with pytest.raises(ConfigError, match="training."):
        pipeline.train(bad, prepared["data"], checkpoints, str(tmp_path / "model"), report_to=[])
    with pytest.raises(ConfigError, match="training."):
        pipeline.run(bad, str(tmp_path / "fresh"))
    assert tree(tmp_path) == before and not (tmp_path / "fresh").exists()


def test_an_infinite_epoch_count_is_refused_by_the_cli_and_changes_nothing(prepared, tmp_path):
    checkpoints = _interrupted(prepared, tmp_path)
    before = tree(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("training:\n  num_train_epochs: .inf\n")
    proc = subprocess.run([sys.executable, "-m", "workflows", "--params", str(params), "train", "--data-dir",
                           prepared["data"], "--checkpoint-dir", checkpoints, "--model-dir", str(tmp_path / "m")],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2 and "training.num_train_epochs: expected a finite number" in proc.stderr
    params.unlink()
    assert tree(tmp_path) == before


def test_a_finished_run_is_moved_aside_with_reason_and_destination(prepared, tmp_path, caplog):
    from workflows import pipeline

    checkpoints = str(tmp_path / "checkpoints")
    pipeline.train(prepared["config"], prepared["data"], checkpoints, str(tmp_path / "model"), report_to=[])
    caplog.set_level(logging.WARNING)
    result = pipeline.train(prepared["config"], prepared["data"], checkpoints, str(tmp_path / "model"), report_to=[])
    assert result["resumed_from"] is None
    (moved,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("moved ")]
    assert "finished" in moved and "training from scratch" in moved and f"{checkpoints}.previous" in moved
    assert names(list_checkpoints(checkpoints + ".previous")) == ["checkpoint-35", "checkpoint-40"]


def test_setting_aside_again_keeps_what_an_earlier_move_set_aside(tmp_path):
    """Set-aside checkpoints belong to other runs: a later move renames them to .previous.<n>, never deletes them."""
    from trainer_lib import identity

    previous = str(tmp_path / "checkpoints.previous")
    for round_ in (1, 2, 3):
        folder = tmp_path / "checkpoints" / "checkpoint-5"
        folder.mkdir(parents=True)
        (folder / "round").write_text(str(round_))
        identity.move_aside([str(folder)], previous, f"round {round_}")
    kept = {p: (tmp_path / p / "checkpoint-5" / "round").read_text()
            for p in ("checkpoints.previous", "checkpoints.previous.1", "checkpoints.previous.2")}
    assert kept == {"checkpoints.previous": "3", "checkpoints.previous.1": "1", "checkpoints.previous.2": "2"}


# -- real processes --------------------------------------------------------------------------------------------------
def test_two_runs_on_one_workdir_one_trains_and_kills_end_in_each_configs_own_weights():
    """The concurrent start (one trains, the other is refused while the lock is held), then two trials of both runs
    killed at random moments and each config rerun: bit-identical to its own uninterrupted run."""
    results = identity_faults.concurrent_then_kills(kills=2, rounds=1, seed=1)
    assert len(results) == 3
    failed = [(case, detail) for case, held, detail in results if not held]
    assert not failed, failed


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_ten_kill_trials_of_two_runs_on_one_workdir():
    results = identity_faults.identity_trials(kills=10, rounds=2, seed=2)
    failed = [(case, detail) for case, held, detail in results if not held]
    assert not failed, failed


def test_a_retry_handed_another_runs_checkpoint_fails_for_good_naming_the_difference(prepared, tmp_path):
    """The Flyte retry path (pipeline.train with the previous attempt's checkpoint) obeys the same rule, and the
    refusal is not retried."""
    from workflows import pipeline
    from workflows.config import PipelineConfig
    from workflows.training import is_recoverable

    checkpoint = os.path.join(_interrupted(prepared, tmp_path), "checkpoint-10")
    other = PipelineConfig.from_dict(identity_faults.CONFIGS["B"])
    with pytest.raises(CheckpointError, match="learning_rate: 0.001 in the checkpoint, 0.003 now") as refused:
        pipeline.train(other, prepared["data"], str(tmp_path / "retry"), str(tmp_path / "model"), report_to=[],
                       resume=checkpoint)
    assert not is_recoverable(refused.value) and not list_checkpoints(str(tmp_path / "retry"))
    assert not is_recoverable(identity.RunLockedError("busy"))


def test_a_real_pyflyte_execute_retry_handed_another_runs_checkpoint_refuses_it(prepared, tmp_path):
    """A cluster attempt (real ``pyflyte-execute``) whose ``--prev-checkpoint`` holds another run's checkpoint:
    the attempt fails for good naming the difference, trains nothing and leaves that checkpoint as it was."""
    from flytekit.types.directory import FlyteDirectory

    from tests.flyte_helpers import execute_command, flyte_env, read_error, run, write_inputs
    from workflows.config import PipelineConfig
    from workflows.flyte_cache import run_fingerprint

    prev = tmp_path / "prev-attempt"  # what save_to_flyte leaves: <flyte checkpoint>/checkpoint-<step>/
    other_run = os.path.join(_interrupted(prepared, tmp_path), "checkpoint-10")  # config A's
    prev.mkdir()
    subprocess.run(["cp", "-a", other_run, str(prev / "checkpoint-10")], check=True)
    before = tree(prev)
    config = PipelineConfig.from_dict(identity_faults.CONFIGS["B"])
    root = str(tmp_path / "attempt")
    os.makedirs(root)
    write_inputs(os.path.join(root, "inputs.pb"),
                 {"config": config, "data": FlyteDirectory(prepared["data"]), "workdir": "",
                  "fingerprint": run_fingerprint(config)},
                 {"config": PipelineConfig, "data": FlyteDirectory, "workdir": str, "fingerprint": str})
    attempt_checkpoint = os.path.join(root, "flyte-checkpoint")
    finished = run(execute_command(root, "attempt2", "train_model", attempt_checkpoint, str(prev)),
                   flyte_env(tmp_path), os.path.join(root, "log"))

    assert finished.returncode == 0, finished.stderr[-3000:]  # the failure is in error.pb, as on a cluster
    error = read_error(os.path.join(root, "attempt2", "out"))
    assert error.kind == error.NON_RECOVERABLE, error.message  # a retry would be refused the same way
    assert "CheckpointError" in error.message and "learning_rate: 0.001 in the checkpoint, 0.003 now" in error.message
    assert "resuming from" not in finished.stderr  # refused before the lock, the marker or the log line
    assert tree(prev) == before
    # the attempt's own Flyte checkpoint holds nothing: not A's checkpoint passed on as its own, nothing of B
    assert not list_checkpoints(attempt_checkpoint)
