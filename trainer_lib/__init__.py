"""trainer_lib: a PyTorch Trainer with the reference (Hugging Face) callback API and exact, crash-safe resume."""

from .arguments import IntervalStrategy, SaveStrategy, SchedulerType, TrainingArguments
from .callback import CallbackHandler, IntegrationCallback, TrainerCallback
from .checkpoint import CheckpointError
from .checkpointing import Checkpointer
from .data import default_data_collator
from .evaluation import EvalPrediction, PredictionOutput
from .flow import DefaultFlowCallback, EarlyStoppingCallback, PrinterCallback, ProgressCallback
from .hpsearch import BestRun, HPSearchBackend, default_compute_objective
from .nonfinite import NonFiniteLossError
from .registry import register_integration, resolve_report_to
from .resume import ResumePoint
from .state import ExportableState, TrainerControl, TrainerState
from .trainer import Trainer, TrainOutput, set_seed

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
