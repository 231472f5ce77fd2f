"""DVCLive: metrics.json, params.yaml and the plot .tsv files read back; steps are global steps, also after resume."""

from __future__ import annotations

import csv
import json
import subprocess
from functools import partial

import pytest

from tests.helpers import make_trainer as shared_trainer

SECRET = "dl-s3cr3t-value-42"


@pytest.fixture
def git_repo(tmp_path, monkeypatch):
    """Work inside a fresh Git repository without DVC: DVCLive must not turn it into a DVC repository."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)
    for name in ("HF_DVCLIVE_LOG_MODEL", "DVCLIVE_RESUME", "DVC_ROOT", "DVCLIVE_TEST"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


make_trainer = partial(shared_trainer, report_to=["dvclive"], extra={"service_token": SECRET})


def rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return [(int(r["step"]), float(r[path.stem])) for r in csv.DictReader(f, delimiter="\t")]


def logged(trainer, key):
    return [(e["step"], pytest.approx(e[key], rel=1e-6)) for e in trainer.state.log_history if key in e]


def test_metrics_params_and_plots_use_global_steps(git_repo):
    trainer = make_trainer(git_repo / "out")
    trainer.train()
    live_dir = git_repo / "out" / "dvclive"

    plots = live_dir / "plots" / "metrics"
    assert rows(plots / "train" / "loss.tsv") == logged(trainer, "loss")
    assert [s for s, _ in rows(plots / "train" / "loss.tsv")] == [5, 10, 15, 20]
    assert rows(plots / "eval" / "accuracy.tsv") == logged(trainer, "eval_accuracy")
    epoch_steps = [s for s, _ in rows(plots / "train" / "epoch.tsv")]
    assert epoch_steps == sorted(set(epoch_steps))
    assert not (plots / "train" / "train_runtime.tsv").exists()  # one-off values live in metrics.json only

    summary = json.loads((live_dir / "metrics.json").read_text())
    assert summary["step"] == 20
    assert summary["train"]["loss"] == logged(trainer, "loss")[-1][1]
    assert summary["eval"]["accuracy"] == logged(trainer, "eval_accuracy")[-1][1]
    assert summary["train"]["train_runtime"] > 0

    from ruamel.yaml import YAML  # YAML 1.2, as DVC reads params ("5e-05" is a number there, not in PyYAML)

    params = YAML(typ="safe").load((live_dir / "params.yaml").read_text())
    assert params["learning_rate"] == trainer.args.learning_rate
    assert params["model.hidden"] == 32
    assert SECRET not in (live_dir / "params.yaml").read_text()

    assert not (git_repo / ".dvc").exists() and not (git_repo / "dvc.yaml").exists()


def test_resume_continues_the_logs_without_duplicated_steps(git_repo):
    out = git_repo / "out"
    first = make_trainer(out)
    first.train()  # goes to step 20: its rows after step 10 must be replaced by the resumed run's
    plots = out / "dvclive" / "plots" / "metrics"
    (plots / "train" / "ghost.tsv").write_text("step\tghost\n5\t1.0\n15\t2.0\n")  # a metric only the old run had

    resumed = make_trainer(out, shuffled_data=True)  # other batches: steps 11-20 differ from the first run's
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-10"))

    loss = rows(plots / "train" / "loss.tsv")
    assert [s for s, _ in loss] == [5, 10, 15, 20]
    assert loss[:2] == logged(first, "loss")[:2]
    assert loss[2:] == [row for row in logged(resumed, "loss") if row[0] > 10]
    assert loss[2:] != logged(first, "loss")[2:]
    assert [s for s, _ in rows(plots / "eval" / "accuracy.tsv")] == [10, 20]
    assert rows(plots / "train" / "ghost.tsv") == [(5, 1.0)]
    summary = json.loads((out / "dvclive" / "metrics.json").read_text())
    assert summary["step"] == 20 and summary["train"]["ghost"] == 1.0
    assert summary["train"]["loss"] == pytest.approx(loss[-1][1])


def dvc_dir_listing(repo, dvc_file) -> dict[str, str]:
    """relpath -> md5 of the folder a .dvc file tracks, read from the DVC cache's .dir entry."""
    from ruamel.yaml import YAML

    (out,) = YAML(typ="safe").load(dvc_file.read_text())["outs"]
    md5 = out["md5"]
    entries = json.loads((repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).read_text())
    return {entry["relpath"]: entry["md5"] for entry in entries}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("log_model", ["true", "all", "false"])
