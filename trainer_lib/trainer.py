"""The Trainer: a PyTorch training loop with the reference callback flow and exact, crash-safe resume."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import hpsearch, identity
from .arguments import IntervalStrategy, SaveStrategy, TrainingArguments
from .callback import CallbackHandler
from .checkpointing import Checkpointer
from .data import batches_per_epoch, default_data_collator, epoch_batches
from .distributed import DistInfo, mean_across_ranks, setup_distributed
from .evaluation import EvaluationMixin, speed_metrics
from .flow import DefaultFlowCallback, PrinterCallback, ProgressCallback
from .hpsearch import HyperparameterSearchMixin
from .loaders import DataLoaderMixin
from .nonfinite import NonFiniteGuard
from .optim import create_optimizer, create_scheduler, release_gradients
from .registry import resolve_report_to
from .resume import LOSS_DTYPES, LoopPosition, ResumePoint, Target
from .state import TrainerControl, TrainerState

logger = logging.getLogger(__name__)


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict[str, float]


class _Plan(NamedTuple):
    """The shape of a training: its loader, batches and updates per epoch, total steps and epochs."""

    dataloader: DataLoader
    batches_per_epoch: int
    updates_per_epoch: int
    max_steps: int
    num_train_epochs: int


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _loss_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping):
        if "loss" not in outputs or outputs["loss"] is None:
            raise ValueError(
                "The model did not return a loss from the inputs; it must return one when `labels` are given. "
                f"It returned the keys {list(outputs.keys())}."
            )
        return outputs["loss"]
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, (tuple, list)):
        loss = outputs[0]
    if loss is None:
        raise ValueError("The model did not return a loss (a mapping or object with `loss`, or a tuple (loss, ...))")
    return loss


class Trainer(DataLoaderMixin, HyperparameterSearchMixin, EvaluationMixin):
    """Train, evaluate and predict with a ``torch.nn.Module`` whose ``forward(**batch)`` returns ``loss``/``logits``."""

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: TrainingArguments | None = None,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        compute_metrics=None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        processing_class=None,
        model_init=None,
        fingerprint_extra: Mapping[str, Any] | None = None,
    ):
        self.args = args if args is not None else TrainingArguments()
        self.model_init = model_init
        self._init_hp_search()
        if model is None and model_init is None:
            raise ValueError("Trainer needs a model (a torch.nn.Module) or a model_init function")
        if model is not None and model_init is not None:
            logger.warning("Trainer got both a model and model_init: model_init replaces the model when training")
        self.dist: DistInfo = setup_distributed()
        set_seed(self.args.seed)
        if model is None:
            model = self.call_model_init()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Trainer's model must be a torch.nn.Module, got {type(model).__name__}")
        self.device = self._pick_device()
        self.model = model.to(self.device)
        self._wrapped_model: torch.nn.Module | None = None
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.data_collator = data_collator or default_data_collator
        self.compute_metrics = compute_metrics
        self.processing_class = processing_class
        self.optimizer, self.lr_scheduler = optimizers
        # run identity (trainer_lib.identity): what the caller adds to the fingerprint (e.g. the training data's
        # content hash), and which of optimizer/scheduler the caller built (then they, not the arguments, count)
        self.fingerprint_extra = dict(fingerprint_extra or {})
        self._given_optimizers = optimizers
        self.state = TrainerState(
            is_local_process_zero=self.dist.is_local_zero, is_world_process_zero=self.dist.is_world_zero
        )
        self.control = TrainerControl()
        self.is_in_train = False
        self.checkpointer = Checkpointer(self)
        self._eval_loaders: dict[tuple, tuple] = {}
        self._step_learning_rate: float | None = None
        if self.dist.is_world_zero:
            # As the reference does: callbacks may write into output_dir from on_init_end (e.g. CodeCarbon's
            # emissions.csv). An empty folder only; nothing is written into it here.
            os.makedirs(self.args.output_dir, exist_ok=True)

        default_callbacks = [DefaultFlowCallback] + resolve_report_to(self.args.report_to)
        all_callbacks = default_callbacks + list(callbacks or [])
        all_callbacks.append(PrinterCallback if self.args.disable_tqdm else ProgressCallback)
        self.callback_handler = CallbackHandler(
            all_callbacks, self.model, self.processing_class, self.optimizer, self.lr_scheduler
        )
        self.callback_handler.strict_integrations = self.args.strict_integrations
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    # -- setup -----------------------------------------------------------------------------------------------
    def _pick_device(self) -> torch.device:
        if torch.cuda.is_available() and not self.args.use_cpu:
            return torch.device("cuda", self.dist.local_rank)
        return torch.device("cpu")

    def add_callback(self, callback) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        if self.optimizer is None:
            self.optimizer = create_optimizer(self.model, self.args)
        if self.lr_scheduler is None:
            self.lr_scheduler = create_scheduler(self.optimizer, self.args, num_training_steps)
        self.callback_handler.optimizer = self.optimizer
        self.callback_handler.lr_scheduler = self.lr_scheduler

    def _training_model(self) -> torch.nn.Module:
        if self._wrapped_model is not None:
            return self._wrapped_model
        model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        if self.args.torch_compile:
            model = torch.compile(model)
        self._wrapped_model = model
        return model

    def _autocast(self):
        if self.args.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch):
        if self.device.type == "cpu":
            return batch
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    # -- training --------------------------------------------------------------------------------------------
    def _plan(self) -> _Plan:
        args = self.args
        dataloader = self.get_train_dataloader()
        batches = batches_per_epoch(dataloader)
        updates = max(1, math.ceil(batches / args.gradient_accumulation_steps))
        if args.max_steps > 0:
            return _Plan(dataloader, batches, updates, args.max_steps, math.ceil(args.max_steps / updates))
        return _Plan(dataloader, batches, updates, math.ceil(args.num_train_epochs * updates),
                     math.ceil(args.num_train_epochs))

    def run_fingerprint(self) -> identity.RunFingerprint:
        """What determines this run's math (model, trajectory-changing arguments, ``fingerprint_extra``)."""
        optimizer, scheduler = self._given_optimizers
        return identity.fingerprint(self.model, self.args, optimizer=optimizer, lr_scheduler=scheduler,
                                    extra=self.fingerprint_extra)

    def _begin(self, resume_from_checkpoint, trial, ignore_fingerprint: bool = False
               ) -> tuple[_Plan, ResumePoint | None, torch.nn.Module]:
        """Everything before the first step: the plan, optimizer and scheduler, the checked checkpoint applied."""
        args = self.args
        if args.eval_strategy != IntervalStrategy.NO and self.eval_dataset is None:
            raise ValueError(f"TrainingArguments.eval_strategy={args.eval_strategy.value!r} needs an eval_dataset")
        self.checkpointer.clean_temporaries()
        plan = self._plan()
        self.create_optimizer_and_scheduler(plan.max_steps)
        target = Target(self.model, self.optimizer, self.lr_scheduler, plan.max_steps, plan.num_train_epochs,
                        plan.updates_per_epoch, args.output_dir)
        # run identity: only a checkpoint of this run is resumed, unless fine-tuning from another was asked for
        identity.attach(self.checkpointer, self.run_fingerprint(), resume_from_checkpoint, ignore_fingerprint)
        point = self.checkpointer.find(resume_from_checkpoint, target)  # read and checked whole, nothing applied
        if point is not None and ignore_fingerprint:  # fine-tuning: the current hyperparameters win
            point = identity.with_current_hyperparameters(point, self.optimizer, self.lr_scheduler)
        self.state = TrainerState(train_batch_size=args.per_device_train_batch_size)
        if point is not None:
            self.checkpointer.apply(point)  # before the model is wrapped: DDP broadcasts rank 0's weights
        model = self._training_model()
        self.callback_handler.model = self.model
        self.callback_handler.train_dataloader = plan.dataloader
        self.state.max_steps, self.state.num_train_epochs = plan.max_steps, plan.num_train_epochs
        self.state.is_local_process_zero = self.dist.is_local_zero
        self.state.is_world_process_zero = self.dist.is_world_zero
        self.state.compute_steps(args, plan.max_steps)
        self.state.is_hyper_param_search = trial is not None
        self.state.trial_name = hpsearch.trial_name(self, trial) if trial is not None else None
        self.state.trial_params = hpsearch.hp_params(trial) if trial is not None else None
        loop = point.loop if point is not None else LoopPosition(0.0, "float32", 0.0, 0)
        self._tr_loss = torch.tensor(loop.tr_loss, dtype=LOSS_DTYPES[loop.tr_loss_dtype], device=self.device)
        self._total_loss_scalar, self._globalstep_last_logged = loop.total_loss_scalar, loop.globalstep_last_logged
        self._guard = NonFiniteGuard(self.device, args.skip_nonfinite_steps)
        self._guard.reset(self.state.global_step)
        return plan, point, model

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_fingerprint: bool = False,
              **kwargs) -> TrainOutput:
        """Train; ``resume_from_checkpoint`` is a checkpoint folder, or True for the newest valid one of this run.

        A checkpoint of another run (another fingerprint) is refused unless ``ignore_fingerprint=True`` with an
        explicit folder: then its weights and optimizer moments are used with the current hyperparameters.
        ``trial`` (a hyperparameter-search trial or a dict of values) applies its values first; with ``model_init``
        every call starts from a fresh model, seeded like the first.
        """
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments {sorted(kwargs)}")
        if ignore_fingerprint and (resume_from_checkpoint is True or not resume_from_checkpoint):
            raise ValueError("train(ignore_fingerprint=True) needs resume_from_checkpoint=<a checkpoint folder>")
        hpsearch.setup_trial(self, trial)
        if self.model_init is not None:
            self._reinit_model(trial)
        # run identity: one training per output folder; only world process zero writes there, so only it locks
        with identity.folder_lock(self.args.output_dir) if self.dist.is_world_zero else contextlib.nullcontext():
            return self._train(resume_from_checkpoint, trial, ignore_fingerprint)

    def _train(self, resume_from_checkpoint, trial, ignore_fingerprint: bool) -> TrainOutput:
        args = self.args
        try:
            plan, point, model = self._begin(resume_from_checkpoint, trial, ignore_fingerprint)
            gas, state, handler = args.gradient_accumulation_steps, self.state, self.callback_handler
            epochs_trained = state.global_step // plan.updates_per_epoch
            batches_to_skip = (state.global_step % plan.updates_per_epoch) * gas
            self.is_in_train = True
            start_time = time.time()
            model.zero_grad(set_to_none=True)
            model.train()  # once: evaluation restores the mode it found, so the per-step cost stays out of the loop
            self.control = handler.on_train_begin(args, state, self.control)
            if point is not None:
                self.checkpointer.restore_rng(point)

            grad_norm: torch.Tensor | None = None
            self._step_learning_rate = None
            dataloader = plan.dataloader
            for epoch in range(epochs_trained, plan.num_train_epochs):
                if state.global_step >= plan.max_steps:
                    break  # resumed from the final checkpoint: nothing left to train
                skipped = batches_to_skip if epoch == epochs_trained else 0
                batches = epoch_batches(dataloader, epoch, skipped, args.seed)
                self.control = handler.on_epoch_begin(args, state, self.control)
                step = -1
                for batch_index, inputs in enumerate(batches, start=skipped):
                    step = batch_index
                    position = step % gas
                    if position == 0:
                        self.control = handler.on_step_begin(args, state, self.control)
                        group = min(gas, plan.batches_per_epoch - step)
                        group_start = self._tr_loss
                    self._tr_loss = self._tr_loss + self.training_step(model, inputs, group)
                    if position + 1 == group:
                        grad_norm = self._update(model, group_start)
                        state.global_step += 1
                        state.epoch = epoch + (step + 1) / plan.batches_per_epoch
                        self.control = handler.on_step_end(args, state, self.control)
                        self._maybe_log_save_evaluate(grad_norm, start_time)
                    else:
                        self.control = handler.on_substep_end(args, state, self.control)
                    if self.control.should_epoch_stop or self.control.should_training_stop:
                        break
                if step < 0:
                    logger.warning("There seems not to be a single sample in your epoch_iterator, stopping training")
                    self.control.should_training_stop = True
                self.control = handler.on_epoch_end(args, state, self.control)
                self._maybe_log_save_evaluate(grad_norm, start_time)
                if self.control.should_training_stop:
                    break
            self.checkpointer.wait()
            self.is_in_train = False
            return self._finish(plan, start_time)
        except BaseException as error:
            self.is_in_train = False
            self.checkpointer.settle_after_error()  # the write in flight completes (or is gone) before we raise
            self.callback_handler.on_train_error(args, self.state, self.control, error)
            raise

    def _update(self, model: torch.nn.Module, group_start: torch.Tensor) -> torch.Tensor | None:
        """Clip, step the optimizer and the schedule, zero the gradients; returns the gradient norm (if clipped)."""
        args, state, handler, step = self.args, self.state, self.callback_handler, self.state.global_step + 1
        grad_norm = None
        if args.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            if not self._guard.skip:
                self._guard.grad_norm(grad_norm, step)
        if self._guard.skip and not self._guard.step_is_finite(self._tr_loss - group_start, grad_norm, step):
            self._tr_loss = group_start  # the skipped step's loss is not counted
        else:
            self.control = handler.on_pre_optimizer_step(args, state, self.control)
            self.optimizer.step()
            self.control = handler.on_optimizer_step(args, state, self.control)
        self._step_learning_rate = self._get_learning_rate()  # the rate this step used: logged as the reference does
        self.lr_scheduler.step()
        release_gradients(model)
        return grad_norm

    def _finish(self, plan: _Plan, start_time: float) -> TrainOutput:
        args, state = self.args, self.state
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            self.checkpointer.load_best()
        self._total_loss_scalar += float(mean_across_ranks(self._tr_loss, self.dist))
        self._guard.check(self._total_loss_scalar, state.global_step)
        train_loss = self._total_loss_scalar / max(state.global_step, 0.001)
        samples = plan.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
        metrics = speed_metrics("train", start_time, num_samples=samples * self.dist.world_size,
                                num_steps=plan.max_steps)
        metrics["total_flos"] = state.total_flos
        metrics["train_loss"] = train_loss
        self.log(metrics)
        self.checkpointer.rotate()
        self.control = self.callback_handler.on_train_end(args, state, self.control)
        return TrainOutput(state.global_step, train_loss, metrics)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], group_size: int = 1) -> torch.Tensor:
        """Forward and backward one micro-batch; returns the detached loss scaled by the accumulation group."""
        if self.device.type != "cpu":
            inputs = self._to_device(inputs)
        if self.args.bf16:
            with self._autocast():
                loss = self.compute_loss(model, inputs)
        else:  # no context manager per step when there is nothing to enter
            loss = self.compute_loss(model, inputs)
        if group_size > 1:
            loss = loss / group_size
        loss.backward()
        return loss.detach()

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False):
        outputs = model(**inputs)
        loss = _loss_of(outputs)
        return (loss, outputs) if return_outputs else loss

    def _get_learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _maybe_log_save_evaluate(self, grad_norm, start_time: float) -> None:
        control, state = self.control, self.state
        self.checkpointer.poll()
        if control.should_log and state.global_step > self._globalstep_last_logged:
            tr_loss_scalar = float(mean_across_ranks(self._tr_loss, self.dist))
            self._guard.check(tr_loss_scalar, state.global_step)
            self._tr_loss = torch.zeros_like(self._tr_loss)
            logs: dict[str, float] = {"loss": tr_loss_scalar / (state.global_step - self._globalstep_last_logged)}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            rate = self._step_learning_rate
            logs["learning_rate"] = rate if rate is not None else self._get_learning_rate()
            self._total_loss_scalar += tr_loss_scalar
            self._globalstep_last_logged = state.global_step
            self.log(logs)
        if self.control.should_evaluate:
            metrics = self.evaluate()
            hpsearch.report(self, metrics)
            new_best = self._determine_best_metric(metrics)
            if self.args.save_strategy == SaveStrategy.BEST:
                self.control.should_save = new_best
        if self.control.should_save:
            loop = LoopPosition(float(self._tr_loss), str(self._tr_loss.dtype).replace("torch.", ""),
                                self._total_loss_scalar, self._globalstep_last_logged)
            self._guard.check(loop.tr_loss, state.global_step)  # never a checkpoint of a diverged model
            if not self.args.max_grad_norm:
                self._guard.parameters(self.model, state.global_step)
            self.checkpointer.save(loop)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record ``logs`` (with the current epoch and step) in log_history and send them to the callbacks."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        output = {**logs, "step": self.state.global_step}
        self.state.log_history.append(output)
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def save_model(self, output_dir: str | None = None) -> str:
        """Write the model's weights (safetensors) and the arguments to ``output_dir``, atomically per file."""
        return self.checkpointer.save_model(output_dir)
