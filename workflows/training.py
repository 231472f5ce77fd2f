"""Flyte entry point: prepare → train → evaluate as thin tasks over workflows.pipeline (the distributed variant is
workflows/distributed.py). This module imports no torch: the tasks that run import the pipeline, so an identical
rerun, every task answered by Flyte's cache, starts in about half the time.

Local:   ``pyflyte run workflows/training.py training_workflow --config '{"training": {"max_steps": 200}}'``
Cluster: ``pyflyte --config flyte.config run --remote workflows/training.py training_workflow``

``--config`` takes JSON or a YAML/JSON file (e.g. params.yaml), parsed strictly (an unknown key is an error);
``--overrides '["training.learning_rate=0.002"]'`` sets keys as ``dvc exp run -S`` does; ``--data FILE`` trains on a
CSV/Parquet file and ``--data_dir DIR`` on a folder of CSV/Parquet shards (uploaded by pyflyte). Cached tasks key on content and the run fingerprint (workflows/flyte_cache.py).
``--workdir DIR`` keeps the checkpoints in DIR: the same command started again after an interruption continues
from the newest checkpoint. On a cluster, checkpoints also go to the task's Flyte checkpoint, so a retried attempt
(preemption, lost node) resumes where the previous attempt stopped.
"""

import logging
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from typing import NamedTuple, Optional

import flytekit
from flytekit import Resources, task, workflow
from flytekit.deck import DeckField
from flytekit.exceptions.system import FlyteSystemException
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from trainer_lib import TrainerCallback
from trainer_lib.redaction import mask_urls
from workflows import cli_types, flyte_cache, flyte_types
from workflows.config import ConfigError, DataConfig, ModelConfig, PipelineConfig, TrainingConfig
from workflows.decks import announce_at_exit, remember_test_metrics, render_evaluation_deck, silence_at_exit
from workflows.image import build_image
from workflows.interrupts import StepWatch, interrupted_notice
from workflows.overrides import apply_overrides

logger = logging.getLogger(__name__)

#: pyflyte run reads --config/--search through our bounded loader, not flytekit's (workflows/cli_types.py)
cli_types.install()
#: the config's Flyte type is computed once per process, not at every task interface and input (workflows/flyte_types.py)
flyte_types.register(PipelineConfig, DataConfig, ModelConfig, TrainingConfig)

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


