"""Secrets in task inputs never reach what Flyte renders: the Input decks (flytekit writes ``str(input)``), flytekit's
"Invoking <task> with inputs" log line, the console of ``pyflyte run`` and its errors. Real ``pyflyte run`` with
decks on, a canary password in a URL.

What flytekit cannot be told to hide: a remote execution's inputs as Flyte stores and shows them (the console's
Inputs tab). The config schema is strict (no field is named like a
credential), so only a URL with a password in a string value could carry one there: keep credentials in the
environment / Flyte secrets, never in the config (README, Flyte).
"""

from __future__ import annotations

import os
import uuid

import pytest
import yaml

from tests.flyte_helpers import find_files, pyflyte_run


def _written(root: str, needle: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    hits = []
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                if needle.encode() in f.read():
                    hits.append(path)
    return hits


@pytest.mark.timeout(300)
def test_a_url_password_in_the_config_is_masked_in_the_input_decks_and_the_console(tmp_path):
    canary = f"canary{uuid.uuid4().hex}"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"training": {
        "max_steps": 5, "eval_strategy": "no", "save_strategy": "no", "report_to": ["none"],
        "run_name": f"https://flytrain:{canary}@example.invalid/run"}}))
    # at INFO flytekit logs "Invoking <task> with inputs: {...}" (the inputs' repr) for every task
    proc, output, _ = pyflyte_run(tmp_path, "--config", str(config), FLYTE_SDK_LOGGING_LEVEL="20")
    assert proc.returncode == 0, output[-3000:]
    assert "with inputs:" in output and "https://flytrain:***@example.invalid/run" in output, output[-3000:]
    decks = find_files(str(tmp_path / "tmp"), "deck.html")
    assert len(decks) == 2, output[-2000:]  # train_model's and evaluate_model's, each with an Input deck
    for deck in decks:
        with open(deck, encoding="utf-8") as f:
            html = f.read()
        assert "run_name=&#x27;https://flytrain:***@example.invalid/run&#x27;" in html or \
            "run_name='https://flytrain:***@example.invalid/run'" in html, deck  # the config was rendered, masked
    assert canary not in output
    assert _written(str(tmp_path), canary) == [str(config)]  # only the file the user wrote holds it


@pytest.mark.timeout(300)
def test_a_url_password_in_data_source_is_masked_in_the_error(tmp_path):
    canary = f"canary{uuid.uuid4().hex}"
    source = f"https://flytrain:{canary}@example.invalid/train.csv"
    proc, output, _ = pyflyte_run(tmp_path, "--config", f'{{"data": {{"source": "{source}"}}}}')
    assert proc.returncode != 0, output[-3000:]
    assert "https://flytrain:***@example.invalid/train.csv" in " ".join(output.replace("│", " ").split())
    assert canary not in output
    assert not _written(str(tmp_path), canary)
