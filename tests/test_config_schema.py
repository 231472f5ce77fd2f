"""The pipeline's training section is a subset of TrainingArguments: same names, types and defaults."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing

from trainer_lib import TrainingArguments
from workflows.config import DIGITS_JOB, PipelineConfig, TrainingConfig

#: keys of the training section that configure the pipeline rather than the Trainer
PIPELINE_ONLY = {"early_stopping_patience"}


def _options(annotation) -> set:
    """The types a value of ``annotation`` may have (a union's members; ``list[str]`` stays ``list[str]``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set(typing.get_args(annotation))
    return {annotation}


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    return [] if value == "none" else value  # report_to="none" is the empty list


def test_training_config_fields_are_training_arguments_with_their_types_and_defaults():
    config_hints = typing.get_type_hints(TrainingConfig)
    args_hints = typing.get_type_hints(TrainingArguments)
    declared = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    config = TrainingConfig()
    for field in dataclasses.fields(TrainingConfig):
        if field.name in PIPELINE_ONLY:
            assert field.name not in args_hints, f"{field.name} is a TrainingArguments field now: drop the exemption"
            continue
        assert field.name in args_hints, f"training.{field.name} is not a TrainingArguments field"
        extra = _options(config_hints[field.name]) - _options(args_hints[field.name])
        assert not extra, f"training.{field.name}: {extra} is not a type TrainingArguments.{field.name} takes"
        spec = declared[field.name]  # the declared default (run_name=None becomes output_dir only at construction)
        expected = _plain(spec.default if spec.default is not dataclasses.MISSING else spec.default_factory())
        assert getattr(config, field.name) == expected, f"training.{field.name}: default differs from the Trainer's"


def test_the_digits_job_overrides_only_training_fields_and_a_partial_section_keeps_it():
    assert set(DIGITS_JOB) <= {f.name for f in dataclasses.fields(TrainingConfig)}
    config = PipelineConfig.from_dict({"training": {"max_steps": 5}})
    assert config.training.max_steps == 5
    assert {k: getattr(config.training, k) for k in DIGITS_JOB} == DIGITS_JOB