class ResolvedRun(NamedTuple):
    config: PipelineConfig
    source: Optional[FlyteFile]
    source_dir: Optional[FlyteDirectory]
    fingerprint: str


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
        raise ConfigError(f"invalid training config: {mask_urls(str(error))}") from None


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

    Config and programming errors (ValueError, TypeError, KeyError, a missing file) fail the same way again, and so
    does a checkpoint of another run (CheckpointError) or a workdir that another execution holds (RunLockedError).
    """
    from callbacks.flyte import NotInFlyteTask
    from trainer_lib.identity import RunLockedError

    if isinstance(error, Preempted | FlyteSystemException | MemoryError):
        return True
    if isinstance(error, FileNotFoundError | NotADirectoryError | IsADirectoryError | PermissionError):
        return False
    if isinstance(error, NotImplementedError | RecursionError | NotInFlyteTask | RunLockedError):
        return False  # RunLockedError: another execution trains in this --workdir; a retry would race it
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


class _KeepResumePoint(TrainerCallback):
    """Re-saves the previous attempt's checkpoint to this attempt's Flyte checkpoint when training begins, i.e.
    once it was accepted as this run's (fingerprint checked): a retry of this attempt still finds it even if no new
    checkpoint is written, and another run's checkpoint is never passed on as this attempt's."""

    def __init__(self, found: str | None, checkpoint) -> None:
        self.found, self.checkpoint = found, checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        if self.found and _is_rank_zero():
            from callbacks.flyte import save_to_flyte

            save_to_flyte(self.found, self.checkpoint)
        self.found = None


def _resume_point(sandbox: str) -> tuple[str | None, _KeepResumePoint]:
    """The newest complete checkpoint of the previous attempt (cluster retries) and the callback that re-saves it."""
    from callbacks.flyte import current_flyte_checkpoint, restore_from_flyte

    checkpoint = current_flyte_checkpoint()
    found = restore_from_flyte(checkpoint, os.path.join(sandbox, "previous-attempt"))
    if found:
        logger.info("restored %s from the previous attempt's Flyte checkpoint", found)
    return found, _KeepResumePoint(found, checkpoint)


def _is_local_run() -> bool:
    """A `pyflyte run` on this machine: an interruption ends the command (no retry will follow)."""
    from flytekit.core.context_manager import ExecutionState, FlyteContextManager

    state = FlyteContextManager.current_context().execution_state
    local = (ExecutionState.Mode.LOCAL_WORKFLOW_EXECUTION, ExecutionState.Mode.LOCAL_TASK_EXECUTION)
    return state is not None and state.mode in local


def _end_local_run(error: BaseException, watch: StepWatch, checkpoint_dir: str | None) -> None:
    """Ctrl-C or SIGTERM of a local run: one notice and exit 130/143, not a few hundred lines of traceback."""
    if checkpoint_dir or watch.step is None:
        message = interrupted_notice(watch, checkpoint_dir)
    else:
        message = (f"interrupted at step {watch.step}; its checkpoints were in a temporary folder: "
                   "pass --workdir DIR to make a run resumable")
    print(message, file=sys.stderr, flush=True)
    silence_at_exit()
    raise SystemExit(128 + (signal.SIGTERM if isinstance(error, Preempted) else signal.SIGINT)) from None


def run_training(config: PipelineConfig, data: FlyteDirectory, workdir: str) -> TrainOutputs:
    """The body of both training tasks: pipeline.train with Flyte resume, trackers and error classification."""
    # torch comes with the pipeline: imported by the tasks that run, so a cached rerun starts without it
    from workflows import pipeline

    _log_to_stderr()
    config = validated(config)
    sandbox = flytekit.current_context().working_directory
    run_dir = os.path.abspath(workdir) if workdir else os.path.join(sandbox, "run")
    model_dir = os.path.join(sandbox, "model")
    logs_dir = os.path.join(run_dir, "tensorboard")
    watch = StepWatch()
    try:
        with _sigterm_raises():
            data_dir = data.download()
            # the previous attempt's checkpoint is resumed only when it belongs to this run (same fingerprint:
            # pipeline.train refuses another run's with a CheckpointError); --workdir reuse is pipeline.train's
            # resume=True: the newest checkpoint of this run, under the workdir's lock
            found, keep = _resume_point(sandbox)
            pipeline.train(
                config,
                data_dir,
                os.path.join(run_dir, "checkpoints"),
                model_dir,
                resume=found or True,
                report_to=flyte_report_to(config),
                logging_dir=logs_dir,
                callbacks=[watch, keep],
            )
    except BaseException as error:
        if isinstance(error, Preempted | KeyboardInterrupt) and _is_local_run():
            _end_local_run(error, watch, os.path.join(run_dir, "checkpoints") if workdir else None)
        if is_recoverable(error):
            raise FlyteRecoverableException(
                f"training interrupted by {type(error).__name__}: {error}; a retry resumes from the newest checkpoint"
            ) from error
        raise
    os.makedirs(logs_dir, exist_ok=True)
    return TrainOutputs(model=FlyteDirectory(model_dir), logs=FlyteDirectory(logs_dir))


# -- tasks ---------------------------------------------------------------------------------------------------------
def _refuse_locally(error: ConfigError, option: str | None) -> None:
    """A bad input of a local `pyflyte run` (an override, a data path): one usage-error line as click's, exit 2."""
    if _is_local_run():
        message = mask_urls(str(error))  # a value in the message may be a URL with a password
        print(f"Error: Invalid value for '{option}': {message}" if option else f"Error: {message}", file=sys.stderr,
              flush=True)
        silence_at_exit()
        raise SystemExit(2) from None


def _address_source(config: PipelineConfig, data: Optional[FlyteFile], data_dir: Optional[FlyteDirectory]):
    """``(file, folder)`` inputs of the data, with ``config.data.source`` set to their content hash."""
    if data is not None and data_dir is not None:
        raise ConfigError("data: give --data (a file) or --data_dir (a folder of shards), not both")
    if data is not None:
        path = data.download()
        config.data.source = flyte_cache.content_addressed(path, data.remote_source, data.path, config.data.source)
        return data, None
    if data_dir is not None:
        config.data.source = flyte_cache.folder_addressed(data_dir.download())
        return None, data_dir
    path = config.data.source
    if path == "digits":
        return None, None
    if os.path.isdir(path):
        config.data.source = flyte_cache.folder_addressed(path)
        return None, FlyteDirectory(path)
    if not os.path.isfile(path):
        raise ConfigError(
            f"data.source: {mask_urls(path)!r} does not exist here (a cluster cannot read local paths: give it as "
            "the workflow's --data (file) or --data_dir (folder) input, which pyflyte uploads)"
        )
    config.data.source = flyte_cache.content_addressed(path)
    return FlyteFile(path), None


