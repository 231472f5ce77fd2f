"""The embedded default job and the config loader."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from workflows import pipeline
from workflows.config import ConfigError, PipelineConfig


def test_default_job_reaches_97_percent(tmp_path):
    metrics = pipeline.run(PipelineConfig(), str(tmp_path))
    assert metrics["test_accuracy"] >= 0.97
    written = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert written == metrics
    assert (tmp_path / "model" / "model.safetensors").is_file()
    lines = (tmp_path / "metrics" / "confusion.csv").read_text().splitlines()
    assert lines[0] == "actual,predicted" and len(lines) == 1 + 270


def test_run_command_prints_accuracy(tmp_path):
    cfg = tmp_path / "params.yaml"
    cfg.write_text("training:\n  max_steps: 30\n  eval_strategy: 'no'\n  save_strategy: 'no'\n")
    out = subprocess.run([sys.executable, "-m", "workflows", "--params", str(cfg), "run", "--workdir",
                          str(tmp_path / "w")], capture_output=True, text=True, check=True)
    assert "test accuracy:" in out.stdout


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"training": {"learnig_rate": 1}}, "training.learnig_rate"),
        ({"trainig": {}}, "trainig"),
        ({"training": {"per_device_train_batch_size": "32"}}, "training.per_device_train_batch_size"),
        ({"training": {"per_device_train_batch_size": -4}}, "training.per_device_train_batch_size"),
        ({"model": {"hidden_sizes": [0]}}, "model.hidden_sizes"),
        ({"model": {"dropout": 1.5}}, "model.dropout"),
        ({"data": {"test_fraction": 0.9}}, "data.test_fraction"),
        ({"training": {"report_to": "mlflow"}}, "training.report_to"),
    ],
)
def test_bad_config_names_the_key(tmp_path, data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        cfg = PipelineConfig.from_dict(data)
        pipeline.training_arguments(cfg, str(tmp_path))


def test_cli_rejects_bad_params_with_exit_2(tmp_path):
    cfg = tmp_path / "params.yaml"
    cfg.write_text("training:\n  learnig_rate: 0.1\n")
    proc = subprocess.run([sys.executable, "-m", "workflows", "--params", str(cfg), "prepare", "--data-dir",
                           str(tmp_path / "d")], capture_output=True, text=True)
    assert proc.returncode == 2 and "training.learnig_rate" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_csv_source_and_missing_label_column(tmp_path):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(120, 4)), columns=list("abcd"))
    frame["label"] = (frame["a"] > 0).map({True: "pos", False: "neg"})
    frame.to_csv(tmp_path / "data.csv", index=False)
    cfg = PipelineConfig.from_dict({"data": {"source": str(tmp_path / "data.csv")}})
    meta = pipeline.prepare(cfg, str(tmp_path / "prepared"))
    assert meta["classes"] == ["neg", "pos"] and meta["n_features"] == 4
    bad = PipelineConfig.from_dict({"data": {"source": str(tmp_path / "data.csv"), "label_column": "target"}})
    with pytest.raises(ConfigError, match="label_column"):
        pipeline.prepare(bad, str(tmp_path / "prepared2"))
    missing = PipelineConfig.from_dict({"data": {"source": str(tmp_path / "nope.csv")}})
    with pytest.raises(ConfigError, match="nope.csv"):
        pipeline.prepare(missing, str(tmp_path / "prepared3"))
