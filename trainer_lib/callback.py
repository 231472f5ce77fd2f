"""The callback API: TrainerCallback (every event, documented where defined) and CallbackHandler.

A callback may inspect everything it is given; the only thing it may change is the ``TrainerControl``. An event
that returns a control replaces the control handed to the next callback.
"""

from __future__ import annotations

import logging
from typing import Any

from .state import TrainerControl, TrainerState

logger = logging.getLogger(__name__)

EVENTS = (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_train_error",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_substep_end",
    "on_step_end",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_log",
    "on_prediction_step",
    "on_push_begin",
)


class TrainerCallback:
    """Base class for callbacks. Every event receives ``(args, state, control, **kwargs)``.

    kwargs always hold ``model``, ``processing_class``, ``optimizer``, ``lr_scheduler``, ``train_dataloader`` and
    ``eval_dataloader``; ``on_evaluate`` and ``on_predict`` also get ``metrics``, ``on_log`` gets ``logs``.
    """

    def on_init_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """At the end of the Trainer's ``__init__``."""

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """At the beginning of training (after a checkpoint to resume from is loaded)."""

    def on_train_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """At the end of training, after the final train summary was logged."""

    def on_train_error(self, args, state: TrainerState, control: TrainerControl, error=None, **kwargs):
        """Beyond the reference: training raised ``error`` (it is re-raised after this event); close runs here."""

    def on_epoch_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """At the beginning of an epoch."""

    def on_epoch_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """At the end of an epoch."""

    def on_step_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """At the beginning of a training step (one optimizer update, possibly several micro-batches)."""

    def on_pre_optimizer_step(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """Before the optimizer step, after gradient clipping."""

    def on_optimizer_step(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """After the optimizer step, before gradients are zeroed."""

    def on_substep_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """After each micro-batch of a gradient-accumulation group except the last."""

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """At the end of a training step, after ``global_step`` was incremented."""

    def on_evaluate(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """After an evaluation; kwargs hold ``metrics``."""

    def on_predict(self, args, state: TrainerState, control: TrainerControl, metrics, **kwargs):
        """After a successful ``predict``; ``metrics`` are the prediction metrics."""

    def on_save(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """After a checkpoint was saved (its folder is complete and in place). Beyond the reference, kwargs hold
        ``checkpoint_folder``, the folder just written, for subclasses of this class (reference callbacks get the
        reference's kwargs): a tracker never has to rescan ``output_dir``, which rotation and background writes race."""

    def on_log(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """After logging; kwargs hold ``logs``."""

    def on_prediction_step(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """After each prediction (evaluation) batch."""

    def on_push_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        """Before a push to a model hub. flytrain pushes nothing itself, so the Trainer never fires it; it exists so
        that a callback written for the reference (which fires it in ``push_to_hub``) implements a known event."""


class IntegrationCallback(TrainerCallback):
    """Base for tracker integrations chosen through ``report_to``.

    The handler isolates them: an exception raised by an integration is reported once, the integration is
    disabled for the rest of the run and training goes on (unless ``args.strict_integrations``).
    """

    #: report_to name, e.g. "mlflow"
    integration_name: str = ""
    #: import names that must be importable for the integration to be available
    required_modules: tuple[str, ...] = ()
    #: the pip extra that installs them
    pip_extra: str = ""

    @classmethod
    def is_available(cls) -> bool:
        import importlib.util

        return all(importlib.util.find_spec(m) is not None for m in cls.required_modules)

    def on_integration_error(self, event: str, error: BaseException) -> None:
        """Called once when this integration failed and was disabled; release resources here."""


#: event keywords this project adds to the reference's (see ``CallbackHandler.call_event``)
_EXTRA_KWARGS = ("checkpoint_folder",)


def _overrides(callback: TrainerCallback, event: str) -> bool:
    method = getattr(type(callback), event, None)
    return method is not None and method is not getattr(TrainerCallback, event)


class CallbackHandler(TrainerCallback):
    """Calls the registered callbacks in order for every event."""

    def __init__(self, callbacks, model, processing_class, optimizer, lr_scheduler):
        self.callbacks: list[TrainerCallback] = []
        for cb in callbacks:
            self.add_callback(cb)
        self.model = model
        self.processing_class = processing_class
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_dataloader = None
        self.eval_dataloader = None
        self.strict_integrations = False
        if not any(type(cb).__name__ == "DefaultFlowCallback" for cb in self.callbacks):
            logger.warning(
                "The Trainer will not work properly if you don't have a `DefaultFlowCallback` in its callbacks. You\n"
                "should add one before training with `trainer.add_callback(DefaultFlowCallback)`. The current list of"
                "callbacks is\n:" + self.callback_list
            )

    # -- registry of callbacks -------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        # Per event, only the callbacks that implement it: keeps the per-step cost independent of no-op events.
        self._listeners = {e: [cb for cb in self.callbacks if _overrides(cb, e)] for e in EVENTS}

    def add_callback(self, callback) -> None:
        cb = callback() if isinstance(callback, type) else callback
        cb_class = callback if isinstance(callback, type) else callback.__class__
        if cb_class in [c.__class__ for c in self.callbacks]:
            logger.warning(
                "You are adding a %s to the callbacks of this Trainer, but there is already one. The current "
                "list of callbacks is:\n%s",
                cb_class,
                self.callback_list,
            )
        self.callbacks.append(cb)
        self._rebuild()

    def pop_callback(self, callback):
        if isinstance(callback, type):
            for cb in self.callbacks:
                if isinstance(cb, callback):
                    self.callbacks.remove(cb)
                    self._rebuild()
                    return cb
        else:
            for cb in self.callbacks:
                if cb == callback:
                    self.callbacks.remove(cb)
                    self._rebuild()
                    return cb
        return None

    def remove_callback(self, callback) -> None:
        self.pop_callback(callback)

    @property
    def callback_list(self) -> str:
        return "\n".join(cb.__class__.__name__ for cb in self.callbacks)

    # -- events ----------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control):
        return self.call_event("on_init_end", args, state, control)

    def on_train_begin(self, args, state, control):
        control.should_training_stop = False
        return self.call_event("on_train_begin", args, state, control)

    def on_train_end(self, args, state, control):
        return self.call_event("on_train_end", args, state, control)

    def on_train_error(self, args, state, control, error):
        """Tell every callback that training failed; an exception here is logged, never hides ``error``."""
        for callback in self._listeners["on_train_error"]:
            try:
                callback.on_train_error(args, state, control, error=error, model=self.model,
                                        processing_class=self.processing_class, optimizer=self.optimizer,
                                        lr_scheduler=self.lr_scheduler, train_dataloader=self.train_dataloader,
                                        eval_dataloader=self.eval_dataloader)
            except Exception as hook_error:
                logger.warning("%s.on_train_error failed: %s", type(callback).__name__, hook_error)
        return control

    def on_epoch_begin(self, args, state, control):
        control.should_epoch_stop = False
        return self.call_event("on_epoch_begin", args, state, control)

    def on_epoch_end(self, args, state, control):
        return self.call_event("on_epoch_end", args, state, control)

    def on_step_begin(self, args, state, control):
        control.should_log = False
        control.should_evaluate = False
        control.should_save = False
        return self.call_event("on_step_begin", args, state, control)

    def on_pre_optimizer_step(self, args, state, control):
        return self.call_event("on_pre_optimizer_step", args, state, control)

    def on_optimizer_step(self, args, state, control):
        return self.call_event("on_optimizer_step", args, state, control)

    def on_substep_end(self, args, state, control):
        return self.call_event("on_substep_end", args, state, control)

    def on_step_end(self, args, state, control):
        return self.call_event("on_step_end", args, state, control)

    def on_evaluate(self, args, state, control, metrics):
        control.should_evaluate = False
        return self.call_event("on_evaluate", args, state, control, metrics=metrics)

    def on_predict(self, args, state, control, metrics):
        return self.call_event("on_predict", args, state, control, metrics=metrics)

    def on_save(self, args, state, control, checkpoint_folder: str | None = None):
        control.should_save = False
        return self.call_event("on_save", args, state, control, checkpoint_folder=checkpoint_folder)

    def on_log(self, args, state, control, logs):
        control.should_log = False
        return self.call_event("on_log", args, state, control, logs=logs)

    def on_prediction_step(self, args, state, control):
        return self.call_event("on_prediction_step", args, state, control)

    def on_push_begin(self, args, state, control):
        return self.call_event("on_push_begin", args, state, control)

    def has_listeners(self, event: str) -> bool:
        """Whether any callback implements ``event`` (callers may skip building its arguments)."""
        return bool(self._listeners[event])

    def call_event(self, event: str, args, state, control, **kwargs: Any):
        listeners = self._listeners[event]
        if not listeners:
            return control
        # Keywords beyond the reference's (on_save's checkpoint_folder) reach only this project's callbacks, so a
        # callback written for the reference sees exactly the reference's kwargs.
        native = {k: kwargs.pop(k) for k in _EXTRA_KWARGS if k in kwargs} if kwargs else None
        for callback in listeners:
            extra = native if native and isinstance(callback, TrainerCallback) else {}
            try:
                result = getattr(callback, event)(
                    args,
                    state,
                    control,
                    model=self.model,
                    processing_class=self.processing_class,
                    optimizer=self.optimizer,
                    lr_scheduler=self.lr_scheduler,
                    train_dataloader=self.train_dataloader,
                    eval_dataloader=self.eval_dataloader,
                    **kwargs,
                    **extra,
                )
            except Exception as error:
                if not isinstance(callback, IntegrationCallback) or self.strict_integrations:
                    raise
                self._disable_integration(callback, event, error)
                continue
            # A callback can skip the return of `control` if it doesn't change it.
            if result is not None:
                control = result
        return control

    def _disable_integration(self, callback: IntegrationCallback, event: str, error: Exception) -> None:
        name = callback.integration_name or type(callback).__name__
        logger.warning(
            "Integration %r failed in %s: %s: %s. It is disabled for the rest of this run; training goes on "
            "(set strict_integrations=True to make this fatal).",
            name,
            event,
            type(error).__name__,
            error,
        )
        if callback in self.callbacks:
            self.callbacks.remove(callback)
            self._rebuild()
        try:
            callback.on_integration_error(event, error)
        except Exception as cleanup_error:  # the integration is already broken; never let cleanup stop training
            logger.debug("cleanup of integration %r failed: %s", name, cleanup_error)