@task(container_image=IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def resolve_run(
    config: PipelineConfig,
    overrides: list[str],
    data: Optional[FlyteFile] = None,
    data_dir: Optional[FlyteDirectory] = None,
) -> ResolvedRun:
    """The run's config (overrides applied, checked) with its data source addressed by content, and the run's
    fingerprint: the cache keys of the tasks after it hold the data's SHA-256 and the fingerprint, never a path.

    Not cached (it is what makes the later keys trustworthy); it reads the data once to hash it. A bad override or
    data path ends a local run with one usage-error line (exit 2); on a cluster the task fails without a retry.
    """
    announce_at_exit()
    option = "--overrides"
    try:
        config = apply_overrides(validated(config), overrides)
        option = None  # the data's errors name the input or data.source themselves
        source, source_dir = _address_source(config, data, data_dir)
    except ConfigError as error:
        _refuse_locally(error, option)
        raise
    return ResolvedRun(config=config, source=source, source_dir=source_dir,
                       fingerprint=flyte_cache.run_fingerprint(config))


@task(
    cache=True,
    cache_version=flyte_cache.CACHE_VERSION,
    cache_ignore_input_vars=("source", "source_dir"),  # data.source holds their content hash
    container_image=IMAGE,
    requests=Resources(cpu="1", mem="1Gi"),
)
def prepare_data(
    data: DataConfig, source: Optional[FlyteFile] = None, source_dir: Optional[FlyteDirectory] = None
) -> flyte_cache.ContentDirectory:
    """Load and split the data (cached on the data section, whose source is the file's or folder's content hash)."""
    sandbox = flytekit.current_context().working_directory
    if source_dir is not None:
        data.source = source_dir.download()
    elif source is not None:
        local = os.path.join(sandbox, "source", "data" + flyte_cache.source_suffix(data.source))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        shutil.copyfile(source.download(), local)
        data.source = local
    from workflows import pipeline

    config = validated(PipelineConfig(data=data))
    out = os.path.join(sandbox, "data")
    pipeline.prepare(config, out)
    return FlyteDirectory(out)


_TRAIN_CACHE = dict(
    cache=True,
    cache_version=flyte_cache.CACHE_VERSION,
    # the key is the data's content and the fingerprint; config (beyond its fingerprint) and workdir only observe
    cache_ignore_input_vars=("config", "workdir"),
)


@task(
    retries=2,
    interruptible=True,
    enable_deck=True,
    deck_fields=DECK_FIELDS,
    container_image=IMAGE,
    requests=Resources(cpu="2", mem="2Gi"),
    **_TRAIN_CACHE,
)
def train_model(config: PipelineConfig, data: FlyteDirectory, fingerprint: str, workdir: str = "") -> TrainOutputs:
    """Train, resuming from the previous attempt's Flyte checkpoint or from ``workdir``'s checkpoints."""
    return run_training(config, data, workdir)


@task(
    cache=True,
    cache_version=flyte_cache.CACHE_VERSION,
    enable_deck=True,
    deck_fields=DECK_FIELDS,
    container_image=IMAGE,
    requests=Resources(cpu="1", mem="1Gi"),
)
def evaluate_model(config: PipelineConfig, data: FlyteDirectory, model: FlyteDirectory) -> EvalOutputs:
    """Test-set metrics, confusion matrix and training curves, and the Evaluation deck (also written to the metrics
    folder as evaluation.html, so a cached result carries it).

    Cached on everything it reads: the whole config (the trackers and the registry name too: it reports to the
    training's runs and registers the model), the prepared data's content and the model folder, which is the
    same only when training came from the cache. An identical rerun therefore imports no torch at all.
    """
    from workflows import pipeline

    config = validated(config)
    out = os.path.join(flytekit.current_context().working_directory, "metrics")
    model_dir = model.download()
    metrics = pipeline.evaluate(config, data.download(), model_dir, out)
    render_evaluation_deck(out, model_dir)
    remember_test_metrics(metrics)
    return EvalOutputs(metrics=FlyteDirectory(out), test_metrics=metrics)


# -- workflows -----------------------------------------------------------------------------------------------------
@workflow
def training_workflow(
    config: PipelineConfig = PipelineConfig(),
    workdir: str = "",
    data: Optional[FlyteFile] = None,
    overrides: list[str] = [],  # noqa: B006 (a workflow default is a literal, never mutated)
    data_dir: Optional[FlyteDirectory] = None,
) -> PipelineOutputs:
    """resolve → prepare → train → evaluate.

    Args:
        config: the run config (JSON, or a YAML/JSON file such as params.yaml); defaults to the digits job.
        workdir: a folder for the checkpoints: the same command started again continues the run (default: a fresh
            temporary folder per run).
        data: a CSV/Parquet file (a local path is uploaded, or a remote URI) used instead of config's data.source.
        overrides: ``section.key=value`` items as ``dvc exp run -S`` takes them, e.g.
            '["training.learning_rate=0.002"]'.
        data_dir: a folder of CSV or Parquet shards of one table (read in sorted name order and concatenated,
            then split as one file is), instead of ``data``.
    """
    run = resolve_run(config=config, overrides=overrides, data=data, data_dir=data_dir)
    prepared = prepare_data(data=run.config.data, source=run.source, source_dir=run.source_dir)
    trained = train_model(config=run.config, data=prepared, fingerprint=run.fingerprint, workdir=workdir)
    evaluated = evaluate_model(config=run.config, data=prepared, model=trained.model)
    return PipelineOutputs(prepared, trained.model, trained.logs, evaluated.metrics, evaluated.test_metrics)
