"""Hyperparameter search: the Trainer API (reference semantics), the Flyte tuning workflow and the DVC queue."""

from __future__ import annotations

import json
import os
import re

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


@pytest.mark.parametrize("section, message", [
    ({"metric": "test_accuracy"}, "search.metric: expected one of ['eval_accuracy', 'eval_loss']"),
    ({"n_trials": 0}, "search.n_trials: expected an integer >= 1"),
    ({"sampler": "cmaes"}, "search.sampler: expected one of ['tpe', 'random', 'grid']"),
    ({"trials": 3}, "unknown config key(s) search.trials"),
    ({"params": {"training.learning_rate": {"type": "float", "low": 0.1, "high": 0.01}}},
     "search.params.training.learning_rate: expected low < high"),
    ({"params": {"training.learning_rate": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}},
     "search.params.training.learning_rate.low: expected a positive number with log: true"),
    ({"params": {"training.learning_rat": {"type": "float", "low": 0.1, "high": 1.0}}},
     "search.params.training.learning_rat: expected a params.yaml key"),
    ({"params": {"data.split_seed": {"type": "int", "low": 0, "high": 3}}}, "search.params.data.split_seed: expected"),
    ({"params": {"model.hidden_sizes": {"type": "categorical", "choices": [[64], 64]}}},
     "search.params.model.hidden_sizes.choices[1]: expected a list"),
    ({"params": {"model.dropout": {"type": "float", "low": 0.1, "high": 0.5, "choices": [0.1]}}},
     "search.params.model.dropout.choices"),
    ({"sampler": "grid", "params": {"model.dropout": {"type": "float", "low": 0.1, "high": 0.5}}},
     "search.params.model.dropout.type: expected int or categorical with the grid sampler"),
])
def test_a_bad_search_section_is_one_error_naming_its_key(tmp_path, section, message):
    import yaml

    from workflows.config import ConfigError, PipelineConfig, SearchConfig

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"search": section}))
    for load in (SearchConfig.load, PipelineConfig.load):  # every stage rejects it, not only the search commands
        with pytest.raises(ConfigError) as error:
            load(str(path))
        assert message in str(error.value) and "\n" not in str(error.value)


def test_a_search_section_is_loaded_with_the_same_bounds_as_the_rest_of_the_config(tmp_path):
    """The alias bomb under ``search:`` is refused by the size bound, by the file and from a string."""
    from tests.reliability.bad_inputs import ALIAS_BOMB
    from workflows.config import ConfigError, SearchConfig

    bomb = ALIAS_BOMB.replace("data:\n source:\n", "search:\n params:\n")
    path = tmp_path / "params.yaml"
    path.write_text(bomb)
    for load, source, origin in ((SearchConfig.load, str(path), str(path)), (SearchConfig.parse, bomb, "search")):
        with pytest.raises(ConfigError, match="aliases are expanded") as error:
            load(source)
        assert origin in str(error.value) and "\n" not in str(error.value) and len(str(error.value)) < 300


# -- the Flyte tuning workflow ------------------------------------------------------------------------------------
#: 2 rounds x 2 trials over a grid of hidden sizes; 2**58 units cannot be allocated: that trial fails at once
HUGE = 2**58
TUNING_CONFIG = {
    "model": {"hidden_sizes": [32]},
    "training": {"max_steps": 20, "logging_steps": 10, "eval_strategy": "steps", "eval_steps": 10,
                 "save_strategy": "steps", "save_steps": 10, "report_to": ["mlflow"]},
}
TUNING_SEARCH = {
    "sampler": "grid", "n_trials": 4, "parallelism": 2, "seed": 0, "min_success_ratio": 0.5,
    "params": {"model.hidden_sizes": {"type": "categorical", "choices": [[8], [24], [HUGE], [48]]}},
}


def _trained(stderr: str) -> list[int]:
    """Trial numbers whose training started in a pyflyte run (from the tuning task's log lines)."""
    return [int(n) for n in re.findall(r"workflows\.tuning: trial-(\d+): training", stderr)]


