"""The one config object of a run, shared by Python, params.yaml (DVC) and the Flyte workflow's input.

Loading is strict: an unknown key or a value of the wrong type is an error naming the key path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

#: what the pipeline's evaluation reports (and so what metric_for_best_model may name)
PIPELINE_METRICS = {None, "accuracy", "loss", "eval_accuracy", "eval_loss"}


class ConfigError(ValueError):
    """A config value that is unknown, of the wrong type or out of range; the message names its key."""


@dataclass
class DataConfig:
    """Where the examples come from and how they are split."""

    #: "digits" (scikit-learn's bundled data set) or a path to a .csv / .parquet file
    source: str = "digits"
    #: the label column of a CSV/Parquet source (every other column is a numeric feature)
    label_column: str = "label"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0


@dataclass
class ModelConfig:
    """A multi-layer perceptron classifier."""

    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    dropout: float = 0.2


@dataclass
class TrainingConfig:
    """The Trainer's arguments used by the pipeline (TrainingArguments names)."""

    num_train_epochs: float = 30.0
    max_steps: int = -1
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 256
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: float = 50
    eval_strategy: str = "epoch"
    eval_steps: float | None = None
    save_strategy: str = "epoch"
    save_steps: float = 500
    save_total_limit: int | None = 2
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = "accuracy"
    early_stopping_patience: int = 0
    seed: int = 42
    bf16: bool = False
    async_checkpointing: bool = False
    report_to: list[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    """prepare → train → evaluate."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PipelineConfig:
        return _build(cls, data or {}, "")

    @classmethod
    def load(cls, path: str) -> PipelineConfig:
        """Read a YAML or JSON file (params.yaml); a missing or malformed file is an error naming it."""
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as error:
                detail = " ".join(str(error).split())
                raise ConfigError(f"config file {path!r} is not valid YAML/JSON: {detail}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    @classmethod
    def parse(cls, text: str) -> PipelineConfig:
        """From a JSON/YAML string, or from a file path when ``text`` names a file."""
        if os.path.isfile(text):
            return cls.load(text)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"config is neither a file nor valid JSON/YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping or a file path, got {text!r}")
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> PipelineConfig:
        """Strict JSON parsing; ``pyflyte run --config`` uses it, so an unknown key is an error there too."""
        return cls.from_dict(json.loads(text))

    def digest(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _check_type(value: Any, annotation: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{path}: unexpected value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"unknown config key(s) {names}; valid keys here are {sorted(fields)}")
    values = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = _build(annotation, value if value is not None else {}, f"{prefix}{name}.")
        else:
            values[name] = _check_type(value, annotation, f"{prefix}{name}")
    instance = cls(**values)
    _validate(instance, prefix)
    return instance


def _validate(instance: Any, prefix: str) -> None:
    def bad(name: str, expected: str) -> None:
        raise ConfigError(f"{prefix}{name}: expected {expected}, got {getattr(instance, name)!r}")

    if isinstance(instance, DataConfig):
        for name in ("val_fraction", "test_fraction"):
            if not 0 < getattr(instance, name) < 0.5:
                bad(name, "a fraction between 0 and 0.5")
        if not instance.source:
            bad("source", "'digits' or a .csv/.parquet path")
    elif isinstance(instance, ModelConfig):
        if not instance.hidden_sizes or any(h <= 0 for h in instance.hidden_sizes):
            bad("hidden_sizes", "a non-empty list of positive integers")
        if not 0 <= instance.dropout < 1:
            bad("dropout", "a number in [0, 1)")
    elif isinstance(instance, TrainingConfig):
        if instance.early_stopping_patience < 0:
            bad("early_stopping_patience", "an integer >= 0 (0 turns early stopping off)")
        if instance.metric_for_best_model not in PIPELINE_METRICS:
            bad("metric_for_best_model", f"a metric the pipeline's evaluation produces ({sorted(m for m in PIPELINE_METRICS if m)})")
        if instance.early_stopping_patience > 0 and instance.eval_strategy == "no":
            bad("early_stopping_patience", "0 when eval_strategy is 'no' (early stopping needs evaluations)")
