"""The Flyte entry point with real flytekit: pyflyte run, cluster-style attempts (pyflyte-execute) that are killed,
preempted and resumed, error classification, serialisation for a cluster, the elastic variant, and the deck."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest
import torch
import yaml

from tests.flyte_helpers import (
    BIN,
    REPO,
    complete_checkpoint,
    execute_command,
    find_files,
    flyte_env,
    read_error,
    read_outputs,
    run,
    run_until,
    write_inputs,
)
from trainer_lib import checkpoint as ckpt

MAX_STEPS = 60
SMALL = {
    "model": {"hidden_sizes": [64, 64]},
    "training": {
        "max_steps": MAX_STEPS,
        "logging_steps": 10,
        "eval_strategy": "steps",
        "eval_steps": 20,
        "save_strategy": "steps",
        "save_steps": 10,
        "save_total_limit": 2,
    },
}
CHARTS = ("loss", "learning_rate", "eval_loss", "eval_accuracy")


def small_config(**training):
    from workflows.config import PipelineConfig

    values = json.loads(json.dumps(SMALL))
    values["training"].update(training)
    return PipelineConfig.from_dict(values)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Prepared data and the weights of an uninterrupted run of SMALL, trained in-process by the pipeline."""
    from workflows import pipeline

    root = tmp_path_factory.mktemp("reference")
    config = small_config()
    data_dir = str(root / "data")
    pipeline.prepare(config, data_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1)
    try:
        pipeline.train(config, data_dir, str(root / "checkpoints"), str(root / "model"), report_to=[])
    finally:
        torch.set_num_threads(threads)
    return {"data": data_dir, "weights": ckpt.load_weights(str(root / "model"))}


def fingerprint(config) -> str:
    from workflows.flyte_cache import run_fingerprint

    return run_fingerprint(config)


def assert_same_weights(model_dir: str, expected: dict[str, torch.Tensor]) -> None:
    weights = ckpt.load_weights(model_dir)
    assert sorted(weights) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(weights[key], tensor), f"{key} differs from the uninterrupted run"


def assert_log_history_deck(deck_html: str) -> None:
    assert len(deck_html.encode()) < 1_000_000
    assert "Log History" in deck_html
    table = re.search(r'<table class="flytrain-log-history[^"]*".*?</table>', deck_html, re.S)
    assert table and "<th>step</th>" in table.group(0) and "<th>eval_accuracy</th>" in table.group(0)
    for name in CHARTS:
        match = re.search(rf'<svg class="flytrain-chart" data-metric="{name}".*?</svg>', deck_html, re.S)
        assert match, f"no {name} chart in the deck"
        points = ET.fromstring(match.group(0)).find("{http://www.w3.org/2000/svg}polyline").get("points").split()
        assert len(points) >= 3


def assert_history_continuous(model_dir: str) -> None:
    """One train log per logging step, in order: a resumed run neither repeats nor loses entries."""
    with open(os.path.join(model_dir, "log_history.json")) as f:
        history = json.load(f)
    steps = [e["step"] for e in history if "loss" in e]
    assert steps == [1] + list(range(10, MAX_STEPS + 1, 10))


# -- the deck renderer (no flytekit) ------------------------------------------------------------------------------
def test_log_history_html_holds_table_and_svg_charts():
    from callbacks.flyte import chart_series, log_history_html

    history = [{"loss": 2.0 / s, "learning_rate": 1e-3 * (1 - s / 100), "grad_norm": 1.0, "epoch": s / 10, "step": s}
               for s in range(1, 101)]
    history += [{"eval_loss": 1.0 / s, "eval_accuracy": s / 100, "eval_runtime": 0.1, "eval_<odd>": 0.5,
                 "epoch": s / 10, "step": s} for s in range(10, 101, 10)]
    history.append({"train_runtime": 3.0, "train_loss": 0.5, "epoch": 10.0, "step": 100})
    series = chart_series(history)
    assert list(series) == ["loss", "learning_rate", "grad_norm", "eval_<odd>", "eval_accuracy", "eval_loss"]
    assert series["eval_accuracy"][0] == (10, 0.1) and len(series["loss"]) == 100
    html = log_history_html(history)
    assert "eval_&lt;odd&gt;" in html and "eval_<odd>" not in html
    for svg in re.findall(r"<svg .*?</svg>", html, re.S):
        ET.fromstring(svg)  # well-formed, self-contained
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    table = re.search(r'<table class="flytrain-log-history.*?</table>', html, re.S).group(0)
    assert len(re.findall(r"<tr>", table)) == len(history) + 1
    assert "<th>eval_runtime</th>" not in table and "<th>train_runtime</th>" not in table


