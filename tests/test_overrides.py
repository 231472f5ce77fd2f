"""`--overrides` of the Flyte workflow: `dvc exp run -S` syntax, parsed by the config's strict parser."""

from __future__ import annotations

import pytest

from workflows.config import ConfigError, PipelineConfig
from workflows.overrides import apply_overrides


def test_overrides_set_nested_values_parsed_as_yaml():
    config = apply_overrides(PipelineConfig(), [
        "training.learning_rate=0.002", "training.report_to=[mlflow, dvclive]", "model.hidden_sizes=[32, 16]",
        "training.eval_steps=null", "data.source=data/raw/train.csv",
    ])
    assert config.training.learning_rate == 0.002
    assert config.training.report_to == ["mlflow", "dvclive"]
    assert config.model.hidden_sizes == [32, 16]
    assert config.data.source == "data/raw/train.csv"
    assert PipelineConfig().training.learning_rate == 1e-3  # the input config is left alone


def test_later_overrides_win_and_none_change_nothing():
    assert apply_overrides(PipelineConfig(), []) == PipelineConfig()
    config = apply_overrides(PipelineConfig(), ["training.seed=1", "training.seed=7"])
    assert config.training.seed == 7


@pytest.mark.parametrize("override, message", [
    ("training.learning_rat=0.1", r"unknown config key\(s\) training\.learning_rat"),
    ("trainer.seed=1", r"unknown config key\(s\) trainer"),
    ("training.seed=1.5", r"training\.seed: expected an integer, got 1\.5"),
    ("model.dropout=2", r"model\.dropout: expected a number in \[0, 1\)"),
    ("training.learning_rate.x=1", r"override training\.learning_rate\.x: training\.learning_rate is a value"),
    ("training.learning_rate", r"expected section\.key=value"),
    ("training..seed=1", r"expected section\.key=value"),
    ("training.report_to=[mlflow", r"override training\.report_to is not valid YAML"),
])
def test_a_bad_override_is_one_error_naming_its_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(PipelineConfig(), [override])