def test_log_model_tracks_the_model_with_dvc(git_repo, monkeypatch, log_model):
    import hashlib
    import sys

    from safetensors.torch import load_file

    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True, cwd=git_repo)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "dvc"], check=True,
                   cwd=git_repo)
    monkeypatch.setenv("HF_DVCLIVE_LOG_MODEL", log_model)
    out = git_repo / "out"
    trainer = make_trainer(out, max_steps=4, save_steps=2, logging_steps=2, eval_strategy="no")
    trainer.train()

    dvc_files = sorted(p.relative_to(git_repo).as_posix() for p in git_repo.rglob("*.dvc") if p.is_file())
    assert not list(git_repo.rglob("dvc.yaml"))  # never writes dvc.yaml
    if log_model == "false":
        assert dvc_files == []
    elif log_model == "true":  # the final model, copied into the live folder and tracked by DVC
        assert dvc_files == ["out/dvclive/artifacts/last.dvc"]
        listing = dvc_dir_listing(git_repo, out / "dvclive" / "artifacts" / "last.dvc")
        assert set(listing) == {"model.safetensors", "config.json"}
        weights = out / "dvclive" / "artifacts" / "last" / "model.safetensors"
        assert listing["model.safetensors"] == hashlib.md5(weights.read_bytes()).hexdigest()
        saved = load_file(str(weights))
        assert all(saved[k].equal(v) for k, v in trainer.model.state_dict().items())
    else:  # all: the output folder, every checkpoint in it, tracked at each checkpoint
        assert dvc_files == ["out.dvc"]
        listing = dvc_dir_listing(git_repo, git_repo / "out.dvc")
        assert {"checkpoint-2/model.safetensors", "checkpoint-4/model.safetensors"} <= set(listing)
        assert listing["checkpoint-4/model.safetensors"] == hashlib.md5(
            (out / "checkpoint-4" / "model.safetensors").read_bytes()).hexdigest()


def test_no_studio_payload_is_gathered_when_studio_is_not_configured(git_repo, monkeypatch):
    """DVCLive builds its Studio payload (params.yaml parsed, every plot file re-read) at each sync and drops it when
    Studio is off; the callback skips that work. Counted on DVCLive's own method, the metrics still all written."""
    from dvclive import Live

    for name in ("DVC_STUDIO_TOKEN", "STUDIO_TOKEN", "DVC_STUDIO_URL", "DVC_STUDIO_REPO_URL"):
        monkeypatch.delenv(name, raising=False)
    gathered = []
    original = Live._get_live_data
    monkeypatch.setattr(Live, "_get_live_data", lambda self: gathered.append(self.step) or original(self))
    trainer = make_trainer(git_repo / "out")
    trainer.train()
    assert gathered == []
    live_dir = git_repo / "out" / "dvclive"
    assert rows(live_dir / "plots" / "metrics" / "train" / "loss.tsv") == logged(trainer, "loss")
    assert json.loads((live_dir / "metrics.json").read_text())["step"] == trainer.state.global_step


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_burst_writes_the_files_dvclive_writes_value_by_value(git_repo):
    """The callback appends a burst's plot rows once per metric file instead of DVCLive's one open per value: the
    plot files and metrics.json must be byte for byte what DVCLive's own ``log_metric`` writes for the same events
    (new and existing files, nested names, NaN and infinity, numpy scalars, summary-only values)."""
    import numpy as np

    from callbacks.dvclive import _live_class, append_plot_rows

    bursts = [
        [(10, {"train/loss": 2.25, "train/learning_rate": 1e-3, "eval/acc": np.float32(0.5)}),
         (20, {"train/loss": float("nan"), "train/learning_rate": 9e-4})],
        [(30, {"train/loss": float("inf"), "train/learning_rate": 8e-4, "eval/acc": np.float64(0.75)}),
         (40, {"train/loss": 0.125, "test/acc": 0.9})],
    ]
    lives = {}
    for way in ("per_value", "burst"):
        live = _live_class()(dir=str(git_repo / way), save_dvc_exp=False, dvcyaml=None)
        for burst in bursts:
            rows_by_metric: dict = {}
            for step, values in burst:
                live.step = step
                for key, value in values.items():
                    plot = not key.startswith("test/")
                    if way == "per_value":
                        live.log_metric(key, value, plot=plot)
                    else:
                        live.log_metric(key, value, plot=False)
                        if plot:
                            rows_by_metric.setdefault(key, []).append((step, value))
            if way == "burst":
                append_plot_rows(live, rows_by_metric)
            live.next_step()
        live.end()
        lives[way] = _tree(git_repo / way)
    assert "plots/metrics/train/loss.tsv" in lives["burst"]
    assert b"nan" in lives["burst"]["plots/metrics/train/loss.tsv"]
    assert lives["burst"] == lives["per_value"]
