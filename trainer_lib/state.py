"""TrainerState and TrainerControl: the data a callback reads and the flags it may set."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class ExportableState:
    """A callback (or the control) whose state is saved in checkpoints and restored on resume.

    ``state()`` returns ``{"args": {...}, "attributes": {...}}``: ``args`` are constructor arguments,
    ``attributes`` are values set on the object after construction. Its keys declare what may be restored: on
    resume a stored value is set only for a declared name, with the type the fresh instance holds
    (trainer_lib.callback_state).
    """

    def state(self) -> dict:
        raise NotImplementedError("You must implement a `state` function to utilize this class.")

    @classmethod
    def from_state(cls, state: dict):
        """A new instance from ``state``: constructed with its ``args``, then its declared attributes restored."""
        from .callback_state import restore_callback_states

        instance = cls(**state.get("args", {}))
        restore_callback_states([instance], {cls.__name__: {"attributes": state.get("attributes", {})}},
                                f"{cls.__name__}.from_state")
        return instance


@dataclass
class TrainerState:
    """The state of a training run, shared with every callback and saved as ``trainer_state.json``.

    One "step" is one optimizer update: with gradient accumulation it covers several forward/backward passes.
    """

    epoch: float | None = None
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0
    log_history: list[dict[str, float]] = None  # type: ignore[assignment]
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict[str, Any] | None = None
    stateful_callbacks: list[Any] | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.log_history is None:
            self.log_history = []
        if self.stateful_callbacks is None:
            self.stateful_callbacks = {}
        elif isinstance(self.stateful_callbacks, dict):
            pass  # already serialised (loaded from JSON)
        else:
            from .callback_state import collect_callback_states, declared_state

            for callback in self.stateful_callbacks:
                if declared_state(callback) is None:
                    raise TypeError(
                        "All callbacks passed to be saved must have a `state()` returning {'args': ..., 'attributes': "
                        f"...}} (e.g. inherit `ExportableState`), but received {type(callback)}"
                    )
            self.stateful_callbacks = collect_callback_states(self.stateful_callbacks)

    def save_to_json(self, json_path: str) -> None:
        """Save this state as JSON to ``json_path``."""
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def to_json_string(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load_from_json(cls, json_path: str) -> TrainerState:
        """Create a state from ``json_path``; unknown keys are ignored with a warning."""
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{json_path}: expected a JSON object with the trainer state, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("%s: ignoring unknown trainer state keys %s", json_path, unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def compute_steps(self, args, max_steps: int) -> None:
        """Resolve logging/eval/save steps given as a ratio (< 1) of ``max_steps`` into absolute counts."""
        for name in ("logging", "eval", "save"):
            value = getattr(args, f"{name}_steps")
            if value is None:
                continue
            if value < 1:
                value = math.ceil(max_steps * value)
            setattr(self, f"{name}_steps", int(value))


@dataclass
class TrainerControl(ExportableState):
    """Flags a callback sets to change the training loop's flow."""

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self) -> None:
        self.should_training_stop = False

    def _new_epoch(self) -> None:
        self.should_epoch_stop = False

    def _new_step(self) -> None:
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False

    def state(self) -> dict:
        return {"args": {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "attributes": {}}

