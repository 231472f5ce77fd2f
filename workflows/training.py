"""Flyte entry point: prepare → train → evaluate as thin tasks over workflows.pipeline, and a distributed variant.

Local:   ``pyflyte run workflows/training.py training_workflow --config '{"training": {"max_steps": 200}}'``
Cluster: ``pyflyte --config flyte.config run --remote workflows/training.py training_workflow``

``--config`` takes JSON or a YAML/JSON file (e.g. params.yaml), parsed strictly (an unknown key is an error).
``--workdir DIR`` keeps the checkpoints in DIR: the same command started again after an interruption continues
from the newest checkpoint. On a cluster, checkpoints also go to the task's Flyte checkpoint, so a retried attempt
(preemption, lost node) resumes where the previous attempt stopped.
"""

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import NamedTuple

import flytekit
from flytekit import Resources, task, workflow
from flytekit.deck import DeckField
from flytekit.exceptions.system import FlyteSystemException
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.kfpytorch import Elastic

from callbacks.flyte import NotInFlyteTask, current_flyte_checkpoint, restore_from_flyte, save_to_flyte
from workflows import pipeline
from workflows.config import ConfigError, DataConfig, PipelineConfig
from workflows.image import build_image

logger = logging.getLogger(__name__)

#: the task image for a cluster (workflows/image.py: constraints.txt's pins, flytrain installed)
IMAGE = build_image()

#: the deck fields shown besides our Log History deck (Dependencies would add a pip freeze to every deck)
DECK_FIELDS = (DeckField.TIMELINE, DeckField.INPUT, DeckField.OUTPUT)
#: processes of the distributed variant (one node); change it here, it is fixed when the task is registered
NPROC_PER_NODE = 2


class Preempted(BaseException):
    """SIGTERM arrived (preemption, eviction). A BaseException, so no ``except Exception`` swallows it."""


class TrainOutputs(NamedTuple):
    model: FlyteDirectory
    logs: FlyteDirectory


class EvalOutputs(NamedTuple):
    metrics: FlyteDirectory
    test_metrics: dict[str, float]


class PipelineOutputs(NamedTuple):
    data: FlyteDirectory
    model: FlyteDirectory
    logs: FlyteDirectory
    metrics: FlyteDirectory
    test_metrics: dict[str, float]


# -- helpers shared by the tasks ---------------------------------------------------------------------------------
def _log_to_stderr() -> None:
    """The pipeline's INFO lines ("resuming from …") in the task log; flytekit only configures its own logger."""
    package = logging.getLogger("workflows")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def validated(config: PipelineConfig) -> PipelineConfig:
    """Check a config that did not come through the strict parser (remote inputs, Python callers)."""
    try:
        return PipelineConfig.from_dict(config.to_dict())
    except ConfigError as error:
        raise ConfigError(f"invalid training config: {error}") from None


def flyte_report_to(config: PipelineConfig) -> list[str]:
    """The config's trackers plus "flyte" (its checkpoint sync is what lets a retry resume); "tensorboard" too when
    the config names none and it is installed. ``report_to: [none]`` turns every tracker off, Flyte's included."""
    names = list(config.training.report_to)
    if "none" in names:
        return []
    if not names:
        from trainer_lib.registry import resolve_report_to

        try:
            resolve_report_to(["tensorboard"])
            names.append("tensorboard")
        except ImportError as error:
            logger.warning("not reporting to tensorboard: %s", error)
    return ["flyte"] + [n for n in names if n != "flyte"]


def is_recoverable(error: BaseException) -> bool:
    """Whether a retry may succeed: preemption, I/O and runtime (torch, dataloader, NCCL/gloo) failures.

    Config and programming errors (ValueError, TypeError, KeyError, a missing file) fail the same way again.
    """
    if isinstance(error, Preempted | FlyteSystemException | MemoryError):
        return True
    if isinstance(error, FileNotFoundError | NotADirectoryError | IsADirectoryError | PermissionError):
        return False
    if isinstance(error, NotImplementedError | RecursionError | NotInFlyteTask):
        return False
    return isinstance(error, OSError | RuntimeError)


