"""Azure ML: azureml-core is an optional extra that is not installed here, so this checks how its absence is
reported, and the callback's logging against a run object passed in (Azure ML itself cannot run here)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from functools import partial

import pytest

from callbacks.azureml import AzureMLCallback
from tests.helpers import make_trainer as shared_trainer
from trainer_lib import TrainingArguments, resolve_report_to
from trainer_lib.state import TrainerControl, TrainerState

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
azureml_missing = pytest.mark.skipif(
    importlib.util.find_spec("azureml") is not None, reason="azureml is installed in this environment"
)


class RecordingRun:
    """Stands in for ``azureml.core.run.Run``: records the ``log`` calls the callback makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, str]] = []

    def log(self, name: str, value: float, description: str = "") -> None:
        self.calls.append((name, value, description))


make_trainer = partial(shared_trainer, max_steps=10, save_strategy="no")


@azureml_missing
def test_missing_azureml_core_is_unavailable_and_report_to_names_the_extra(tmp_path):
    assert AzureMLCallback.is_available() is False
    with pytest.raises(ImportError, match=r"pip install 'flytrain\[azure_ml\]'"):
        resolve_report_to(["azure_ml"])
    with pytest.raises(ImportError, match=r"report_to='azure_ml'.*pip install 'flytrain\[azure_ml\]'"):
        make_trainer(tmp_path / "out", report_to="azure_ml")


@azureml_missing
def test_availability_needs_azureml_core_not_just_the_azureml_namespace(tmp_path, monkeypatch):
    # other Azure packages (azureml-mlflow, ...) install into the same ``azureml`` namespace
    (tmp_path / "site" / "azureml" / "mlflow").mkdir(parents=True)
    (tmp_path / "site" / "azureml" / "mlflow" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert AzureMLCallback.is_available() is False
    (tmp_path / "site" / "azureml" / "core").mkdir()
    (tmp_path / "site" / "azureml" / "core" / "run.py").write_text("")
    importlib.invalidate_caches()
    assert AzureMLCallback.is_available() is True


def test_numeric_logs_go_to_the_given_run(tmp_path):
    run = RecordingRun()
    trainer = make_trainer(tmp_path / "out", callbacks=[AzureMLCallback(azureml_run=run)])
    trainer.train()
    expected = [(k, v, k) for entry in trainer.state.log_history for k, v in entry.items() if k != "step"]
    assert {"loss", "eval_accuracy", "train_runtime", "epoch"} <= {name for name, _, _ in expected}
    assert run.calls == expected


def test_only_world_process_zero_logs(tmp_path):
    run = RecordingRun()
    callback = AzureMLCallback(azureml_run=run)
    args = TrainingArguments(output_dir=str(tmp_path / "out"))
    logs = {"loss": 0.5, "learning_rate": 1e-3, "note": "text", "flag": True}
    callback.on_log(args, TrainerState(is_world_process_zero=False), TrainerControl(), logs=logs)
    assert run.calls == []
    callback.on_log(args, TrainerState(), TrainerControl(), logs=logs)
    assert run.calls == [("loss", 0.5, "loss"), ("learning_rate", 1e-3, "learning_rate")]


def test_tracker_modules_import_without_their_trackers():
    """``import callbacks.<tracker>`` stays cheap: comet_ml, neptune, clearml and azureml load only at setup."""
    code = (
        "import sys, callbacks.comet, callbacks.neptune, callbacks.clearml, callbacks.azureml\n"
        "loaded = [m for m in ('comet_ml', 'neptune', 'clearml', 'azureml') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
