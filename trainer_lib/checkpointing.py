"""The Checkpointer: one object, owned by the Trainer, that saves checkpoints and finds, reads and applies the one
to resume from. It holds the background writer, its staging buffers and file images; the on-disk format lives in
trainer_lib.checkpoint, the checks of what is read in trainer_lib.resume.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import checkpoint as ckpt
from . import identity, tensorfile
from .callback_state import collect_callback_states, restore_callback_states
from .checkpoint import CheckpointError
from .distributed import barrier, broadcast_object
from .redaction import redact
from .resume import (
    LoopPosition,
    ResumePoint,
    Target,
    capture_rng,
    check_weights,
    read_resume_point,
    restore_rng,
)
from .writer import CheckpointWriter, StagingArea

if TYPE_CHECKING:
    from .trainer import Trainer

logger = logging.getLogger(__name__)


class Checkpointer:
    """Checkpoints of one Trainer: ``save`` writes one (in the background with ``async_checkpointing``), ``find`` /
    ``load`` return a checked ``ResumePoint`` and ``apply`` puts it into the Trainer.

    ``accept`` (a predicate on a checkpoint folder) lets a caller narrow which checkpoints ``resume=True`` may take,
    e.g. only those of the same run.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.writer = CheckpointWriter(asynchronous=trainer.args.async_checkpointing)
        self._staging = StagingArea()
        self._images = tensorfile.ImageStaging()
        self.accept: Callable[[str], bool] | None = None
        #: the run's fingerprint (trainer_lib.identity.attach): written into every checkpoint, limits rotation
        self.fingerprint = None

    @property
    def output_dir(self) -> str:
        return self.trainer.args.output_dir

    def folder(self, step: int) -> str:
        return os.path.join(self.output_dir, f"{ckpt.PREFIX}-{step}")

    # -- resuming --------------------------------------------------------------------------------------------
    def find(self, resume_from_checkpoint: str | bool | None, target: Target) -> ResumePoint | None:
        """The checked checkpoint to resume from: the given folder, or with True the newest one that is complete,
        fits this run and is accepted; refused ones are skipped with a warning naming the file."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is not True:
            return self.load(os.fspath(resume_from_checkpoint), target)
        for path in reversed(ckpt.list_checkpoints(self.output_dir)):
            if self.accept is not None and not self.accept(path):
                continue
            try:
                return self.load(path, target)
            except CheckpointError as error:
                logger.warning("skipping %s", error)
        raise ValueError(
            f"resume_from_checkpoint=True but no valid checkpoint was found in output_dir {self.output_dir!r}"
        )

    def load(self, path: str, target: Target) -> ResumePoint:
        """Read and check the checkpoint at ``path``; CheckpointError naming the file and field if it does not fit."""
        return read_resume_point(path, target)

    def apply(self, point: ResumePoint) -> None:
        """Put a checked ResumePoint into the Trainer (weights, optimizer, scheduler, state, callback states); the
        RNG follows at the start of training (``restore_rng``). Every value was checked: nothing here can fail."""
        trainer = self.trainer
        trainer.model.load_state_dict(point.weights, strict=True)  # in place: tied parameters stay tied
        trainer.optimizer.load_state_dict(point.optimizer)
        trainer.lr_scheduler.load_state_dict(point.scheduler)
        trainer.state = point.state
        if trainer.args.restore_callback_states_from_checkpoint:
            restore_callback_states(trainer.callback_handler.callbacks + [trainer.control],
                                    point.state.stateful_callbacks, os.path.join(point.path, ckpt.TRAINER_STATE))
        logger.info("Resuming from %s at global step %d", point.path, point.global_step)

    @staticmethod
    def restore_rng(point: ResumePoint) -> None:
        restore_rng(point.rng)

    # -- saving ----------------------------------------------------------------------------------------------
    def save(self, loop: LoopPosition) -> str:
        """Write the checkpoint of the current step (on world rank 0); returns its folder. With async_checkpointing
        the folder appears when the background write completes, and on_save fires then."""
        trainer = self.trainer
        state, step = trainer.state, trainer.state.global_step
        if state.best_global_step is not None:
            best = self.folder(state.best_global_step)
            if state.best_global_step == step or os.path.isdir(best):
                state.best_model_checkpoint = best
        state.stateful_callbacks = collect_callback_states(trainer.callback_handler.callbacks + [trainer.control])
        if trainer.dist.is_world_zero:
            detach = self.writer.asynchronous
            if detach:
                self.writer.wait()  # the buffers below are the previous write's: it must be done
                weights, images, optimizer_state, optimizer_meta = self._stage()
            else:
                weights, images, optimizer_meta = _weights_for_saving(trainer.model), {}, None
                optimizer_state = trainer.optimizer.state_dict()
            if self.fingerprint is not None:  # run identity: never overwrite another run's checkpoint-<step>
                identity.set_aside_other_run(self.output_dir, step, self.fingerprint)
            payload = ckpt.CheckpointPayload(
                texts={identity.FINGERPRINT: self.fingerprint.to_json()} if self.fingerprint is not None else {},
                images=images, optimizer_meta=optimizer_meta, step=step, weights=weights, optimizer=optimizer_state,
                scheduler=copy.deepcopy(trainer.lr_scheduler.state_dict()), rng=capture_rng(),
                trainer_state_json=state.to_json_string(), loop_state=loop.to_json(),
                args_json=trainer.args.to_json_string(),
            )
            if detach:
                trainer.control.should_save = False
            self.writer.submit(payload, self.output_dir, self._written)
        else:
            trainer.control = trainer.callback_handler.on_save(trainer.args, state, trainer.control,
                                                               checkpoint_folder=self.folder(step))
        barrier(trainer.dist)
        return self.folder(step)

    def _stage(self) -> tuple:
        """Copies for a background write, made into buffers reused from the previous checkpoint: file images
        written with direct I/O where the layout allows (trainer_lib.tensorfile)."""
        trainer = self.trainer
        weights, aliases = ckpt.split_shared(trainer.model.state_dict())
        optimizer_state = trainer.optimizer.state_dict()
        images, optimizer_meta = {}, None
        if tensorfile.supports(weights):
            images[ckpt.WEIGHTS] = self._images.stage(ckpt.WEIGHTS, weights, ckpt.aliases_metadata(aliases))
            weights = None
        else:
            weights = self._staging.snapshot(weights, ("weights",))
            weights.update({alias: weights[name] for alias, name in aliases.items()})
        split = ckpt.split_optimizer_state(optimizer_state)
        if split is not None and tensorfile.supports(split[0]):
            images[ckpt.OPTIMIZER_TENSORS] = self._images.stage(ckpt.OPTIMIZER_TENSORS, split[0])
            optimizer_state, optimizer_meta = None, split[1]
        else:
            optimizer_state = self._staging.snapshot(optimizer_state, ("optimizer",))
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return weights, images, optimizer_state, optimizer_meta

    def _written(self, folder: str) -> None:
        trainer = self.trainer
        if trainer.dist.is_world_zero and trainer.args.save_total_limit:
            ckpt.rotate_checkpoints(self.output_dir, trainer.args.save_total_limit,
                                    [trainer.state.best_model_checkpoint, folder], mine=self._mine())
        if self.writer.asynchronous:
            # Completion of a background write, seen steps later: fire on_save without touching the flags that
            # the flow callback may have set for the current step (should_save was cleared at submission).
            trainer.control = trainer.callback_handler.call_event("on_save", trainer.args, trainer.state,
                                                                  trainer.control, checkpoint_folder=folder)
        else:
            trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control,
                                                               checkpoint_folder=folder)

    def poll(self) -> None:
        """Finish a completed background write (its error, if any, is raised here); never blocks."""
        self.writer.poll()

    def wait(self) -> None:
        """Block until the write in flight is complete; raises its error."""
        self.writer.wait()

    def settle_after_error(self) -> None:
        """Training raised: let the write in flight finish (its folder is complete or absent) before the error
        propagates; a write error here is logged, never raised over the training error."""
        try:
            self.writer.wait()
        except BaseException as error:  # noqa: BLE001 - the training error is the one to raise
            logger.error("the background checkpoint write failed too: %s", error)

    def clean_temporaries(self) -> None:
        if self.trainer.dist.is_world_zero:
            for name in ckpt.clean_stale_temporaries(self.output_dir):
                logger.info("removed %s, left by a checkpoint write that did not finish", name)

    def rotate(self) -> None:
        args = self.trainer.args
        if self.trainer.dist.is_world_zero and args.save_total_limit:
            ckpt.rotate_checkpoints(self.output_dir, args.save_total_limit, [self.trainer.state.best_model_checkpoint],
                                    mine=self._mine())

    def _mine(self) -> Callable[[str], bool] | None:
        """Rotation counts and deletes only checkpoints of this run (same fingerprint)."""
        fingerprint = self.fingerprint
        return None if fingerprint is None else (lambda path: identity.belongs_to(path, fingerprint))

    # -- the best and the final model ------------------------------------------------------------------------
    def load_best(self) -> None:
        """Load the best checkpoint's weights into the model, when they read back whole and fit it."""
        trainer = self.trainer
        path = trainer.state.best_model_checkpoint
        try:
            ckpt.validate_checkpoint(path)
            weights = ckpt.load_weights(path)
            check_weights(weights, trainer.model, os.path.join(path, ckpt.WEIGHTS))
        except CheckpointError as error:
            logger.warning("Could not load the best model: %s", error)
            return
        logger.info("Loading best model from %s (score: %s).", path, trainer.state.best_metric)
        trainer.model.load_state_dict(weights, strict=True)

    def save_model(self, output_dir: str | None = None) -> str:
        """Write the model's weights (safetensors, ties stored once) and the arguments, atomically per file."""
        from safetensors.torch import save_file

        trainer = self.trainer
        output_dir = output_dir or self.output_dir
        if trainer.dist.is_world_zero:
            os.makedirs(output_dir, exist_ok=True)
            weights, aliases = ckpt.split_shared(_weights_for_saving(trainer.model))
            target = os.path.join(output_dir, ckpt.WEIGHTS)
            save_file(weights, target + ".tmp", metadata=ckpt.aliases_metadata(aliases))
            os.replace(target + ".tmp", target)
            with open(os.path.join(output_dir, ckpt.ARGS), "w", encoding="utf-8") as f:
                f.write(trainer.args.to_json_string())
            config = getattr(trainer.model, "config", None)
            if isinstance(config, dict):
                with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
                    json.dump(redact(config), f, indent=2, sort_keys=True, default=str)
        broadcast_object(None, trainer.dist)
        return output_dir


def _weights_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the weights; a tied tensor is copied once and appears under each of its names."""
    unique, aliases = ckpt.split_shared(model.state_dict())
    weights = {name: t.detach().contiguous().cpu() for name, t in unique.items()}
    weights.update({alias: weights[name] for alias, name in aliases.items()})
    return weights
