"""pyflyte run with a bad --config: refused as a short usage error naming the key, through the real pyflyte CLI."""

from __future__ import annotations

import json

import pytest

from tests.flyte_helpers import pyflyte_run


@pytest.mark.timeout(300)
def test_pyflyte_run_refuses_a_non_finite_config_value_in_a_few_lines_naming_the_key(tmp_path):
    # JSON's Infinity reaches the config as float('inf'): before, 7-146 lines of traceback
    proc, output, lines = pyflyte_run(tmp_path, "--config", json.dumps({"training": {"warmup_steps": float("inf")}}))
    assert proc.returncode == 2, output[-2000:]
    assert "Traceback" not in output and len(lines) <= 8, output[-2000:]
    assert "Invalid value for '--config'" in output
    assert "training.warmup_steps: expected a finite" in output


def _alias_bomb(path) -> None:
    """324 bytes of YAML whose aliases expand to 9**9 (387 million) strings."""
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shape", ["alias bomb", "huge file"])
def test_pyflyte_run_refuses_a_config_file_bomb_before_flytekit_parses_it(tmp_path, shape):
    # flytekit's own --config type read a .yaml path with an unbounded yaml.safe_load and json.dumps'ed the
    # expansion: the alias bomb hung pyflyte for minutes (the subprocess timeout above is only a hang guard)
    bomb = tmp_path / "bomb.yaml"
    if shape == "alias bomb":
        _alias_bomb(bomb)
        expected = "more than 10000 values once YAML aliases are expanded"
    else:
        bomb.write_text("training:\n  note: " + "x" * (2 << 20) + "\n")
        expected = "more than a config may hold"
    proc, output, lines = pyflyte_run(tmp_path, "--config", str(bomb))
    assert proc.returncode == 2, output[-2000:]
    assert "Traceback" not in output and len(lines) <= 8, output[-2000:]
    flat = " ".join(output.replace("│", " ").split())
    assert f"Invalid value for '--config': config file '{bomb}'" in flat, output[-2000:]
    assert expected in flat, output[-2000:]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("override, needle", [
    ("training.learning_rat=0.002", "unknown config key(s) training.learning_rat"),
    ("training.learning_rate=fast", "training.learning_rate: expected a number, got 'fast'"),
    ("training.learning_rate 0.002", "override 'training.learning_rate 0.002': expected section.key=value"),
])
def test_pyflyte_run_refuses_a_bad_override_in_a_few_lines_naming_the_key(tmp_path, override, needle):
    proc, output, lines = pyflyte_run(tmp_path, "--overrides", json.dumps([override]))
    assert proc.returncode == 2, output[-2000:]
    assert "Traceback" not in output and len(lines) <= 4, output[-2000:]
    assert "Error: Invalid value for '--overrides': " in output and needle in output, output[-2000:]
    assert not (tmp_path / ".flyte" / "local-cache").exists()  # refused before any task ran
