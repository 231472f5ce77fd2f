"""trainer_lib: a PyTorch Trainer with the reference (Hugging Face) callback API and exact, crash-safe resume.

The names below are imported on first use (PEP 562): ``from trainer_lib import TrainerCallback`` does not import
torch (about 3 s), so a process that only needs the callback API, the arguments or the redaction rules (a cached
Flyte rerun, a CLI's argument check) starts without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the submodule that defines it
_LOCATIONS = {
    "IntervalStrategy": "arguments", "SaveStrategy": "arguments", "SchedulerType": "arguments",
    "TrainingArguments": "arguments",
    "CallbackHandler": "callback", "IntegrationCallback": "callback", "TrainerCallback": "callback",
    "CheckpointError": "checkpoint",
    "Checkpointer": "checkpointing",
    "default_data_collator": "data",
    "EvalPrediction": "evaluation", "PredictionOutput": "evaluation",
    "DefaultFlowCallback": "flow", "EarlyStoppingCallback": "flow", "PrinterCallback": "flow",
    "ProgressCallback": "flow",
    "BestRun": "hpsearch", "HPSearchBackend": "hpsearch", "default_compute_objective": "hpsearch",
    "NonFiniteLossError": "nonfinite",
    "register_integration": "registry", "resolve_report_to": "registry",
    "ResumePoint": "resume",
    "ExportableState": "state", "TrainerControl": "state", "TrainerState": "state",
    "Trainer": "trainer", "TrainOutput": "trainer", "set_seed": "trainer",
}

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on first use
    from .arguments import IntervalStrategy, SaveStrategy, SchedulerType, TrainingArguments  # noqa: F401
    from .callback import CallbackHandler, IntegrationCallback, TrainerCallback  # noqa: F401
    from .checkpoint import CheckpointError  # noqa: F401
    from .checkpointing import Checkpointer  # noqa: F401
    from .data import default_data_collator  # noqa: F401
    from .evaluation import EvalPrediction, PredictionOutput  # noqa: F401
    from .flow import DefaultFlowCallback, EarlyStoppingCallback, PrinterCallback, ProgressCallback  # noqa: F401
    from .hpsearch import BestRun, HPSearchBackend, default_compute_objective  # noqa: F401
    from .nonfinite import NonFiniteLossError  # noqa: F401
    from .registry import register_integration, resolve_report_to  # noqa: F401
    from .resume import ResumePoint  # noqa: F401
    from .state import ExportableState, TrainerControl, TrainerState  # noqa: F401
    from .trainer import Trainer, TrainOutput, set_seed  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer_lib' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LOCATIONS))


__all__ = [
    "BestRun",
    "CallbackHandler",
    "CheckpointError",
    "Checkpointer",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "EvalPrediction",
    "HPSearchBackend",
    "ExportableState",
    "IntegrationCallback",
    "IntervalStrategy",
    "NonFiniteLossError",
    "PredictionOutput",
    "PrinterCallback",
    "ResumePoint",
    "ProgressCallback",
    "SaveStrategy",
    "SchedulerType",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "TrainOutput",
    "default_compute_objective",
    "default_data_collator",
    "register_integration",
    "resolve_report_to",
    "set_seed",
]
