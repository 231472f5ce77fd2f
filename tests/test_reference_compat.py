"""The reference's own callbacks (Hugging Face transformers 5.x) run unchanged inside flytrain's Trainer.

Skipped unless ``transformers`` is importable; it is never a dependency. Run it from a throw-away venv (see the
README, "Callbacks written for the reference"). The event order and kwargs a ``transformers.TrainerCallback`` sees
are compared with a fixture recorded under the reference Trainer itself for the same configuration:
``python -m tests.test_reference_compat --record`` (in that venv) rewrites ``tests/reference_events.json``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import digits, make_model

FIXTURE = Path(__file__).with_name("reference_events.json")
#: one configuration for both Trainers: two epochs (4 batches each) cut at step 6, logs, evaluations and saves
CONFIG = dict(
    max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=3, save_steps=3, per_device_train_batch_size=16,
    per_device_eval_batch_size=8, learning_rate=0.01, lr_scheduler_type="linear", report_to="none", disable_tqdm=True,
    seed=0,
)
N_TRAIN, N_EVAL = 64, 16


def _model():
    model = make_model()
    model.config = None  # the reference's trackers call model.config.to_dict() when a model has a config
    return model


def _recorder_class(base):
    """A ``base`` subclass that records every event the reference defines: name, kwargs, step, logged keys."""

    def make(event):
        def handler(self, args, state, control, **kwargs):
            entry = {"event": event, "kwargs": sorted(kwargs), "step": state.global_step}
            if event == "on_log":
                entry["logs"] = sorted(kwargs["logs"])
                if "learning_rate" in kwargs["logs"]:
                    entry["learning_rate"] = kwargs["logs"]["learning_rate"]
            if event == "on_evaluate":
                entry["metrics"] = sorted(kwargs["metrics"])
            self.records.append(entry)

        return handler

    events = [name for name in vars(base) if name.startswith("on_")]
    namespace = {name: make(name) for name in events}
    namespace["__init__"] = lambda self: setattr(self, "records", [])
    return type("EventRecorder", (base,), namespace)


def record_under_reference(output_dir: str) -> dict:
    """The events a transformers.TrainerCallback sees under transformers.Trainer for CONFIG."""
    import transformers

    train, evaluation = digits(N_TRAIN, N_EVAL)
    recorder = _recorder_class(transformers.TrainerCallback)()
    args = transformers.TrainingArguments(output_dir=output_dir, use_cpu=True, **CONFIG)
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=train, eval_dataset=evaluation,
                                   callbacks=[recorder])
    trainer.train()
    return {"transformers": transformers.__version__, "records": recorder.records}


def _flytrain_trainer(out, callbacks, **overrides):
    from trainer_lib import Trainer, TrainingArguments

    train, evaluation = digits(N_TRAIN, N_EVAL)
    args = TrainingArguments(output_dir=str(out), **{**CONFIG, **overrides})
    return Trainer(_model(), args, train_dataset=train, eval_dataset=evaluation, callbacks=callbacks)


@pytest.fixture
def transformers(tmp_path, monkeypatch):
    # importing transformers' integrations imports every installed tracker; Comet's then auto-logs into the
    # working directory: keep the reference's side effects in the test's own folder and off
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COMET_MODE", "disabled")
    return pytest.importorskip("transformers")


def test_a_reference_callback_sees_the_reference_events_and_kwargs(transformers, tmp_path):
    recorded = json.loads(FIXTURE.read_text())
    recorder = _recorder_class(transformers.TrainerCallback)()
    _flytrain_trainer(tmp_path, [recorder]).train()
    got, want = recorder.records, recorded["records"]
    assert [(r["event"], r["kwargs"], r["step"]) for r in got] == [(r["event"], r["kwargs"], r["step"]) for r in want]
    assert [r.get("logs") for r in got] == [r.get("logs") for r in want]
    assert [r.get("metrics") for r in got] == [r.get("metrics") for r in want]
    rates = [(r["step"], r["learning_rate"]) for r in got if "learning_rate" in r]
    assert rates == [(r["step"], pytest.approx(r["learning_rate"])) for r in want if "learning_rate" in r]


def test_reference_early_stopping_stops_and_keeps_its_patience_counter_across_resume(transformers, tmp_path):
    # a threshold no evaluation can beat: every evaluation after the first counts against the patience
    settings = dict(eval_steps=2, save_steps=2, metric_for_best_model="eval_loss", greater_is_better=False,
                    load_best_model_at_end=True)

    def stopper():
        return transformers.EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=1e9)

    first = stopper()
    _flytrain_trainer(tmp_path, [first], max_steps=6, **settings).train()
    assert first.early_stopping_patience_counter == 2  # evaluations at 2, 4, 6: the first sets the best

    class CounterAtResume(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.counter = resumed.early_stopping_patience_counter

    resumed, seen = stopper(), CounterAtResume()
    trainer = _flytrain_trainer(tmp_path, [resumed, seen], max_steps=20, **settings)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert seen.counter == 2  # restored from the checkpoint, not reset to 0
    assert trainer.state.global_step == 8  # one more evaluation without improvement: patience 3 reached, stopped


def test_reference_tensorboard_callback_writes_the_logged_scalars(transformers, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    trainer = _flytrain_trainer(tmp_path, [callback])
    trainer.train()
    assert Path(callback.logging_dir).parent == tmp_path / "runs"  # the reference's own choice of folder
    events = EventAccumulator(callback.logging_dir)
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("train/loss")]
    want = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    assert [s for s, _ in got] == [2, 4, 6]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_reference_mlflow_callback_logs_the_run(transformers, tmp_path, mlflow_server, monkeypatch):
    import mlflow
    from transformers.integrations import MLflowCallback

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"reference-{tmp_path.name}")
    trainer = _flytrain_trainer(tmp_path, [MLflowCallback()])
    trainer.train()
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(f"reference-{tmp_path.name}")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    want = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    assert sorted(got) == [(s, pytest.approx(v)) for s, v in want]
    assert run.data.params["max_steps"] == "6"


def test_reference_codecarbon_callback_writes_its_emissions_file(transformers, tmp_path, monkeypatch):
    pytest.importorskip("codecarbon")
    from transformers.integrations import CodeCarbonCallback

    monkeypatch.setenv("CODECARBON_LOG_LEVEL", "error")
    out = tmp_path / "run"  # does not exist yet: the callback opens its tracker there from on_init_end
    _flytrain_trainer(out, [CodeCarbonCallback()]).train()
    with open(out / "emissions.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["duration"]) > 0


def test_reference_dvclive_callback_writes_the_logged_metrics(transformers, tmp_path):
    pytest.importorskip("dvclive")
    from dvclive import Live
    from dvclive.utils import standardize_metric_name
    from transformers.integrations import DVCLiveCallback

    live = Live(dir=str(tmp_path / "dvclive"), save_dvc_exp=False, dvcyaml=None)
    trainer = _flytrain_trainer(tmp_path / "out", [DVCLiveCallback(live=live)])
    trainer.train()
    name = standardize_metric_name("loss", "dvclive.huggingface")  # the reference's name for the logged loss
    with open(tmp_path / "dvclive" / "plots" / "metrics" / f"{name}.tsv", encoding="utf-8") as f:
        values = [float(row[name.rsplit("/", 1)[-1]]) for row in csv.DictReader(f, delimiter="\t")]
    assert values == pytest.approx([e["loss"] for e in trainer.state.log_history if "loss" in e], rel=1e-6)


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.test_reference_compat --record  (needs transformers installed)")
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        data = record_under_reference(os.path.join(work, "out"))
    FIXTURE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"recorded {len(data['records'])} events under transformers {data['transformers']} into {FIXTURE}")
