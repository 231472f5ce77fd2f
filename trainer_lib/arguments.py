"""TrainingArguments: the reference Trainer's field names and defaults, validated at construction."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any


class ExplicitEnum(str, Enum):
    """An enum whose unknown values raise a ValueError listing the allowed ones."""

    @classmethod
    def _missing_(cls, value):
        raise ValueError(f"{value!r} is not a valid {cls.__name__}, please select one of {[m.value for m in cls]}")


class IntervalStrategy(ExplicitEnum):
    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"


class SaveStrategy(ExplicitEnum):
    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"
    BEST = "best"


class SchedulerType(ExplicitEnum):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainingArguments.{name} must be a positive integer, got {value!r}")


def _number(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"TrainingArguments.{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"TrainingArguments.{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"TrainingArguments.{name} must be <= {maximum}, got {value!r}")


def _enum(enum_cls, name: str, value):
    try:
        return enum_cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        raise ValueError(
            f"TrainingArguments.{name} must be one of {[m.value for m in enum_cls]}, got {value!r}"
        ) from None


@dataclass
class TrainingArguments:
    """Arguments of a training run. Names and defaults follow the reference Trainer where it has them."""

    output_dir: str = "trainer_output"
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    warmup_ratio: float = 0.0
    logging_dir: str | None = None
    logging_strategy: str = "steps"
    logging_steps: float = 500
    logging_first_step: bool = False
    eval_strategy: str = "no"
    eval_steps: float | None = None
    eval_delay: float = 0
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    seed: int = 42
    data_seed: int | None = None
    report_to: str | list[str] | None = "none"
    run_name: str | None = None
    disable_tqdm: bool | None = None
    dataloader_num_workers: int = 0
    dataloader_drop_last: bool = False
    bf16: bool = False
    restore_callback_states_from_checkpoint: bool = True
    # beyond the reference
    strict_integrations: bool = False
    torch_compile: bool = False
    async_checkpointing: bool = False
    #: a non-finite loss or gradient norm stops training (NonFiniteLossError); True skips such steps instead
    skip_nonfinite_steps: bool = False
    use_cpu: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ValueError(f"TrainingArguments.output_dir must be a non-empty path, got {self.output_dir!r}")
        self.output_dir = os.fspath(self.output_dir)
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ValueError(f"TrainingArguments.output_dir {self.output_dir!r} exists and is not a directory")

        self.logging_strategy = _enum(IntervalStrategy, "logging_strategy", self.logging_strategy)
        self.eval_strategy = _enum(IntervalStrategy, "eval_strategy", self.eval_strategy)
        self.save_strategy = _enum(SaveStrategy, "save_strategy", self.save_strategy)
        self.lr_scheduler_type = _enum(SchedulerType, "lr_scheduler_type", self.lr_scheduler_type)

        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps == 0:
            raise ValueError(
                f"TrainingArguments.max_steps must be a positive integer or -1 (use num_train_epochs), got {self.max_steps!r}"
            )
        if self.max_steps < 0 and self.max_steps != -1:
            raise ValueError(f"TrainingArguments.max_steps must be a positive integer or -1, got {self.max_steps!r}")
        _number("num_train_epochs", self.num_train_epochs, minimum=0)
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError(
                f"TrainingArguments.num_train_epochs must be > 0 when max_steps is -1, got {self.num_train_epochs!r}"
            )
        _number("learning_rate", self.learning_rate, minimum=0)
        _number("weight_decay", self.weight_decay, minimum=0)
        _number("adam_beta1", self.adam_beta1, minimum=0, maximum=1)
        _number("adam_beta2", self.adam_beta2, minimum=0, maximum=1)
        _number("adam_epsilon", self.adam_epsilon, minimum=0)
        if self.max_grad_norm is not None:
            _number("max_grad_norm", self.max_grad_norm, minimum=0)
        _number("warmup_ratio", self.warmup_ratio, minimum=0, maximum=1)
        _number("warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps > 1 and self.warmup_steps != int(self.warmup_steps):
            raise ValueError(f"TrainingArguments.warmup_steps must be an integer when > 1, got {self.warmup_steps!r}")
        _number("eval_delay", self.eval_delay, minimum=0)
        if isinstance(self.dataloader_num_workers, bool) or not isinstance(self.dataloader_num_workers, int) or (
            self.dataloader_num_workers < 0
        ):
            raise ValueError(
                f"TrainingArguments.dataloader_num_workers must be an integer >= 0, got {self.dataloader_num_workers!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TrainingArguments.seed must be an integer, got {self.seed!r}")
        if self.data_seed is not None and (isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int)):
            raise ValueError(f"TrainingArguments.data_seed must be an integer or None, got {self.data_seed!r}")
        if self.save_total_limit is not None:
            _positive_int("save_total_limit", self.save_total_limit)

        # eval_steps defaults to logging_steps, as in the reference
        if self.eval_strategy == IntervalStrategy.STEPS and (self.eval_steps is None or self.eval_steps == 0):
            if self.logging_steps is not None and self.logging_steps > 0:
                self.eval_steps = self.logging_steps
            else:
                raise ValueError(
                    "TrainingArguments.eval_strategy='steps' needs eval_steps (or logging_steps) > 0"
                )
        for strategy, name in (
            (self.logging_strategy, "logging_steps"),
            (self.eval_strategy, "eval_steps"),
            (self.save_strategy, "save_steps"),
        ):
            value = getattr(self, name)
            if strategy != "steps" or value is None:
                continue
            _number(name, value, minimum=0)
            if value <= 0:
                raise ValueError(f"TrainingArguments.{name} must be > 0 with the 'steps' strategy, got {value!r}")
            if value > 1 and value != int(value):
                raise ValueError(f"TrainingArguments.{name} must be an integer when > 1, got {value!r}")
            if value >= 1:
                setattr(self, name, int(value))  # ratios (< 1) resolve against max_steps at train time

        if self.save_strategy == SaveStrategy.BEST and self.metric_for_best_model is None:
            raise ValueError("TrainingArguments.save_strategy='best' needs metric_for_best_model")
        if self.load_best_model_at_end:
            if self.metric_for_best_model is None:
                self.metric_for_best_model = "loss"
            if self.save_strategy != SaveStrategy.BEST:
                if self.eval_strategy != self.save_strategy.value:
                    raise ValueError(
                        "TrainingArguments.load_best_model_at_end needs save_strategy equal to eval_strategy, got "
                        f"save_strategy={self.save_strategy.value!r} and eval_strategy={self.eval_strategy.value!r}"
                    )
                if (
                    self.eval_strategy == IntervalStrategy.STEPS
                    and (self.save_steps < 1) == (self.eval_steps < 1)
                    and round(self.save_steps / self.eval_steps, 9) % 1 != 0
                ):
                    raise ValueError(
                        "TrainingArguments.load_best_model_at_end needs save_steps to be a multiple of "
                        f"eval_steps, got save_steps={self.save_steps} and eval_steps={self.eval_steps}"
                    )
        if self.metric_for_best_model is not None:
            if not isinstance(self.metric_for_best_model, str) or not self.metric_for_best_model:
                raise ValueError(
                    f"TrainingArguments.metric_for_best_model must be a metric name, got {self.metric_for_best_model!r}"
                )
            if self.greater_is_better is None:
                self.greater_is_better = not self.metric_for_best_model.endswith("loss")

        if self.report_to is None:
            self.report_to = "none"
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to] if self.report_to != "none" else []
        elif isinstance(self.report_to, (list, tuple)):
            if not all(isinstance(r, str) for r in self.report_to):
                raise ValueError(f"TrainingArguments.report_to must be a name or a list of names, got {self.report_to!r}")
            self.report_to = [r for r in self.report_to if r != "none"]
        else:
            raise ValueError(f"TrainingArguments.report_to must be a name or a list of names, got {self.report_to!r}")

        if self.disable_tqdm is None:
            self.disable_tqdm = False
        if self.logging_dir is None:
            stamp = datetime.now().strftime("%b%d_%H-%M-%S")
            self.logging_dir = os.path.join(self.output_dir, "runs", f"{stamp}_{socket.gethostname()}")
        if self.run_name is None:
            self.run_name = self.output_dir
        if not isinstance(self.skip_nonfinite_steps, bool):
            raise ValueError(f"TrainingArguments.skip_nonfinite_steps must be a bool, got {self.skip_nonfinite_steps!r}")
        if self.bf16 and not isinstance(self.bf16, bool):
            raise ValueError(f"TrainingArguments.bf16 must be a bool, got {self.bf16!r}")

    # -- helpers ----------------------------------------------------------------------------------------------
    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup steps: an absolute count, or a ratio of training (warmup_steps < 1 or warmup_ratio)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        if self.warmup_steps > 0:
            return math.ceil(num_training_steps * self.warmup_steps)
        return math.ceil(num_training_steps * self.warmup_ratio)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the arguments (enums as their values)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, list) and value and isinstance(value[0], Enum):
                value = [v.value for v in value]
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        """The arguments as JSON with secrets redacted (this is what checkpoints and trackers store)."""
        from .redaction import redact

        return json.dumps(redact(self.to_dict()), indent=2, sort_keys=True, default=str)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """Arguments as scalars only (secrets redacted first, nested values included), for trackers' parameters."""
        from .redaction import redact

        out = {}
        for key, value in redact(self.to_dict()).items():
            if isinstance(value, (bool, int, float, str)) or value is None:
                out[key] = value
            else:
                out[key] = json.dumps(value, default=str)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingArguments:
        """Build arguments from a dict; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainingArguments field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)