def test_tuning_workflow_survives_a_failed_trial_resumes_without_retraining_and_nests_mlflow_runs(tmp_path, mlflow_server):
    """2 rounds x 2 trials, one failing; interrupted in the middle of round 2 (its first trial finished, the second
    training) and run again: neither round 1 nor the finished trial of round 2 is trained again, the best trial is
    the one with the best validation accuracy, and every trial is a child of one MLflow study run."""
    from mlflow import MlflowClient

    from tests.flyte_helpers import BIN, flyte_env, run_until
    from workflows import search as study_file
    from workflows.config import SearchConfig

    env = flyte_env(tmp_path, FLYTE_LOCAL_CACHE_ENABLED="true", MLFLOW_TRACKING_URI=mlflow_server,
                    MLFLOW_EXPERIMENT_NAME=f"tuning-{tmp_path.name}")
    cmd = [os.path.join(BIN, "pyflyte"), "run", "workflows/tuning.py", "tuning_workflow",
           "--config", json.dumps(TUNING_CONFIG), "--search", json.dumps(TUNING_SEARCH),
           "--workdir", str(tmp_path / "work")]
    stderr_path = tmp_path / "first" / "stderr.txt"

    def last_trial_started() -> bool:  # the grid's order: round 1 is trials 0 (HUGE) and 1, round 2 is 2 and 3
        return stderr_path.exists() and len(_trained(stderr_path.read_text(errors="replace"))) >= 4

    first = run_until(cmd, env, str(tmp_path / "first"), last_trial_started)
    assert first.signalled, first.stderr[-3000:]
    assert _trained(first.stderr) == [0, 1, 2, 3] and "trial-2: finished" in first.stderr, first.stderr[-3000:]

    second = run_until(cmd, env, str(tmp_path / "second"), None)
    assert second.returncode == 0, second.stderr[-3000:]
    # round 1 came from Flyte's cache, trial 2 from the workdir, only the interrupted trial 3 trained again
    assert _trained(second.stderr) == ([] if "trial-3: finished" in first.stderr else [3]), second.stderr[-3000:]
    assert "trial-2: finished in an earlier run, reused" in second.stderr

    # the study: one failed trial, the best is the complete trial with the highest validation accuracy
    search = SearchConfig.from_dict(TUNING_SEARCH)
    study_path = re.search(r"study=(\S+?\.log)", second.stdout).group(1)
    trials = study_file.trials(search, study_path)
    failed = [t for t in trials if t["state"] == "FAIL"]
    assert [t["params"]["model.hidden_sizes"] for t in failed] == [[HUGE]]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(complete) == 3
    best = max(complete, key=lambda t: t["value"])
    assert json.loads(re.search(r"best_params='(.+?)'", second.stdout).group(1)) == best["params"]
    assert float(re.search(r"best_objective=([0-9.]+)", second.stdout).group(1)) == pytest.approx(best["value"])
    assert "test_accuracy" in re.search(r"test_metrics=(\{.*?\})", second.stdout).group(1)

    # MLflow: one study run holding the best, and each complete trial a child run tagged with its number and values
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(f"tuning-{tmp_path.name}")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("flytrain.role") == "study"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_eval_accuracy"] == pytest.approx(best["value"])
    assert json.loads(parent.data.params["best.model.hidden_sizes"]) == best["params"]["model.hidden_sizes"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.info.status == "FINISHED"]
    by_trial = {int(r.data.tags["flytrain.trial"]): r for r in children}
    assert sorted(by_trial) == sorted(t["number"] for t in complete) and len(children) == 3
    for t in complete:
        tags = by_trial[t["number"]].data.tags
        assert json.loads(tags["trial.model.hidden_sizes"]) == t["params"]["model.hidden_sizes"]
        assert by_trial[t["number"]].data.metrics["eval_accuracy"] == pytest.approx(t["value"])


