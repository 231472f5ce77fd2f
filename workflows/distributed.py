"""The distributed variant: ``pyflyte run workflows/distributed.py distributed_training_workflow``.

training_workflow with ``train_model`` run by torch elastic in NPROC_PER_NODE processes (DDP; gloo on CPU, nccl on
GPU). A module of its own because flytekit's Elastic task imports torch when it is defined: workflows/training.py
stays free of torch, so an identical (cached) rerun of training_workflow starts in about half the time.
"""

from __future__ import annotations

from typing import Optional

from flytekit import Resources, task, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekitplugins.kfpytorch import Elastic

from workflows.config import PipelineConfig
from workflows.training import (
    _TRAIN_CACHE,
    DECK_FIELDS,
    IMAGE,
    NPROC_PER_NODE,
    PipelineOutputs,
    TrainOutputs,
    evaluate_model,
    prepare_data,
    resolve_run,
    run_training,
)


@task(
    task_config=Elastic(nnodes=1, nproc_per_node=NPROC_PER_NODE, monitor_interval=1, increase_shared_mem=False),
    shared_memory=True,
    retries=2,
    interruptible=True,
    enable_deck=True,
    deck_fields=DECK_FIELDS,
    container_image=IMAGE,
    requests=Resources(cpu=str(NPROC_PER_NODE), mem="4Gi"),
    **_TRAIN_CACHE,
)
def train_model_distributed(
    config: PipelineConfig, data: FlyteDirectory, fingerprint: str, workdir: str = ""
) -> TrainOutputs:
    """train_model in NPROC_PER_NODE processes (torch elastic, DDP; gloo on CPU, nccl on GPU); rank 0's result."""
    return run_training(config, data, workdir)


@workflow
def distributed_training_workflow(
    config: PipelineConfig = PipelineConfig(),
    workdir: str = "",
    data: Optional[FlyteFile] = None,
    overrides: list[str] = [],  # noqa: B006
    data_dir: Optional[FlyteDirectory] = None,
) -> PipelineOutputs:
    """training_workflow with the training task distributed over NPROC_PER_NODE processes."""
    run = resolve_run(config=config, overrides=overrides, data=data, data_dir=data_dir)
    prepared = prepare_data(data=run.config.data, source=run.source, source_dir=run.source_dir)
    trained = train_model_distributed(config=run.config, data=prepared, fingerprint=run.fingerprint, workdir=workdir)
    evaluated = evaluate_model(config=run.config, data=prepared, model=trained.model)
    return PipelineOutputs(prepared, trained.model, trained.logs, evaluated.metrics, evaluated.test_metrics)
