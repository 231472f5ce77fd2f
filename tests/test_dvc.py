"""The DVC entry point (dvc.yaml, params.yaml) driven by the real `dvc` and `git` in a temporary copy of the project."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.browser import inked, pixels_near, requires_chromium, screenshot
from trainer_lib.checkpoint import checkpoint_step, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SOURCES = ["trainer_lib", "callbacks", "workflows", "data/raw", "dvc.yaml", "params.yaml", ".dvcignore",
           ".gitignore", "pyproject.toml"]
MAX_STEPS = 2000
#: a small job (about 2 s of training) whose checkpoints come often enough to interrupt it in the middle
SMALL = {
    "model": {"hidden_sizes": [64]},
    "training": {
        "max_steps": MAX_STEPS, "per_device_train_batch_size": 16, "logging_steps": 100,
        "eval_strategy": "steps", "eval_steps": 500, "save_strategy": "steps", "save_steps": 100,
    },
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the stages' `python` is this venv's
    env.update(
        DVC_NO_ANALYTICS="1",
        OMP_NUM_THREADS="1",  # on a busy shared CPU one thread is ~10x faster than spinning ones
        PYTHONDONTWRITEBYTECODE="1",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


def run(repo: Path, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    """Run a command in ``repo``; stdout and stderr together in ``.stdout``; fails the test on an unexpected rc."""
    if cmd[0] == "dvc":
        cmd = (str(VENV_BIN / "dvc"), *cmd[1:])
    proc = subprocess.run(cmd, cwd=repo, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}")
    return proc


def digests(repo: Path) -> dict[str, str]:
    """SHA-256 of every model file and metric/plot file (not provenance.json: it records when and where it ran)."""
    files = sorted(p for p in (repo / "models" / "model").iterdir() if p.name != "provenance.json")
    files += sorted((repo / "metrics").glob("*.*"))
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def resumed_from(output: str) -> list:
    """The ``resumed_from`` of each train stage run in a `dvc repro` output (the stage prints its result JSON)."""
    return [json.loads(line)["resumed_from"] for line in output.splitlines() if line.startswith('{"global_step"')]


def write_params(repo: Path, changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def restore(repo: Path) -> None:
    """Back to the committed baseline as a fresh clone has it: git files (the cache: false metrics, plots and DVCLive
    logs), DVC-tracked data and model from the cache, no checkpoints (the train stage's untracked side folder).
    Commits a test made (the CSV test commits its params and data) are dropped too: no test sees another's."""
    run(repo, "git", "reset", "--hard", "-q", "baseline")
    run(repo, "git", "clean", "-fdq")
    run(repo, "dvc", "checkout", "--force", "-q")
    for side in [repo / "checkpoints", *repo.glob("checkpoints.previous*")]:
        shutil.rmtree(side, ignore_errors=True)


def test_params_yaml_is_the_whole_default_config():
    """The DVC job is the default job: same schema and values as the Flyte workflow's default input."""
    from workflows.config import PipelineConfig, SearchConfig

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw.pop("search") == SearchConfig().to_dict()  # the search space: read by the tuning entry points only
    assert raw == PipelineConfig().to_dict()
    assert PipelineConfig.load(str(ROOT / "params.yaml")) == PipelineConfig()
    assert SearchConfig.load(str(ROOT / "params.yaml")) == SearchConfig()


def copy_project(repo: Path) -> None:
    """The project's tracked sources (SOURCES) into ``repo``, without bytecode."""
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(source, repo / name)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git + DVC repository holding a copy of the project, reproduced once with a small params.yaml."""
    repo = tmp_path_factory.mktemp("dvc") / "project"
    repo.mkdir()
    copy_project(repo)
    write_params(repo, SMALL)
    run(repo, "git", "init", "-q")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "config", "core.analytics", "false")
    run(repo, "dvc", "config", "core.check_update", "false")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "project")
    first = run(repo, "dvc", "repro")
    checkpoints = [checkpoint_step(p) for p in list_checkpoints(str(repo / "checkpoints"))]
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline")
    run(repo, "git", "tag", "baseline")  # restore() returns here, whatever a test committed after it
    return {"repo": repo, "first": first.stdout, "digests": digests(repo), "checkpoints": checkpoints,
            "lock": (repo / "dvc.lock").read_bytes()}


def test_repro_writes_outputs_and_a_second_repro_does_nothing(project):
    repo = project["repo"]
    restore(repo)
    for stage in ("prepare", "train", "evaluate"):
        assert f"Running stage '{stage}'" in project["first"]
    assert resumed_from(project["first"]) == [None]
    assert sorted(p.name for p in (repo / "data" / "prepared").iterdir()) == [
        "meta.json", "test.npz", "train.npz", "val.npz"]
    assert (repo / "models" / "model" / "model.safetensors").stat().st_size > 0
    assert project["checkpoints"][-1] == MAX_STEPS
    train = json.loads((repo / "metrics" / "train.json").read_text())
    assert train["global_step"] == MAX_STEPS
    assert json.loads((repo / "metrics" / "metrics.json").read_text())["test_accuracy"] > 0.8
    assert (repo / "metrics" / "confusion.csv").read_text().startswith("actual,predicted\n")

    # each stage records exactly the params it reads
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert list(lock["prepare"]["params"]["params.yaml"]) == ["data"]
    assert sorted(lock["train"]["params"]["params.yaml"]) == ["model.dropout", "model.hidden_sizes", "training"]
    assert sorted(lock["evaluate"]["params"]["params.yaml"]) == [
        "model.registered_alias", "model.registered_name", "training.per_device_eval_batch_size",
        "training.strict_integrations"]

    # no checkpoints here (as in a fresh clone): they are not an output, so nothing is out of date
    again = run(repo, "dvc", "repro").stdout
    assert "Data and pipelines are up to date" in again
    assert "Running stage" not in again
    assert json.loads(run(repo, "dvc", "status", "--json").stdout) == {}


def test_metrics_show_and_plots_show(project, tmp_path):
    repo = project["repo"]
    restore(repo)
    shown = json.loads(run(repo, "dvc", "metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]
    evaluated = json.loads((repo / "metrics" / "metrics.json").read_text())
    assert metrics["metrics/metrics.json"]["data"]["test_accuracy"] == evaluated["test_accuracy"]
    assert metrics["metrics/train.json"]["data"]["global_step"] == MAX_STEPS
    live = metrics["dvclive/metrics.json"]["data"]  # DVCLive's summary: the last logged values, no timings
    assert live["step"] == MAX_STEPS and 0 < live["eval"]["accuracy"] <= 1 and "runtime" not in live["eval"]

    listing = json.loads(run(repo, "dvc", "plots", "show", "--json").stdout)
    assert not listing.get("errors"), listing["errors"]
    plots = listing.get("data", listing)
    images = {f"metrics/plots/{name}" for name in ("loss.svg", "accuracy.svg", "learning_rate.svg", "confusion.svg")}
    live_plots = {f"dvclive/plots/metrics/{name}.tsv" for name in ("train/loss", "eval/loss", "eval/accuracy")}
    assert {"Training loss", "Learning rate", "Validation loss", "Validation accuracy",
            "Test confusion matrix"} | images | live_plots <= set(plots), sorted(plots)
    assert all(plots[name][0]["type"] == "image" for name in images)
    assert not any("runtime" in name or "per_second" in name for name in plots)

    run(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "Test confusion matrix" in html and "eval_accuracy" in html and '"predicted"' in html
    # the static charts are embedded as local images: they render on a machine with no network
    sources = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(sources) == len(images), sources
    for source in sources:
        assert "://" not in source and not source.startswith("//")
        svg = (tmp_path / "plots" / source).read_text()
        assert svg.startswith("<svg") and "http" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")


@requires_chromium
def test_plots_show_page_renders_its_static_charts_with_no_network(project, tmp_path):
    """`dvc plots show`'s page in headless Chromium with every request refused (no CDN for Vega): the static
    charts (loss curves, confusion matrix) are still drawn, in the colours only they use."""
    repo = project["repo"]
    restore(repo)
    run(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    page = tmp_path / "plots" / "index.html"
    pixels = screenshot(str(page), str(tmp_path / "plots.png"), size=(1400, 2400))
    assert inked(pixels) > 0.01 * pixels.shape[0] * pixels.shape[1], "the page rendered (almost) blank"
    # workflows/plots.py's colours (the Vega plots draw nothing offline): the training and validation loss lines,
    # and the heat map's darkest cells (its diagonal)
    for what, colour in (("training loss", (0, 114, 178)), ("validation loss", (230, 159, 0)),
                         ("confusion diagonal", (8, 81, 156))):
        assert pixels_near(pixels, colour, tolerance=24) > 300, f"{what}: not drawn in {page}"


def test_a_training_param_change_reruns_train_and_evaluate_but_not_prepare(project):
    repo = project["repo"]
    restore(repo)
    write_params(repo, {"training": {"learning_rate": 0.002}})
    diff = json.loads(run(repo, "dvc", "params", "diff", "--json").stdout)
    changed = diff["params.yaml"]["training.learning_rate"]
    assert (changed["old"], changed["new"]) == (0.001, 0.002)
    output = run(repo, "dvc", "repro").stdout
    assert "Stage 'prepare' didn't change, skipping" in output
    assert "Running stage 'train'" in output and "Running stage 'evaluate'" in output
    assert resumed_from(output) == [None]  # the old config's checkpoints are set aside, not resumed
    assert digests(repo)["models/model/model.safetensors"] != project["digests"]["models/model/model.safetensors"]


def test_a_forced_repro_of_the_same_run_leaves_dvc_lock_and_status_unchanged(project):
    repo = project["repo"]
    restore(repo)
    output = run(repo, "dvc", "repro", "--force").stdout
    assert "Running stage 'train'" in output and resumed_from(output) == [None]
    assert digests(repo) == project["digests"]
    assert (repo / "dvc.lock").read_bytes() == project["lock"]
    assert json.loads(run(repo, "dvc", "status", "--json").stdout) == {}
    assert run(repo, "git", "status", "--porcelain").stdout == ""  # metrics, plots and DVCLive logs: same bytes


@pytest.mark.slow
def test_repro_force_twice_gives_byte_identical_model_and_metrics(project):
    repo = project["repo"]
    restore(repo)
    for _ in range(2):
        output = run(repo, "dvc", "repro", "--force").stdout
        assert "Running stage 'train'" in output
        assert resumed_from(output) == [None]  # a finished run is trained again from scratch, not resumed
        assert digests(repo) == project["digests"]
        assert (repo / "dvc.lock").read_bytes() == project["lock"]


def interrupt_repro(repo: Path, tmp_path: Path) -> list[int]:
    """Start `dvc repro` with the model removed (train must run) and kill it at its first checkpoint; returns the
    steps of the checkpoints it left."""
    shutil.rmtree(repo / "models" / "model")  # train must run; no checkpoints yet (restore removed them)
    log_path = tmp_path / "interrupted.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(VENV_BIN / "dvc"), "repro"], cwd=repo, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:  # no time limit: the first checkpoint (or the process ending without one) decides
            while not list_checkpoints(str(repo / "checkpoints")):
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.01)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    saved = [checkpoint_step(p) for p in list_checkpoints(str(repo / "checkpoints"))]
    assert saved and max(saved) < MAX_STEPS, f"training was not interrupted in the middle: {saved}"
    assert not (repo / "models" / "model").exists()
    return saved


def test_an_interrupted_repro_resumes_from_its_last_checkpoint(project, tmp_path):
    repo = project["repo"]
    restore(repo)
    saved = interrupt_repro(repo, tmp_path)

    output = run(repo, "dvc", "repro").stdout
    (start,) = resumed_from(output)
    assert start is not None and checkpoint_step(start) >= max(saved) and checkpoint_step(start) < MAX_STEPS
    step = checkpoint_step(start)
    assert re.search(rf"^resuming from checkpoint-{step} \(step {step} of {MAX_STEPS}, epoch [0-9.]+\)$", output,
                     re.MULTILINE), output  # the stage says so before training
    # the resumed model is the uninterrupted one (provenance.json, which records the attempt, is out of its hash)
    assert "Stage 'evaluate' didn't change, skipping" in output
    assert digests(repo) == project["digests"]


def test_exp_run_with_a_set_param_is_listed_by_exp_show(project):
    repo = project["repo"]
    restore(repo)
    run(repo, "dvc", "exp", "run", "-S", "training.learning_rate=0.002")
    rows = json.loads(run(repo, "dvc", "exp", "show", "--json").stdout)
    experiments = [rev for row in rows for exp in (row.get("experiments") or []) for rev in exp["revs"]]
    found = [e["data"] for e in experiments
             if e["data"]["params"]["params.yaml"]["data"]["training"]["learning_rate"] == 0.002]
    assert found, rows
    metrics = found[0]["metrics"]["metrics/metrics.json"]["data"]
    assert metrics == json.loads((repo / "metrics" / "metrics.json").read_text())  # applied to the workspace
    assert metrics["test_accuracy"] > 0.8
    live = found[0]["metrics"]["dvclive/metrics.json"]["data"]  # DVCLive's summary is an experiment column too
    assert live == json.loads((repo / "dvclive" / "metrics.json").read_text())
    assert live["step"] == MAX_STEPS and live["train"]["learning_rate"] == pytest.approx(0.002 / MAX_STEPS)  # the rate the last step used


def _blobs(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    centers = {"circle": (0, 0, 0, 0, 0), "square": (4, 4, 0, 0, 0), "star": (0, 4, 4, 0, 4)}
    rows = ["f1,f2,f3,f4,f5,shape"]
    for i in range(n):
        name = list(centers)[i % 3]
        point = rng.normal(centers[name], 0.7)
        rows.append(",".join(f"{v:.4f}" for v in point) + f",{name}")
    return "\n".join(rows) + "\n"


def test_a_csv_source_tracked_with_dvc_add(project):
    repo = project["repo"]
    restore(repo)
    csv = repo / "data" / "raw" / "shapes.csv"
    csv.write_text(_blobs(240, seed=1))
    run(repo, "dvc", "add", "data/raw/shapes.csv")
    assert (repo / "data" / "raw" / "shapes.csv.dvc").is_file()
    assert run(repo, "git", "check-ignore", "data/raw/shapes.csv").returncode == 0  # git keeps only the pointer
    assert run(repo, "git", "check-ignore", "data/raw/shapes.csv.dvc", ok=False).returncode == 1
    write_params(repo, {"data": {"source": "data/raw/shapes.csv", "label_column": "shape"},
                        "training": {"max_steps": 300}})
    output = run(repo, "dvc", "repro").stdout
    assert "Running stage 'prepare'" in output
    meta = json.loads((repo / "data" / "prepared" / "meta.json").read_text())
    assert meta["classes"] == ["circle", "square", "star"] and meta["n_features"] == 5
    assert sum(meta["sizes"].values()) == 240
    assert json.loads((repo / "metrics" / "metrics.json").read_text())["test_accuracy"] > 0.9

    # new data (same params): prepare reruns, and train starts over rather than resuming the finished run
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "shapes")
    csv.write_text(_blobs(300, seed=2))
    run(repo, "dvc", "add", "data/raw/shapes.csv")
    status = json.loads(run(repo, "dvc", "status", "--json").stdout)
    assert {"changed deps": {"data/raw": "modified"}} in status["prepare"]
    output = run(repo, "dvc", "repro").stdout
    assert "Running stage 'prepare'" in output and resumed_from(output) == [None]
    assert sum(json.loads((repo / "data" / "prepared" / "meta.json").read_text())["sizes"].values()) == 300


@pytest.mark.parametrize(
    "change, key",
    [
        ({"training": {"learnig_rate": 0.01}}, "training.learnig_rate"),
        ({"training": {"per_device_train_batch_size": -8}}, "training.per_device_train_batch_size"),
        ({"data": {"val_fraction": "lots"}}, "data.val_fraction"),
    ],
)
def test_bad_params_stop_the_pipeline_with_an_error_naming_the_key(project, change, key):
    repo = project["repo"]
    restore(repo)
    write_params(repo, change)
    proc = run(repo, "dvc", "repro", ok=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert errors and key in errors[0], proc.stdout


def test_a_params_change_after_an_interrupted_repro_trains_from_scratch_and_says_so(project, tmp_path):
    """The unfinished run's checkpoints belong to the old config: set aside (named, with the difference), never
    resumed."""
    repo = project["repo"]
    restore(repo)
    saved = interrupt_repro(repo, tmp_path)
    write_params(repo, {"training": {"learning_rate": 0.002}})
    output = run(repo, "dvc", "repro").stdout
    assert resumed_from(output) == [None]
    (notice,) = [line for line in output.splitlines() if "belong to another run" in line]
    assert "learning_rate: 0.001 in the checkpoint, 0.002 now" in notice and "training from scratch" in notice
    assert sorted(checkpoint_step(p) for p in list_checkpoints(str(repo / "checkpoints.previous"))) == saved
    assert checkpoint_step(list_checkpoints(str(repo / "checkpoints"))[-1]) == MAX_STEPS  # the new run, whole