def test_trials_deck_lists_every_trial_and_charts_the_objective_by_trial_and_by_the_numeric_parameter():
    from workflows.config import SearchConfig
    from workflows.tuning import trials_html

    search = SearchConfig.from_dict({"params": {
        "model.hidden_sizes": {"type": "categorical", "choices": [[16], [32]]},
        "training.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}})
    table = [{"number": 0, "params": {"model.hidden_sizes": [16], "training.learning_rate": 0.01}, "value": 0.5,
              "state": "COMPLETE"},
             {"number": 1, "params": {"model.hidden_sizes": [32], "training.learning_rate": 0.002}, "value": None,
              "state": "FAIL"},
             {"number": 2, "params": {"model.hidden_sizes": [32], "training.learning_rate": 0.05}, "value": 0.75,
              "state": "COMPLETE"}]
    page = trials_html(search, table)
    rows = re.findall(r"<tr>(.*?)</tr>", page)
    assert len(rows) == 4  # header + one row per trial, the failed one included
    assert "<td>1</td><td>[32]</td><td>0.002</td><td></td><td>FAIL</td>" in rows[2]
    charts = re.findall(r"<svg.*?</svg>", page)
    assert [re.search(r'aria-label="([^"]+)"', c).group(1) for c in charts] == [
        "eval_accuracy by trial", "eval_accuracy by training.learning_rate"]
    assert all(c.count("<circle") == 2 for c in charts)  # the complete trials only
    assert "<script" not in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")


# -- DVC: the search space as an experiment queue ------------------------------------------------------------------
QUEUE_SEARCH = {"sampler": "grid", "n_trials": 2, "parallelism": 2,
                "params": {"model.hidden_sizes": {"type": "categorical", "choices": [[16], [40]]}}}


def test_queue_search_prints_one_dvc_experiment_per_trial_with_params_yaml_keys(tmp_path):
    import shlex
    import subprocess
    import sys

    import yaml

    params = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "params.yaml")))
    params["search"] = {**QUEUE_SEARCH, "n_trials": 3, "params": {
        "training.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "model.hidden_sizes": {"type": "categorical", "choices": [[16], [40, 40]]}}, "sampler": "random"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "workflows", "--params", str(tmp_path / "params.yaml"), "queue-search", "--dry-run"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert out == subprocess.run(cmd, capture_output=True, text=True, check=True).stdout  # seeded: the same queue
    lines = out.splitlines()
    assert len(lines) == 3
    for line in lines:
        words = shlex.split(line)
        assert words[:4] == ["dvc", "exp", "run", "--queue"] and words[4::2] == ["-S", "-S"]
        values = dict(arg.split("=", 1) for arg in words[5::2])
        assert 1e-3 <= float(values["training.learning_rate"]) <= 1e-2
        assert yaml.safe_load(values["model.hidden_sizes"]) in ([16], [40, 40])

    params["search"]["params"]["model.hidden_sizes"]["choices"] = [[0]]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "search.params.model.hidden_sizes" in bad.stderr


@pytest.mark.slow
def test_a_queued_search_runs_as_dvc_experiments_listed_by_exp_show(tmp_path):
    """queue-search → `dvc queue start -j 1` → both experiments in `dvc exp show`, sortable by the objective."""
    import sys
    import time

    from tests.test_dvc import copy_project, run, write_params

    repo = tmp_path / "project"
    repo.mkdir()
    copy_project(repo)
    write_params(repo, {"training": {"max_steps": 40, "logging_steps": 20, "eval_strategy": "steps", "eval_steps": 20,
                                     "save_strategy": "steps", "save_steps": 20}, "search": QUEUE_SEARCH})
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        run(repo, *cmd)
    queued = run(repo, sys.executable, "-m", "workflows", "--params", "params.yaml", "queue-search").stdout
    assert queued.count("dvc exp run --queue") == 2, queued
    run(repo, "dvc", "queue", "start", "-j", "1")
    deadline = time.monotonic() + 900
    while True:
        status = run(repo, "dvc", "queue", "status").stdout
        if status.count("Success") == 2 or "Failed" in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert status.count("Success") == 2, status + run(repo, "dvc", "queue", "logs", "--help", ok=False).stdout

    rows = run(repo, "dvc", "exp", "show", "--csv", "--sort-by", "metrics/train.json:eval_accuracy",
               "--sort-order", "desc").stdout.splitlines()
    header = rows[0].split(",")
    experiments = [dict(zip(header, row.split(","))) for row in rows[1:]]
    experiments = [e for e in experiments if e.get("Experiment") and e.get("eval_accuracy")]
    assert sorted(e["model.hidden_sizes"] for e in experiments) == sorted(["[16]", "[40]"]), rows
    accuracies = [float(e["eval_accuracy"]) for e in experiments]
    assert accuracies == sorted(accuracies, reverse=True)
