"""Hyperparameter search: the Trainer API (reference semantics), the Flyte tuning workflow and the DVC queue."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import accuracy, digits, make_model
from trainer_lib import BestRun, Trainer, TrainerCallback, TrainingArguments
from trainer_lib import checkpoint as ckpt

optuna = pytest.importorskip("optuna")


class TrialRecorder(TrainerCallback):
    """What callbacks see of each trial: its name and values at train begin, its last evaluation."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen.append({"name": state.trial_name, "params": state.trial_params, "search": state.is_hyper_param_search,
                          "output_dir": args.output_dir, "learning_rate": args.learning_rate})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen[-1]["eval_accuracy"] = metrics["eval_accuracy"]


def _search(tmp_path, name: str):
    train, val = digits(256, 64)
    recorder = TrialRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=16, per_device_train_batch_size=32, eval_strategy="steps",
        eval_steps=8, save_strategy="steps", save_steps=16, logging_steps=8, report_to="none", disable_tqdm=True,
        seed=3,
    )

    def model_init(trial):
        hidden = trial.params.get("hidden", 32) if trial is not None else 32
        return make_model(0, hidden=hidden)

    def hp_space(trial):
        return {
            "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True),
            "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [16, 32]),
            "hidden": trial.suggest_categorical("hidden", [16, 48]),  # not a TrainingArguments field: model_init's
        }

    trainer = Trainer(args=args, model_init=model_init, train_dataset=train, eval_dataset=val,
                      compute_metrics=accuracy, callbacks=[recorder])
    best = trainer.hyperparameter_search(
        hp_space=hp_space, compute_objective=lambda metrics: metrics["eval_accuracy"], n_trials=4,
        direction="maximize", backend="optuna", sampler=optuna.samplers.RandomSampler(seed=7),
    )
    return trainer, best, recorder.seen


def test_seeded_search_is_reproducible_and_returns_the_best_trial_with_its_values(tmp_path):
    trainer, best, seen = _search(tmp_path, "a")
    _, again, seen_again = _search(tmp_path, "b")

    assert isinstance(best, BestRun)
    assert (best.run_id, best.objective, best.hyperparameters) == (again.run_id, again.objective, again.hyperparameters)
    strip = [{k: v for k, v in s.items() if k != "output_dir"} for s in seen]
    assert strip == [{k: v for k, v in s.items() if k != "output_dir"} for s in seen_again]

    # callbacks saw each trial: its name, its values, its own folder and its values applied to the arguments
    assert [s["name"] for s in seen] == ["run-0", "run-1", "run-2", "run-3"]
    assert all(s["search"] for s in seen)
    assert len({json.dumps(s["params"], sort_keys=True) for s in seen}) == 4
    for s in seen:
        assert s["output_dir"] == str(tmp_path / "a" / s["name"])
        assert s["learning_rate"] == s["params"]["learning_rate"]
    # the best run is the trial with the highest objective (its last evaluation's accuracy)
    scores = {s["name"]: s["eval_accuracy"] for s in seen}
    assert best.objective == max(scores.values()) and scores[f"run-{best.run_id}"] == best.objective
    assert best.hyperparameters == seen[int(best.run_id)]["params"]

    # each trial's checkpoint records its trial name and values
    for s in seen:
        last = ckpt.list_checkpoints(s["output_dir"])[-1]
        with open(os.path.join(last, "trainer_state.json")) as f:
            state = json.load(f)
        assert (state["trial_name"], state["trial_params"]) == (s["name"], s["params"])
    # the search leaves the trainer's own arguments as they were
    assert trainer.args.output_dir == str(tmp_path / "a") and trainer.args.learning_rate == 5e-5


def test_search_needs_model_init_and_a_known_backend(tmp_path):
    train, val = digits(64, 32)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to="none", disable_tqdm=True)
    with pytest.raises(RuntimeError, match="model_init"):
        Trainer(make_model(), args, train_dataset=train).hyperparameter_search(n_trials=1)
    trainer = Trainer(args=args, model_init=lambda: make_model(), train_dataset=train, eval_dataset=val)
    with pytest.raises(ValueError, match="backend 'ray' is not supported"):
        trainer.hyperparameter_search(n_trials=1, backend="ray")
