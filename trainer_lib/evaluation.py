"""Evaluation and prediction for the Trainer (``evaluate``, ``predict`` and their shared loop)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from .data import iterate_batches
from .distributed import gather_objects


class EvalPrediction:
    """Predictions and labels of an evaluation, given to ``compute_metrics``; unpacks as ``preds, labels``."""

    def __init__(self, predictions, label_ids, inputs=None, losses=None):
        self.predictions = predictions
        self.label_ids = label_ids
        self.inputs = inputs
        self.losses = losses

    def __iter__(self):
        return iter((self.predictions, self.label_ids))

    def __getitem__(self, idx):
        return (self.predictions, self.label_ids)[idx]

    def __len__(self) -> int:
        return 2


class PredictionOutput(NamedTuple):
    predictions: np.ndarray | None
    label_ids: np.ndarray | None
    metrics: dict[str, float]


def _logits_of(outputs: Any):
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and len(outputs) > 1:
        logits = outputs[1]
    return logits


def _loss_or_none(outputs: Any):
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, (tuple, list)) and outputs:
        loss = outputs[0]
    return loss


def _interleave(parts: list[np.ndarray | None], total: int) -> np.ndarray | None:
    """Undo the rank-interleaved split of a sequential sampler and drop the padding."""
    if any(p is None for p in parts):
        return None
    if len(parts) == 1:
        return parts[0][:total]
    stacked = np.stack(parts, axis=1)  # (per_rank, world, ...)
    return stacked.reshape(-1, *stacked.shape[2:])[:total]


def speed_metrics(split: str, start_time: float, num_samples: int | None = None, num_steps: int | None = None):
    runtime = time.time() - start_time
    result = {f"{split}_runtime": round(runtime, 4)}
    if runtime == 0:
        return result
    if num_samples is not None:
        result[f"{split}_samples_per_second"] = round(num_samples / runtime, 3)
    if num_steps is not None:
        result[f"{split}_steps_per_second"] = round(num_steps / runtime, 3)
    return result


class EvaluationMixin:
    """``evaluate`` and ``predict``; mixed into Trainer."""

    def _determine_best_metric(self, metrics: dict[str, float]) -> bool:
        """Whether ``metrics`` hold a new best ``metric_for_best_model`` (recorded in the state); a non-finite value never is."""
        name = self.args.metric_for_best_model
        if name is None:
            return False
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            raise KeyError(
                f"TrainingArguments.metric_for_best_model={name!r}: {key!r} is not in the evaluation metrics "
                f"{sorted(metrics)}; set it to one of them"
            )
        value = metrics[key]
        best = self.state.best_metric
        if not math.isfinite(value):
            return False  # a diverged model is never the best one
        better = best is None or (value > best if self.args.greater_is_better else value < best)
        if better:
            self.state.best_metric = value
            self.state.best_global_step = self.state.global_step
        return better

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate on ``eval_dataset`` (or the Trainer's); metrics are prefixed ``<metric_key_prefix>_``."""
        dataloader = self.get_eval_dataloader(eval_dataset)
        start = time.time()
        output = self.evaluation_loop(dataloader, metric_key_prefix=metric_key_prefix)
        num_samples = len(dataloader.dataset)
        output.metrics.update(self._speed(metric_key_prefix, start, num_samples, len(dataloader)))
        self.log(output.metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, output.metrics)
        return output.metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        """Predictions, labels (when present) and metrics prefixed ``test_`` for ``test_dataset``."""
        dataloader = self.get_test_dataloader(test_dataset)
        start = time.time()
        output = self.evaluation_loop(dataloader, metric_key_prefix=metric_key_prefix)
        output.metrics.update(self._speed(metric_key_prefix, start, len(dataloader.dataset), len(dataloader)))
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, output.metrics)
        return output

    @staticmethod
    def _speed(prefix, start, num_samples, num_steps):
        return speed_metrics(prefix, start, num_samples=num_samples, num_steps=num_steps)

    def prediction_step(self, model, inputs: dict[str, Any]):
        """(loss, logits, labels) of one batch, without gradients."""
        inputs = self._to_device(inputs)
        labels = inputs.get("labels")
        if torch.is_inference_mode_enabled() and not self.args.bf16:  # inside evaluation_loop: the common case
            outputs = model(**inputs)
        elif torch.is_inference_mode_enabled():
            with self._autocast():
                outputs = model(**inputs)
        else:
            with torch.inference_mode(), self._autocast():
                outputs = model(**inputs)
        loss = _loss_or_none(outputs) if labels is not None else None
        return loss, _logits_of(outputs), labels

    def evaluation_loop(self, dataloader, metric_key_prefix: str = "eval") -> PredictionOutput:
        self.callback_handler.eval_dataloader = dataloader
        model = self.model
        was_training = model.training
        # Switching modes walks every module, a visible cost in a short evaluation: only when something trains.
        switch = any(m.training for m in model.modules())
        if switch:
            model.eval()
        total_loss: float | None = None
        logits_parts: list[torch.Tensor] = []
        label_parts: list[torch.Tensor] = []
        seen = 0
        # Per batch, only what is needed: a prediction_step override is honoured, and the event goes out only when
        # a callback listens (calls that do nothing show in a short evaluation of a small model).
        step = self.prediction_step
        handler = self.callback_handler
        notify = handler.has_listeners("on_prediction_step")
        try:
            with torch.inference_mode():
                for inputs in iterate_batches(dataloader):
                    loss, logits, labels = step(model, inputs)
                    batch = next(iter(inputs.values())).shape[0]
                    seen += batch
                    if loss is not None:
                        total_loss = (total_loss or 0.0) + loss.item() * batch
                    if logits is not None:
                        logits_parts.append(logits)
                    if labels is not None:
                        label_parts.append(labels)
                    if notify:
                        self.control = handler.on_prediction_step(self.args, self.state, self.control)
        finally:
            if switch:
                model.train(was_training)

        preds = torch.cat(logits_parts).float().cpu().numpy() if logits_parts else None
        labels = torch.cat(label_parts).cpu().numpy() if label_parts else None
        if self.dist.enabled:
            gathered = gather_objects((total_loss, seen, preds, labels), self.dist)
            total = len(dataloader.dataset)
            losses_g = [g[0] for g in gathered]
            total_loss = sum(losses_g) if all(v is not None for v in losses_g) else None
            seen = sum(g[1] for g in gathered)
            preds = _interleave([g[2] for g in gathered], total)
            labels = _interleave([g[3] for g in gathered], total)

        metrics: dict[str, float] = {}
        if self.compute_metrics is not None and preds is not None and labels is not None:
            metrics = dict(self.compute_metrics(EvalPrediction(predictions=preds, label_ids=labels)))
        if total_loss is not None and seen:
            metrics["loss"] = total_loss / seen
        for key in list(metrics):
            if not key.startswith(f"{metric_key_prefix}_"):
                metrics[f"{metric_key_prefix}_{key}"] = metrics.pop(key)
        for key, value in metrics.items():
            if isinstance(value, (np.floating, np.integer)):
                metrics[key] = value.item()
        return PredictionOutput(predictions=preds, label_ids=labels, metrics=metrics)
