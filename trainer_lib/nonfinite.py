"""Non-finite losses and gradient norms: training stops with a one-line error (or, opted in, skips the step).

The checks cost (almost) nothing per step: the loss is checked where it is turned into a number anyway (at each
log and before each checkpoint); the gradient norm that clipping computes is checked every step on the CPU, and on
an accelerator folded into a flag on the device (no synchronisation) that is read at those same moments. Skipping
steps (``skip_nonfinite_steps=True``) has to decide before each update, so it reads both values every step.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """Training met a non-finite loss or gradient norm and stopped; the message names the step."""


class NonFiniteGuard:
    """Where training checks that its loss and gradient norm are finite, and what it does when they are not."""

    def __init__(self, device: torch.device, skip: bool) -> None:
        self.skip = skip
        self._per_step = device.type == "cpu"  # reading a CPU value needs no device synchronisation
        self._flag: torch.Tensor | None = None  # any non-finite gradient norm since the last check (accelerator)
        self._checked_at = 0

    def reset(self, step: int) -> None:
        self._flag, self._checked_at = None, step

    def grad_norm(self, norm: torch.Tensor, step: int) -> None:
        """Called with each step's gradient norm (``step`` is the update about to be made, 1-based)."""
        if self._per_step:
            if not math.isfinite(norm):
                self._stop(step, f"the gradient norm is {float(norm)}", exact=True)
        else:
            bad = ~torch.isfinite(norm)
            self._flag = bad if self._flag is None else self._flag | bad

    def check(self, loss: float, step: int, what: str = "the training loss") -> None:
        """At a log or a checkpoint: ``loss`` (already a number) and the device flag must be finite/clear."""
        if not math.isfinite(loss):
            self._stop(step, f"{what} is {loss}")
        if self._flag is not None and bool(self._flag):
            self._stop(step, "a gradient norm is not finite")
        self.reset(step)

    def parameters(self, model: torch.nn.Module, step: int) -> None:
        """Before a checkpoint when no gradient norm is computed (no clipping): the weights must be finite."""
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point()):
            self._stop(step, "the model's weights are not finite")

    def step_is_finite(self, group_loss: torch.Tensor, norm: torch.Tensor | None, step: int) -> bool:
        """Skip mode: whether the update of ``step`` may be made; a skipped one is logged."""
        loss_value = float(group_loss)
        norm_value = float(norm) if norm is not None else 0.0
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            return True
        logger.warning("step %d: skipped the update (loss %s, gradient norm %s are not finite)", step, loss_value,
                       norm_value if norm is not None else "not computed")
        return False

    def _stop(self, step: int, reason: str, exact: bool = False) -> None:
        since = "" if exact or step - self._checked_at <= 1 else f" (it was finite at step {self._checked_at})"
        raise NonFiniteLossError(
            f"training stopped at step {step}: {reason}{since}; no checkpoint of it is written, the last one is "
            "kept (TrainingArguments.skip_nonfinite_steps=True skips such steps instead)"
        )
