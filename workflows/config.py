"""The one config object of a run, shared by Python, params.yaml (DVC) and the Flyte workflow's input.

Loading is strict: an unknown key or a value of the wrong type is an error naming the key path. Reading the text
(bounded, YAML 1.2 as DVC writes it) is workflows/config_text.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .config_text import (  # noqa: F401 (re-exported: the config's errors and readers)
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_VALUES,
    ConfigError,
    parse_json,
    parse_text,
    read_config_file,
    show,
)

#: what the pipeline's evaluation reports (and so what metric_for_best_model may name)
PIPELINE_METRICS = {None, "accuracy", "loss", "eval_accuracy", "eval_loss"}


#: the range of a seed (numpy and scikit-learn take 0 .. 2**32 - 1)
SEED_RANGE = (0, 2**32 - 1)
#: the range of any other integer (what torch and numpy index with)
INT_RANGE = (-(2**63), 2**63 - 1)

def _redacted_repr(self) -> str:
    """The dataclass repr with secret-named values hidden and URL passwords masked (trainer_lib.redaction).

    flytekit's Input deck renders a task input as ``str(value)``: without this a password in ``data.source`` or a
    token in any string value would be written into every deck.html. Imported lazily: trainer_lib loads torch.
    """
    from trainer_lib.redaction import redact

    parts = []
    for f in dataclasses.fields(self):
        value = getattr(self, f.name)
        shown = value if dataclasses.is_dataclass(value) else redact({f.name: value})[f.name]
        parts.append(f"{f.name}={shown!r}")
    return f"{type(self).__name__}({', '.join(parts)})"


@dataclass
class DataConfig:
    """Where the examples come from and how they are split."""

    __repr__ = _redacted_repr

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

    __repr__ = _redacted_repr

    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    dropout: float = 0.2
    #: register the final model under this name in MLflow's Model Registry (MLFLOW_REGISTERED_MODEL_NAME otherwise)
    registered_name: str | None = None
    #: the alias the new registry version gets (e.g. models:/<name>@candidate)
    registered_alias: str = "candidate"


@dataclass
class TrainingConfig:
    """The Trainer's arguments the pipeline exposes: TrainingArguments names, types and defaults (a test guards
    it), plus ``early_stopping_patience`` (the pipeline's EarlyStoppingCallback). The digits job's own values are
    ``DIGITS_JOB``, the default of ``PipelineConfig.training`` (and of params.yaml)."""

    __repr__ = _redacted_repr

    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: float = 500
    eval_strategy: str = "no"
    eval_steps: float | None = None
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    #: not a TrainingArguments field: evaluations without improvement before the pipeline stops (0: never)
    early_stopping_patience: int = 0
    seed: int = 42
    bf16: bool = False
    async_checkpointing: bool = False
    report_to: list[str] = field(default_factory=list)
    #: the tracker run's name; default: the DVC experiment, else the Flyte execution id, else mlp-<config hash>
    run_name: str | None = None
    #: a tracker failing during the run stops training (a tracker that cannot start always does, before training)
    strict_integrations: bool = False


#: the default job (an MLP on digits to >=97% test accuracy) where it differs from TrainingArguments' defaults;
#: a config's training section that leaves a key out gets this value
DIGITS_JOB: dict[str, Any] = dict(
    num_train_epochs=30.0, per_device_train_batch_size=32, per_device_eval_batch_size=256, learning_rate=1e-3,
    weight_decay=0.01, logging_steps=50, eval_strategy="epoch", save_strategy="epoch", save_total_limit=2,
    metric_for_best_model="accuracy",
)


@dataclass
class PipelineConfig:
    """prepare → train → evaluate."""

    __repr__ = _redacted_repr

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(**DIGITS_JOB))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PipelineConfig:
        if isinstance(data, dict) and "search" in data:
            # params.yaml's search section (SearchConfig): checked here too, so every stage rejects a bad one
            data = dict(data)
            SearchConfig.from_dict(data.pop("search"))
        return _build(cls, data or {}, "")

    @classmethod
    def load(cls, path: str) -> PipelineConfig:
        """Read a YAML or JSON file (params.yaml); a missing or malformed file is an error naming it."""
        data = read_config_file(path)
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    @classmethod
    def parse(cls, text: str) -> PipelineConfig:
        """From a JSON/YAML string, or from a file path when ``text`` names a file."""
        if os.path.isfile(text):
            return cls.load(text)
        data = parse_text(text, "config (neither a file nor JSON/YAML)")
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping or a file path, got {show(text)}")
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> PipelineConfig:
        """Strict JSON parsing; ``pyflyte run --config`` uses it, so an unknown key is an error there too.

        An error is a click ``BadParameter`` when click is loaded (pyflyte then prints its short usage error
        instead of a traceback); it is still a ConfigError's message, naming the key.
        """
        try:
            return cls.from_dict(parse_json(text, "config"))
        except ConfigError as error:
            click = sys.modules.get("click")
            if click is None:
                raise
            usage_error = type("ConfigParameterError", (click.BadParameter, ConfigError), {})
            raise usage_error(str(error), param_hint="'--config'") from None

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
        raise ConfigError(errors[0] if errors else f"{path}: unexpected value {show(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {show(value)}")
        return [_check_type(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {show(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {show(value)}")
        low, high = SEED_RANGE if path.endswith("seed") else INT_RANGE
        if not low <= value <= high:
            raise ConfigError(f"{path}: expected an integer from {low} to {high}, got {show(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {show(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {show(value)}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {show(value)}")
        return value
    return value


def _build(cls, data: dict[str, Any], prefix: str, defaults: dict[str, Any] | None = None):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        names = ", ".join(f"{prefix}{show(k) if not isinstance(k, str) else k[:60]}" for k in unknown[:5])
        names += f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ConfigError(f"unknown config key(s) {names}; valid keys here are {sorted(fields)}")
    values = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            # a section's missing keys keep the parent's default for that section (e.g. DIGITS_JOB)
            field_ = fields[name]
            base = field_.default_factory() if field_.default_factory is not dataclasses.MISSING else None
            section_defaults = dataclasses.asdict(base) if base is not None else None
            values[name] = _build(annotation, value if value is not None else {}, f"{prefix}{name}.", section_defaults)
        else:
            values[name] = _check_type(value, annotation, f"{prefix}{name}")
    instance = cls(**{**(defaults or {}), **values})
    _validate(instance, prefix)
    return instance


def _validate(instance: Any, prefix: str) -> None:
    def bad(name: str, expected: str) -> None:
        raise ConfigError(f"{prefix}{name}: expected {expected}, got {show(getattr(instance, name))}")

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
        if instance.registered_name is not None and not instance.registered_name.strip():
            bad("registered_name", "a model name or null")
        if not re.fullmatch(r"[A-Za-z_][\w-]*", instance.registered_alias or ""):
            bad("registered_alias", "an alias of letters, digits, '_' or '-' (e.g. candidate)")
    elif isinstance(instance, TrainingConfig):
        if instance.early_stopping_patience < 0:
            bad("early_stopping_patience", "an integer >= 0 (0 turns early stopping off)")
        if instance.metric_for_best_model not in PIPELINE_METRICS:
            bad("metric_for_best_model", f"a metric the pipeline's evaluation produces ({sorted(m for m in PIPELINE_METRICS if m)})")
        if instance.early_stopping_patience > 0 and instance.eval_strategy == "no":
            bad("early_stopping_patience", "0 when eval_strategy is 'no' (early stopping needs evaluations)")


# -- the search space (params.yaml's `search:` section) ----------------------------------------------------------
#: the sections a search may change: data changes would change the splits that trials are compared on
SEARCHABLE_SECTIONS = ("model", "training")
SAMPLERS = ("tpe", "random", "grid")
DIRECTIONS = ("maximize", "minimize")
#: validation metrics a trial reports; the test split stays untouched until the best trial is evaluated
SEARCH_METRICS = ("eval_accuracy", "eval_loss")
PARAM_TYPES = ("float", "int", "categorical")


@dataclass
class ParamRange:
    """One searched parameter: a ``float``/``int`` range (``log`` scale, ``step``) or ``categorical`` choices."""

    type: str = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None


@dataclass
class SearchConfig:
    """A hyperparameter search over params.yaml keys (``training.learning_rate``), shared by Python, Flyte and DVC."""

    #: params.yaml key -> range; the keys are the ones `dvc exp run -S` takes
    params: dict[str, ParamRange] = field(
        default_factory=lambda: {
            "training.learning_rate": ParamRange("float", low=3e-4, high=1e-2, log=True),
            "model.dropout": ParamRange("float", low=0.0, high=0.4),
            "training.per_device_train_batch_size": ParamRange("categorical", choices=[16, 32, 64]),
        }
    )
    #: the objective: this validation metric of each trial's last evaluation
    metric: str = "eval_accuracy"
    direction: str = "maximize"
    n_trials: int = 8
    #: trials per round (run side by side on a cluster; one after another locally)
    parallelism: int = 4
    sampler: str = "tpe"
    seed: int = 0
    #: the study fails when fewer trials than this fraction of a round succeed
    min_success_ratio: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SearchConfig:
        """Strict: an unknown key, a wrong type or a bad range is an error naming ``search.<key>``."""
        data = dict(data or {})
        if not isinstance(data, dict):
            raise ConfigError(f"search: expected a mapping, got {data!r}")
        params = data.pop("params", None)
        instance = _build(cls, data, "search.")
        if params is not None:
            if not isinstance(params, dict) or not params:
                raise ConfigError(f"search.params: expected a non-empty mapping of params.yaml keys, got {params!r}")
            instance.params = {
                str(key): _build(ParamRange, spec if isinstance(spec, dict) else spec, f"search.params.{key}.")
                for key, spec in params.items()
            }
        _validate_search(instance)
        return instance

    @classmethod
    def load(cls, path: str) -> SearchConfig:
        """The ``search`` section of a params.yaml (defaults when it has none)."""
        data = read_config_file(path) or {}
        try:
            return cls.from_dict(data.get("search"))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    @classmethod
    def parse(cls, text: str) -> SearchConfig:
        """From a JSON/YAML string or a file (a params.yaml: its ``search`` section)."""
        if os.path.isfile(text):
            return cls.load(text)
        data = parse_text(text, "search (neither a file nor JSON/YAML)")
        if not isinstance(data, dict):
            raise ConfigError(f"search must be a mapping or a file path, got {show(text)}")
        return cls.from_dict(data)

    def grid(self) -> dict[str, list[Any]]:
        """Every value of each parameter (the grid sampler's space): choices, or an int range."""
        out = {}
        for key, spec in self.params.items():
            if spec.type == "categorical":
                out[key] = list(spec.choices or [])
            else:
                step = int(spec.step or 1)
                out[key] = list(range(int(spec.low), int(spec.high) + 1, step))
        return out


def apply_params(config: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """``config`` with the dotted params.yaml keys set (``{"training.learning_rate": 0.002}``), validated strictly."""
    data = config.to_dict()
    for key, value in params.items():
        section, _, name = key.partition(".")
        if section not in data or not isinstance(data[section], dict) or name not in data[section]:
            raise ConfigError(f"{key}: not a params.yaml key (expected <section>.<field>, e.g. training.learning_rate)")
        data[section][name] = value
    return PipelineConfig.from_dict(data)


def _validate_search(search: SearchConfig) -> None:
    def bad(key: str, expected: str, value: Any) -> None:
        raise ConfigError(f"search.{key}: expected {expected}, got {value!r}")

    if search.metric not in SEARCH_METRICS:
        bad("metric", f"one of {list(SEARCH_METRICS)} (a validation metric)", search.metric)
    if search.direction not in DIRECTIONS:
        bad("direction", f"one of {list(DIRECTIONS)}", search.direction)
    if search.sampler not in SAMPLERS:
        bad("sampler", f"one of {list(SAMPLERS)}", search.sampler)
    if search.n_trials < 1:
        bad("n_trials", "an integer >= 1", search.n_trials)
    if search.parallelism < 1:
        bad("parallelism", "an integer >= 1", search.parallelism)
    if not 0 < search.min_success_ratio <= 1:
        bad("min_success_ratio", "a fraction in (0, 1]", search.min_success_ratio)
    defaults = PipelineConfig()
    for key, spec in search.params.items():
        where = f"params.{key}"
        section, _, name = key.partition(".")
        if section not in SEARCHABLE_SECTIONS or name not in getattr(defaults, section).__dict__:
            bad(where, f"a params.yaml key in {list(SEARCHABLE_SECTIONS)} (e.g. training.learning_rate)", key)
        if spec.type not in PARAM_TYPES:
            bad(f"{where}.type", f"one of {list(PARAM_TYPES)}", spec.type)
        if spec.type == "categorical":
            if not spec.choices:
                bad(f"{where}.choices", "a non-empty list", spec.choices)
            if spec.low is not None or spec.high is not None or spec.log or spec.step is not None:
                bad(where, "only `choices` for a categorical parameter", dataclasses.asdict(spec))
            values = list(enumerate(spec.choices))
        else:
            if spec.choices is not None:
                bad(f"{where}.choices", f"no choices for a {spec.type} range (use type: categorical)", spec.choices)
            if spec.low is None or spec.high is None or not spec.low < spec.high:
                bad(where, "low < high", (spec.low, spec.high))
            if spec.type == "int" and not all(float(v).is_integer() for v in (spec.low, spec.high, spec.step or 1)):
                bad(where, "integer low, high and step for an int parameter", (spec.low, spec.high, spec.step))
            if spec.log and spec.low <= 0:
                bad(f"{where}.low", "a positive number with log: true", spec.low)
            if spec.log and spec.step is not None:
                bad(f"{where}.step", "no step with log: true", spec.step)
            if spec.step is not None and spec.step <= 0:
                bad(f"{where}.step", "a positive number", spec.step)
            cast = int if spec.type == "int" else float
            values = [("low", cast(spec.low)), ("high", cast(spec.high))]
        for label, value in values:  # every bound and choice must be a valid value of its config key
            try:
                apply_params(defaults, {key: value})
            except ConfigError as error:
                detail = str(error).split(": ", 1)[-1]
                raise ConfigError(f"search.{where}.{'choices[' + str(label) + ']' if spec.type == 'categorical' else label}: "
                                  f"{detail}") from None
    if search.sampler == "grid":
        for key, spec in search.params.items():
            if spec.type == "float":
                bad(f"params.{key}.type", "int or categorical with the grid sampler (a float range has no grid)",
                    spec.type)