def test_log_history_html_stays_small_for_long_runs():
    from callbacks.flyte import log_history_html

    history = [{"loss": 1.0 + (s % 7) / 10, "learning_rate": 1e-3, "epoch": s / 100, "step": s} for s in range(100_000)]
    html = log_history_html(history)
    assert len(html.encode()) < 1_000_000
    assert "99000 rows left out" in html
    assert "<td>99999</td>" in html  # the newest rows are kept


# -- the callback --------------------------------------------------------------------------------------------------
def test_import_does_not_import_flytekit():
    code = "import sys, callbacks.flyte, workflows.pipeline; assert 'flytekit' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_callback_outside_a_task_raises_a_clear_error(tmp_path):
    from callbacks.flyte import FlyteCallback, NotInFlyteTask
    from tests.helpers import digits, make_model
    from trainer_lib import Trainer, TrainingArguments

    with pytest.raises(NotInFlyteTask, match="needs a running Flyte task"):
        FlyteCallback()
    train, _ = digits(32, 8)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=["flyte"], disable_tqdm=True)
    with pytest.raises(NotInFlyteTask, match="Remove 'flyte' from report_to"):
        Trainer(make_model(), args, train_dataset=train)


def test_flyte_runs_report_to_flyte_and_classify_errors_for_retries():
    from flytekit.exceptions.system import FlyteDownloadDataException

    from callbacks.flyte import NotInFlyteTask
    from workflows.config import ConfigError
    from workflows.training import Preempted, flyte_report_to, is_recoverable

    assert flyte_report_to(small_config()) == ["flyte", "tensorboard"]
    assert flyte_report_to(small_config(report_to=["mlflow"])) == ["flyte", "mlflow"]
    assert flyte_report_to(small_config(report_to=["none"])) == []
    for error in (Preempted("SIGTERM"), OSError("disk"), ConnectionError(), RuntimeError("NCCL timeout"),
                  torch.cuda.OutOfMemoryError(), FlyteDownloadDataException("s3")):
        assert is_recoverable(error), error
    for error in (ConfigError("training.x"), ValueError(), KeyError("k"), TypeError(), FileNotFoundError(),
                  NotImplementedError(), NotInFlyteTask("no task")):
        assert not is_recoverable(error), error


