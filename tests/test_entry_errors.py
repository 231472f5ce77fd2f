"""pyflyte run with a bad --config: refused as a short usage error naming the key, through the real pyflyte CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.flyte_helpers import flyte_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


@pytest.mark.timeout(300)
def test_pyflyte_run_refuses_a_non_finite_config_value_in_a_few_lines_naming_the_key(tmp_path):
    # JSON's Infinity reaches the config as float('inf'): before, 7-146 lines of traceback
    proc = subprocess.run(
        [os.path.join(BIN, "pyflyte"), "run", "workflows/training.py", "training_workflow",
         "--config", json.dumps({"training": {"warmup_steps": float("inf")}})],
        cwd=REPO, env=flyte_env(tmp_path, PYTHONPATH=REPO, COLUMNS="100"), capture_output=True, text=True, timeout=280,
    )
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.strip(" │╭╮╰╯─")]
    assert proc.returncode == 2, output[-2000:]
    assert "Traceback" not in output and len(lines) <= 8, output[-2000:]
    assert "Invalid value for '--config'" in output
    assert "training.warmup_steps: expected a finite" in output
