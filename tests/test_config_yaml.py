"""Config text is read as YAML 1.2, the YAML DVC reads and writes params.yaml in: what `dvc exp run -S` writes back
(``eval_strategy: no`` unquoted, ``learning_rate: 5e-05``) loads as DVC meant it."""

from __future__ import annotations

import math

import pytest
from ruamel.yaml import YAML

from workflows.config import ConfigError, PipelineConfig, parse_text
from workflows.overrides import apply_overrides


@pytest.mark.parametrize("text, expected", [
    ("no", "no"), ("off", "off"), ("yes", "yes"), ("y", "y"), ("true", True), ("False", False),
    ("5e-05", 5e-05), ("1E3", 1000.0), ("0.5", 0.5), (".5", 0.5), ("-.inf", -math.inf), ("10", 10), ("010", 10),
    ("0o17", 15), ("0x1f", 31), ("1:30", "1:30"), ("1_000", 1000), ("0b101", 5), ("1_0.5", 10.5), ("1.", 1.0), ("-0", 0), ("_1", "_1"), ("~", None),
])
def test_plain_scalars_are_read_as_ruamel_reads_them(text, expected):
    """ruamel.yaml (DVC's and DVCLive's parser, YAML 1.2) is the reference for every case."""
    ours = parse_text(f"v: {text}", "t")["v"]
    theirs = YAML(typ="safe").load(f"v: {text}")["v"]
    assert ours == expected and type(ours) is type(expected)
    assert type(theirs) is type(ours) and str(theirs) == str(ours)


def test_what_dvc_writes_back_loads_as_the_config_meant(tmp_path):
    """The unquoted forms DVC's own YAML dumper writes for `-S training.eval_strategy=no -S learning_rate=5e-5`."""
    params = tmp_path / "params.yaml"
    config = PipelineConfig().to_dict()
    config["training"].update(eval_strategy="no", learning_rate=5e-05)
    config["training"]["report_to"] = ["none"]
    YAML(typ="rt").dump(config, params.open("w"))  # the round-trip dumper `dvc exp run -S` rewrites params with
    text = params.read_text()
    assert "eval_strategy: no\n" in text and "learning_rate: 5e-05\n" in text
    loaded = PipelineConfig.load(str(params))
    assert loaded.training.eval_strategy == "no" and loaded.training.learning_rate == 5e-05


def test_an_override_of_no_is_the_string_and_a_bad_type_still_names_the_key():
    config = apply_overrides(PipelineConfig(), ["training.eval_strategy=no", "training.learning_rate=5e-5"])
    assert config.training.eval_strategy == "no" and config.training.learning_rate == 5e-05
    with pytest.raises(ConfigError, match=r"training\.learning_rate: expected a number, got 'fast'"):
        apply_overrides(PipelineConfig(), ["training.learning_rate=fast"])


def test_an_alias_bomb_in_an_override_is_refused_by_the_bound():
    levels = ["&a0 [x,x,x,x,x,x,x,x,x,x]"] + [f"&a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = "[" + ",".join(levels) + "]"  # 10**9 values once expanded
    with pytest.raises(ConfigError, match="override training.report_to: more than"):
        apply_overrides(PipelineConfig(), [f"training.report_to={bomb}"])