# -- pyflyte run ---------------------------------------------------------------------------------------------------
def test_pyflyte_run_resumes_from_workdir_and_writes_the_deck(tmp_path, reference):
    """`pyflyte run` killed mid-training and started again with the same --workdir continues the run."""
    config_file = tmp_path / "small.yaml"
    config_file.write_text(yaml.safe_dump(SMALL))  # report_to left empty: the Flyte default (flyte, tensorboard)
    workdir = tmp_path / "work"
    cmd = [os.path.join(BIN, "pyflyte"), "run", "workflows/training.py", "training_workflow",
           "--config", str(config_file), "--workdir", str(workdir)]
    env = flyte_env(tmp_path)
    checkpoints = str(workdir / "checkpoints")

    first = run_until(cmd, env, str(tmp_path / "run1"), lambda: bool(ckpt.list_checkpoints(checkpoints)))
    assert first.signalled and first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    interrupted_at = ckpt.checkpoint_step(ckpt.list_checkpoints(checkpoints)[-1])
    assert interrupted_at < MAX_STEPS, "the run finished before it could be killed"

    second = run(cmd, env, str(tmp_path / "run2"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert re.search(rf"resuming from {re.escape(checkpoints)}/checkpoint-\d+", second.stderr), second.stderr[-3000:]
    outputs = re.search(r"model=(\S+?), logs=(\S+?), metrics=(\S+?), test_metrics=(\{.*?\})", second.stdout)
    assert outputs, second.stdout[-3000:]
    model_dir, logs_dir, metrics_dir = outputs.group(1), outputs.group(2), outputs.group(3)
    assert_same_weights(model_dir, reference["weights"])
    assert_history_continuous(model_dir)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(logs_dir))  # default tensorboard
    with open(os.path.join(metrics_dir, "metrics.json")) as f:
        assert 0.5 < json.load(f)["test_accuracy"] <= 1.0

    # the killed run wrote no deck; the second run's two decks are where its last lines say
    printed = dict(re.findall(r"^  (\w+): file://(\S+)$", second.stdout, re.M))
    assert sorted(printed.values()) == find_files(env["TMPDIR"], "deck.html")
    with open(printed["train_model"], encoding="utf-8") as f:
        assert_log_history_deck(f.read())
    with open(printed["evaluate_model"], encoding="utf-8") as f:
        evaluation = f.read()
    assert 'class="flytrain-heatmap' in evaluation and "<h3>Test metrics</h3>" in evaluation
    assert re.search(r"^test accuracy: \d\.\d{4}$", second.stdout, re.M)


# -- a cluster's attempts, for real with local folders ---------------------------------------------------------------
def test_cluster_attempts_killed_preempted_and_resumed(tmp_path, reference):
    """Attempt 1 is SIGKILLed after its first Flyte checkpoint, attempt 2 is preempted (SIGTERM), attempt 3
    finishes: each resumes from the previous attempt's Flyte checkpoint and the weights equal an uninterrupted run."""
    from flytekit.types.directory import FlyteDirectory

    from workflows.config import PipelineConfig

    root = str(tmp_path)
    config = small_config(report_to=["flyte"])
    write_inputs(
        os.path.join(root, "inputs.pb"),
        {"config": config, "data": FlyteDirectory(reference["data"]), "workdir": "", "fingerprint": fingerprint(config)},
        {"config": PipelineConfig, "data": FlyteDirectory, "workdir": str, "fingerprint": str},
    )
    env = flyte_env(tmp_path)
    cp_a, cp_b, cp_c = (os.path.join(root, f"flyte-checkpoint-{x}") for x in "ABC")

    first = run_until(execute_command(root, "attempt1", "train_model", cp_a, ""), env, os.path.join(root, "log1"),
                      lambda: complete_checkpoint(cp_a) is not None)
    assert first.signalled and first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    step_a = ckpt.checkpoint_step(complete_checkpoint(cp_a))
    assert 0 < step_a < MAX_STEPS, "attempt 1 finished before it could be killed"

    second = run_until(execute_command(root, "attempt2", "train_model", cp_b, cp_a), env, os.path.join(root, "log2"),
                       lambda: complete_checkpoint(cp_b) is not None, sig=signal.SIGTERM)
    assert second.signalled, second.stderr[-3000:]
    error = read_error(os.path.join(root, "attempt2", "out"))
    assert error.kind == error.RECOVERABLE, error.message
    assert "Preempted" in error.message and "resumes from the newest checkpoint" in error.message
    assert f"checkpoint-{step_a}" in second.stderr  # restored from A (and re-saved to B at once)
    assert ckpt.checkpoint_step(complete_checkpoint(cp_b)) >= step_a

    third = run(execute_command(root, "attempt3", "train_model", cp_c, cp_b), env, os.path.join(root, "log3"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert not os.path.exists(os.path.join(root, "attempt3", "out", "error.pb")), third.stderr[-3000:]
    resumed = re.search(r"resuming from \S+/checkpoint-(\d+)", third.stderr)
    assert resumed and int(resumed.group(1)) >= step_a, third.stderr[-3000:]
    model_dir = read_outputs(os.path.join(root, "attempt3", "out"))["model"]
    assert_same_weights(model_dir, reference["weights"])
    assert_history_continuous(model_dir)
    # the Flyte checkpoint holds the newest complete checkpoint only
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(cp_c)] == [f"checkpoint-{MAX_STEPS}"]
    assert complete_checkpoint(cp_c)
    with open(os.path.join(root, "attempt3", "out", "deck.html"), encoding="utf-8") as f:
        assert_log_history_deck(f.read())


def test_bad_config_fails_without_retry_and_names_the_key(tmp_path, reference):
    """A config error is non-recoverable on a cluster; on the command line an unknown key is refused."""
    from flytekit.types.directory import FlyteDirectory

    from workflows.config import DataConfig, PipelineConfig

    root = str(tmp_path)
    bad = PipelineConfig(data=DataConfig(val_fraction=0.9))  # built directly: nothing validated it yet
    write_inputs(os.path.join(root, "inputs.pb"),
                 {"config": bad, "data": FlyteDirectory(reference["data"]), "workdir": "", "fingerprint": "bad"},
                 {"config": PipelineConfig, "data": FlyteDirectory, "workdir": str, "fingerprint": str})
    env = flyte_env(tmp_path)
    cli = subprocess.Popen(
        [os.path.join(BIN, "pyflyte"), "run", "workflows/training.py", "training_workflow",
         "--config", json.dumps({"training": {"max_step": 5}})],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    attempt = run(execute_command(root, "attempt1", "train_model", os.path.join(root, "cp"), ""), env,
                  os.path.join(root, "log"))
    cli_output = cli.communicate(timeout=400)[0]

    assert attempt.returncode == 0  # pyflyte-execute reports the failure in error.pb, as on a cluster
    error = read_error(os.path.join(root, "attempt1", "out"))
    assert error.kind == error.NON_RECOVERABLE, error.message
    assert "invalid training config: data.val_fraction" in error.message
    assert "ConfigError" in error.message
    assert cli.returncode != 0
    assert "unknown config key(s) training.max_step" in " ".join(cli_output.split())


# -- serialisation for a cluster -----------------------------------------------------------------------------------
def test_every_workflow_serialises_for_a_cluster(tmp_path):
    from flyteidl.admin import task_pb2, workflow_pb2

    package = tmp_path / "flyte-package.tgz"
    result = run([os.path.join(BIN, "pyflyte"), "--pkgs", "workflows", "package", "--image",
                  "localhost:30000/flytrain:default", "-o", str(package), "--force"],
                 flyte_env(tmp_path), str(tmp_path / "log"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tasks, workflows, tuning = {}, {}, set()
    with tarfile.open(package) as tar:
        for member in tar.getmembers():
            # <n>_<module>.<name>_<kind>.pb: kind 1 is a task, 2 a workflow, 3 its launch plan
            match = re.fullmatch(r"\d+_workflows\.(training|distributed|tuning)\.(\w+)_([123])\.pb", member.name)
            assert match, member.name
            module, name, kind = match.groups()
            data = tar.extractfile(member).read()
            if module == "tuning":
                tuning.add((name, kind))
            elif kind == "1":
                tasks[name] = task_pb2.TaskSpec.FromString(data).template
            elif kind == "2":
                workflows[name] = workflow_pb2.WorkflowSpec.FromString(data).template
    assert ("tuning_workflow", "2") in tuning  # the tuning workflow (workflows/tuning.py) registers too
    assert set(tasks) == {"resolve_run", "prepare_data", "train_model", "train_model_distributed", "evaluate_model"}
    assert set(workflows) == {"training_workflow", "distributed_training_workflow"}
    for template in tasks.values():
        assert template.container.image.startswith("localhost:30000/flytrain:")  # the ImageSpec, never built
    from workflows.flyte_cache import CACHE_VERSION

    assert set(tasks) >= {"resolve_run"} and not tasks["resolve_run"].metadata.discoverable
    for name in ("prepare_data", "train_model", "train_model_distributed"):
        meta = tasks[name].metadata
        assert meta.discoverable and meta.discovery_version == CACHE_VERSION, name
    assert sorted(tasks["prepare_data"].metadata.cache_ignore_input_vars) == ["source", "source_dir"]
    for name in ("train_model", "train_model_distributed"):
        meta = tasks[name].metadata
        assert meta.retries.retries >= 2 and meta.interruptible and meta.generates_deck.value
        assert sorted(meta.cache_ignore_input_vars) == ["config", "workdir"]
    assert tasks["evaluate_model"].metadata.generates_deck.value
    # cached on everything it reads (the whole config: it reports to the trackers and registers the model)
    meta = tasks["evaluate_model"].metadata
    assert meta.discoverable and meta.discovery_version == CACHE_VERSION and not meta.cache_ignore_input_vars
    assert {n.task_node.reference_id.name.split(".")[-1] for n in workflows["distributed_training_workflow"].nodes} \
        == {"resolve_run", "prepare_data", "train_model_distributed", "evaluate_model"}


# -- the distributed variant -----------------------------------------------------------------------------------------
def test_elastic_task_runs_two_processes_locally(tmp_path):
    config = json.loads(json.dumps(SMALL))
    config["training"].update(max_steps=20, logging_steps=5, eval_steps=5, report_to=["flyte"])
    env = flyte_env(tmp_path)
    result = run([os.path.join(BIN, "pyflyte"), "run", "workflows/distributed.py", "distributed_training_workflow",
                  "--config", json.dumps(config)], env, str(tmp_path / "log"))
    assert result.returncode == 0, result.stderr[-3000:]
    model_dir = re.search(r"model=(\S+?),", result.stdout).group(1)
    with open(os.path.join(model_dir, "log_history.json")) as f:
        history = json.load(f)
    with open(os.path.join(model_dir, "meta.json")) as f:
        n_train = json.load(f)["sizes"]["train"]
    # each of the 2 ranks loads half the training set: 20 steps cover twice the epochs of one process
    single_epochs = 20 / -(-n_train // 32)
    assert history[-1]["epoch"] == pytest.approx(2 * single_epochs, rel=0.1)
    assert history[-1]["step"] == 20
    decks = find_files(env["TMPDIR"], "deck.html")
    assert decks, "rank 0's deck was not written"
    with open(decks[-1], encoding="utf-8") as f:
        assert_log_history_deck(f.read())