@contextmanager
def _sigterm_raises():
    """Turn SIGTERM into Preempted while training (only the main thread may install signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Preempted(f"received signal {signum} (preemption or eviction)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _resume_point(sandbox: str) -> str | None:
    """The newest complete checkpoint of the previous attempt (cluster retries), re-saved to this attempt's Flyte
    checkpoint at once so that a retry of this attempt still finds it even if no new checkpoint is written."""
    checkpoint = current_flyte_checkpoint()
    found = restore_from_flyte(checkpoint, os.path.join(sandbox, "previous-attempt"))
    if found:
        logger.info("restored %s from the previous attempt's Flyte checkpoint", found)
        if _is_rank_zero():
            save_to_flyte(found, checkpoint)
    return found


def run_training(config: PipelineConfig, data: FlyteDirectory, workdir: str) -> TrainOutputs:
    """The body of both training tasks: pipeline.train with Flyte resume, trackers and error classification."""
    _log_to_stderr()
    config = validated(config)
    sandbox = flytekit.current_context().working_directory
    run_dir = os.path.abspath(workdir) if workdir else os.path.join(sandbox, "run")
    model_dir = os.path.join(sandbox, "model")
    logs_dir = os.path.join(run_dir, "tensorboard")
    try:
        with _sigterm_raises():
            data_dir = data.download()
            resume = _resume_point(sandbox) or True
            pipeline.train(
                config,
                data_dir,
                os.path.join(run_dir, "checkpoints"),
                model_dir,
                resume=resume,
                report_to=flyte_report_to(config),
                logging_dir=logs_dir,
            )
    except BaseException as error:
        if is_recoverable(error):
            raise FlyteRecoverableException(
                f"training interrupted by {type(error).__name__}: {error}; a retry resumes from the newest checkpoint"
            ) from error
        raise
    os.makedirs(logs_dir, exist_ok=True)
    return TrainOutputs(model=FlyteDirectory(model_dir), logs=FlyteDirectory(logs_dir))


# -- tasks ---------------------------------------------------------------------------------------------------------
@task(cache=True, cache_version="1", container_image=IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def prepare_data(data: DataConfig) -> FlyteDirectory:
    """Load and split the data (cached: only the data section of the config is its key)."""
    config = validated(PipelineConfig(data=data))
    out = os.path.join(flytekit.current_context().working_directory, "data")
    pipeline.prepare(config, out)
    return FlyteDirectory(out)


@task(
    retries=2,
    interruptible=True,
    enable_deck=True,
    deck_fields=DECK_FIELDS,
    container_image=IMAGE,
    requests=Resources(cpu="2", mem="2Gi"),
)
def train_model(config: PipelineConfig, data: FlyteDirectory, workdir: str = "") -> TrainOutputs:
    """Train, resuming from the previous attempt's Flyte checkpoint or from ``workdir``'s checkpoints."""
    return run_training(config, data, workdir)


@task(
    task_config=Elastic(nnodes=1, nproc_per_node=NPROC_PER_NODE, monitor_interval=1, increase_shared_mem=False),
    shared_memory=True,
    retries=2,
    interruptible=True,
    enable_deck=True,
    deck_fields=DECK_FIELDS,
    container_image=IMAGE,
    requests=Resources(cpu=str(NPROC_PER_NODE), mem="4Gi"),
)
def train_model_distributed(config: PipelineConfig, data: FlyteDirectory, workdir: str = "") -> TrainOutputs:
    """train_model in NPROC_PER_NODE processes (torch elastic, DDP; gloo on CPU, nccl on GPU); rank 0's result."""
    return run_training(config, data, workdir)


@task(container_image=IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def evaluate_model(config: PipelineConfig, data: FlyteDirectory, model: FlyteDirectory) -> EvalOutputs:
    """Test-set metrics, confusion matrix and training curves."""
    config = validated(config)
    out = os.path.join(flytekit.current_context().working_directory, "metrics")
    metrics = pipeline.evaluate(config, data.download(), model.download(), out)
    return EvalOutputs(metrics=FlyteDirectory(out), test_metrics=metrics)


# -- workflows -----------------------------------------------------------------------------------------------------
@workflow
def training_workflow(config: PipelineConfig = PipelineConfig(), workdir: str = "") -> PipelineOutputs:
    """prepare → train → evaluate.

    Args:
        config: the run config (JSON, or a YAML/JSON file such as params.yaml); defaults to the digits job.
        workdir: a folder for the checkpoints: the same command started again continues the run (default: a fresh
            temporary folder per run).
    """
    data = prepare_data(data=config.data)
    trained = train_model(config=config, data=data, workdir=workdir)
    evaluated = evaluate_model(config=config, data=data, model=trained.model)
    return PipelineOutputs(data, trained.model, trained.logs, evaluated.metrics, evaluated.test_metrics)


@workflow
def distributed_training_workflow(config: PipelineConfig = PipelineConfig(), workdir: str = "") -> PipelineOutputs:
    """training_workflow with the training task distributed over NPROC_PER_NODE processes."""
    data = prepare_data(data=config.data)
    trained = train_model_distributed(config=config, data=data, workdir=workdir)
    evaluated = evaluate_model(config=config, data=data, model=trained.model)
    return PipelineOutputs(data, trained.model, trained.logs, evaluated.metrics, evaluated.test_metrics)
