"""Checkpoint I/O for the Trainer: reading a checkpoint to resume from, saving checkpoints and the final model."""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import torch

from . import checkpoint as ckpt
from . import tensorfile
from .distributed import barrier, broadcast_object
from .state import ExportableState, TrainerState

logger = logging.getLogger(__name__)


class CheckpointingMixin:
    """Resume and save; mixed into Trainer (uses its model, optimizer, scheduler, state, control and callbacks)."""

    def _load_resume_source(self, resume_from_checkpoint) -> tuple[str | None, dict[str, Any] | None]:
        """The checkpoint to resume from, fully read and checked; True takes the newest one that reads back whole."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None, None
        if resume_from_checkpoint is not True:
            path = os.fspath(resume_from_checkpoint)
            ckpt.validate_checkpoint(path)
            return path, self._read_checkpoint(path)
        for path in reversed(ckpt.list_checkpoints(self.args.output_dir)):
            try:
                ckpt.validate_checkpoint(path)
                return path, self._read_checkpoint(path)
            except ckpt.CheckpointError as error:
                logger.warning("skipping %s", error)
        raise ValueError(
            f"resume_from_checkpoint=True but no valid checkpoint was found in output_dir {self.args.output_dir!r}"
        )

    def _read_checkpoint(self, path: str) -> dict[str, Any]:
        """Read every part of a checkpoint before applying any, so a bad file changes nothing."""
        try:
            state = TrainerState.load_from_json(os.path.join(path, ckpt.TRAINER_STATE))
            loop = ckpt.load_loop_state(path)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ckpt.CheckpointError(f"checkpoint {path!r}: unreadable state ({error})") from None
        return {
            "weights": ckpt.load_weights(path),
            "optimizer": ckpt.load_optimizer_state(path),
            "scheduler": ckpt.load_scheduler_state(path),
            "rng": ckpt.load_rng_state(path),
            "state": state,
            "loop": loop,
        }

    def _load_weights_into_model(self, weights: dict[str, torch.Tensor], source: str) -> None:
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ckpt.CheckpointError(
                f"{source}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )

    def _restore_callback_states(self) -> None:
        if not self.args.restore_callback_states_from_checkpoint:
            return
        stored = self.state.stateful_callbacks or {}
        targets = self.callback_handler.callbacks + [self.control]
        for name, data in stored.items():
            entries = data if isinstance(data, list) else [data]
            matching = [cb for cb in targets if type(cb).__name__ == name]
            if not matching:
                logger.warning("Checkpoint holds state for callback %s, which this Trainer does not have", name)
                continue
            for callback, entry in zip(matching, entries):
                for key, value in {**entry.get("args", {}), **entry.get("attributes", {})}.items():
                    setattr(callback, key, value)

    def _collect_callback_states(self) -> dict[str, Any]:
        exported: dict[str, Any] = {}
        for cb in self.callback_handler.callbacks + [self.control]:
            if isinstance(cb, ExportableState):
                name = type(cb).__name__
                value = cb.state()
                if name in exported:
                    if not isinstance(exported[name], list):
                        exported[name] = [exported[name]]
                    exported[name].append(value)
                else:
                    exported[name] = value
        return exported

    # -- training --------------------------------------------------------------------------------------------

    # -- saving ----------------------------------------------------------------------------------------------
    def _weights_for_saving(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}

    def _save_checkpoint(self, tr_loss: torch.Tensor) -> None:
        step = self.state.global_step
        if self.state.best_global_step is not None:
            best = os.path.join(self.args.output_dir, f"{ckpt.PREFIX}-{self.state.best_global_step}")
            if self.state.best_global_step == step or os.path.isdir(best):
                self.state.best_model_checkpoint = best
        self.state.stateful_callbacks = self._collect_callback_states()
        if self.dist.is_world_zero:
            detach = self._ckpt_writer.asynchronous
            weights, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
            images, optimizer_meta = {}, None
            if detach:
                # A background write gets its own copy, made here into buffers reused from the previous
                # checkpoint: file images written with direct I/O where the layout allows (trainer_lib.tensorfile).
                self._ckpt_writer.wait()
                if tensorfile.supports(weights):
                    images[ckpt.WEIGHTS] = self._images.stage(ckpt.WEIGHTS, weights, {"format": "pt"})
                    weights = None
                else:
                    weights = self._staging.snapshot(weights, ("weights",))
                split = ckpt.split_optimizer_state(optimizer_state)
                if split is not None and tensorfile.supports(split[0]):
                    images[ckpt.OPTIMIZER_TENSORS] = self._images.stage(ckpt.OPTIMIZER_TENSORS, split[0])
                    optimizer_state, optimizer_meta = None, split[1]
                else:
                    optimizer_state = self._staging.snapshot(optimizer_state, ("optimizer",))
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
            else:
                weights = self._weights_for_saving()
            payload = ckpt.CheckpointPayload(
                images=images,
                optimizer_meta=optimizer_meta,
                step=step,
                weights=weights,
                optimizer=optimizer_state,
                scheduler=copy.deepcopy(self.lr_scheduler.state_dict()),
                rng=ckpt.capture_rng_state(),
                trainer_state_json=self.state.to_json_string(),
                loop_state={
                    "tr_loss": float(tr_loss),
                    "tr_loss_dtype": str(tr_loss.dtype).replace("torch.", ""),
                    "total_loss_scalar": self._total_loss_scalar,
                    "globalstep_last_logged": self._globalstep_last_logged,
                },
                args_json=self.args.to_json_string(),
            )
            if detach:
                self.control.should_save = False
            self._ckpt_writer.submit(payload, self.args.output_dir, self._on_checkpoint_written)
        else:
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        barrier(self.dist)

    def _on_checkpoint_written(self, folder: str) -> None:
        if self.dist.is_world_zero and self.args.save_total_limit:
            ckpt.rotate_checkpoints(self.args.output_dir, self.args.save_total_limit, [self.state.best_model_checkpoint])
        if self._ckpt_writer.asynchronous:
            # Completion of a background write, seen steps later: fire on_save without touching the flags that
            # the flow callback may have set for the current step (should_save was cleared at submission).
            self.control = self.callback_handler.call_event("on_save", self.args, self.state, self.control)
        else:
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _load_best_model(self) -> None:
        path = self.state.best_model_checkpoint
        try:
            ckpt.validate_checkpoint(path)
        except ckpt.CheckpointError as error:
            logger.warning("Could not load the best model: %s", error)
            return
        logger.info("Loading best model from %s (score: %s).", path, self.state.best_metric)
        self._load_weights_into_model(ckpt.load_weights(path), path)

    def save_model(self, output_dir: str | None = None) -> str:
        """Write the model's weights (safetensors) and the arguments to ``output_dir``, atomically per file."""
        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        if self.dist.is_world_zero:
            os.makedirs(output_dir, exist_ok=True)
            weights = self._weights_for_saving()
            target = os.path.join(output_dir, ckpt.WEIGHTS)
            save_file(weights, target + ".tmp", metadata={"format": "pt"})
            os.replace(target + ".tmp", target)
            with open(os.path.join(output_dir, ckpt.ARGS), "w", encoding="utf-8") as f:
                f.write(self.args.to_json_string())
            config = getattr(self.model, "config", None)
            if isinstance(config, dict):
                with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2, sort_keys=True)
        broadcast_object(None, self.dist)
        return output_dir
