"""CodeCarbon: an offline tracker around the training writes one emissions.csv row into output_dir."""

from __future__ import annotations

import csv
import subprocess
import sys

from tests.helpers import digits, make_model
from trainer_lib import Trainer, TrainingArguments


def test_emissions_csv_has_one_row_for_the_training(tmp_path, monkeypatch):
    monkeypatch.setenv("CODECARBON_COUNTRY", "fra")
    train, _ = digits(256, 64)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=10, logging_steps=5, save_strategy="no",
        per_device_train_batch_size=16, report_to=["codecarbon"], disable_tqdm=True, strict_integrations=True,
        run_name="carbon-run",
    )
    Trainer(make_model(), args, train_dataset=train).train()

    with open(tmp_path / "out" / "emissions.csv", encoding="utf-8", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["emissions"]) >= 0 and float(row["energy_consumed"]) > 0
    assert float(row["duration"]) > 0
    assert row["country_iso_code"] == "FRA"
    assert row["project_name"] == "carbon-run"


def test_importing_the_integrations_imports_no_tracker():
    code = (
        "import sys\n"
        "import callbacks.tensorboard, callbacks.wandb, callbacks.dvclive, callbacks.codecarbon\n"
        "loaded = [m for m in ('tensorboard', 'wandb', 'dvclive', 'dvc', 'codecarbon') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
