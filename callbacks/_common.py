"""Helpers shared by every integration: env flags, log-key rewriting, parameter flattening, secret redaction."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from trainer_lib.callback import IntegrationCallback
from trainer_lib.envvars import env_seconds  # noqa: F401 (re-exported: the trackers read their timeouts with it)
from trainer_lib.redaction import REDACTED, is_secret_key, redact, secret_values  # noqa: F401 (re-exported)

from ._sending import FailureBudget, Sender

logger = logging.getLogger(__name__)

TRUE_VALUES = {"1", "true", "yes", "on", "y", "t"}
FALSE_VALUES = {"0", "false", "no", "off", "n", "f", ""}



def env_flag(name: str, default: bool = False) -> bool:
    """A boolean environment variable; an unrecognised value is an error naming the variable."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected one of true/false/1/0/yes/no")


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """An environment variable restricted to ``choices`` (case-insensitive)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ValueError(f"environment variable {name}={raw!r}: expected one of {list(choices)}")
    return value


def rewrite_logs(logs: Mapping[str, Any]) -> dict[str, Any]:
    """``eval_x`` → ``eval/x``, ``test_x`` → ``test/x``, anything else → ``train/x``."""
    out = {}
    for key, value in logs.items():
        if key.startswith("eval_"):
            out["eval/" + key[len("eval_") :]] = value
        elif key.startswith("test_"):
            out["test/" + key[len("test_") :]] = value
        else:
            out["train/" + key] = value
    return out


def numeric_items(logs: Mapping[str, Any]) -> tuple[dict[str, float], list[str]]:
    """Split logs into numeric values (bools excluded) and the names of the others."""
    numbers, skipped = {}, []
    for key, value in logs.items():
        if isinstance(value, bool):
            skipped.append(key)
        elif isinstance(value, (int, float)):
            numbers[key] = value
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            numbers[key] = value.item()
        else:
            skipped.append(key)
    return numbers, skipped


def flatten_dict(data: Mapping[str, Any], parent: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings as one level with ``sep``-joined keys."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{parent}{sep}{key}" if parent else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_dict(value, name, sep))
        else:
            out[name] = value
    return out


def training_params(args, model=None) -> dict[str, Any]:
    """The run's parameters for a tracker: training args plus model information, redacted."""
    params = dict(args.to_sanitized_dict()) if hasattr(args, "to_sanitized_dict") else dict(args)
    if model is not None:
        config = getattr(model, "config", None)
        if isinstance(config, Mapping):
            params.update({f"model.{k}": v for k, v in flatten_dict(config).items()})
        elif config is not None and hasattr(config, "to_dict"):
            params.update({f"model.{k}": v for k, v in flatten_dict(config.to_dict()).items()})
        params["model.class"] = type(model).__name__
        params["model.num_parameters"] = sum(p.numel() for p in model.parameters())
    return redact(params)


def send_interval(tracker: str, default: float = 2.0) -> float:
    """Seconds between two sends of a tracker's coalesced log events: ``FLYTRAIN_<TRACKER>_SEND_INTERVAL``, else
    ``FLYTRAIN_TRACKER_SEND_INTERVAL``, else ``default``."""
    shared = env_seconds("FLYTRAIN_TRACKER_SEND_INTERVAL", default)
    return env_seconds(f"FLYTRAIN_{tracker.upper()}_SEND_INTERVAL", shared)


def send_due(last_send: float | None, interval: float) -> bool:
    """Whether a send interval has passed since ``last_send`` (a ``time.monotonic()`` reading, None before the first
    send). The monotonic clock's origin is arbitrary (boot time on Linux), so "never sent" is its own state rather
    than a reading of 0, which on a machine up for less than ``interval`` would hold the first event back."""
    return last_send is None or time.monotonic() - last_send >= interval


class TrackerCallback(IntegrationCallback):
    """The one lifecycle of every tracker: a subclass implements ``_open`` (start or continue its run, once, on world
    process zero), ``_send(events)`` (hand over log events, ``(global_step, logs)`` in order) and ``_close(failed)``.

    Log events are coalesced and handed over at most once per send interval (``send_interval``, 2 s): calling a
    tracker client at every event wakes its threads or service process, which then preempt training (measured:
    five trackers logging every 10 steps took a 0.85 ms step to 1.3 ms). Everything goes out at once before a
    checkpoint (a resumed run never misses a step), when training stops, at train end and when training raises;
    ``max_buffered_values`` caps a burst. Outside training (evaluate or predict before or after ``train``) a value
    opens the run, goes out at once and the run is closed again. ``on_save`` hands the folder just written to
    ``_log_checkpoint``. With ``background_sends`` the sends run in one daemon thread, bounded at the end by the
    ``FailureBudget`` (FLYTRAIN_TRACKER_TIMEOUT), which every call the training thread waits on goes through.
    """

    #: send in a daemon thread (network trackers); otherwise in the training thread at burst time
    background_sends: bool = False
    #: whether on_predict's metrics are logged like on_log's
    logs_predict_metrics: bool = False

    def __init__(self) -> None:
        self._initialized = False  # _open ran (or was attempted) for the current session
        self._in_train = False
        self._buffer: list[tuple[int, dict[str, Any]]] = []
        self._buffered_values = 0
        self.max_buffered_values: int | None = None
        self._last_send: float | None = None  # None: nothing sent yet, so the first event goes out at once
        self._send_interval = send_interval(self.integration_name or "tracker")
        self._budget = FailureBudget(env_seconds("FLYTRAIN_TRACKER_TIMEOUT", 30.0), self.integration_name)
        self._sender: Sender | None = None
        self._send_error: BaseException | None = None
        self._warned_failure = False
        self._continuing = False  # reopened after training by continue_from: no parameters logged again

    # -- what a tracker implements -------------------------------------------------------------------------
    def _open(self, args, state, model) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _send(self, events: list[tuple[int, dict[str, Any]]]) -> None:
        """Hand log events to the tracker (a tracker that logs nothing per step keeps this no-op)."""

    def _close(self, failed: bool) -> None:
        """End the run (``failed``: training raised or the integration was disabled)."""

    def _log_checkpoint(self, args, state, folder: str) -> None:
        """A checkpoint folder was just written (complete and in place)."""

    def _finish(self, args, state, model) -> None:
        """At train end, after the last events went out and before ``_close``: final artifacts."""

    def _is_open(self) -> bool:
        """Whether there is a run to send to (False e.g. when the tracker is disabled by its own variable)."""
        return True

    def _log_facts(self, tags: dict[str, str], params: dict[str, str], step: int) -> None:
        """Where a run came from (``tags``: flat strings) and extra run parameters, in the tracker's own place for
        them (tags, config, text)."""

    def _log_file(self, path: str) -> None:
        """A result file (the test confusion matrix) attached to the run, where the tracker keeps files."""

    # -- the run after training ------------------------------------------------------------------------------
    def run_reference(self) -> dict[str, Any] | None:
        """What identifies this tracker's run (ids, paths; no secrets): recorded with the model, read back by
        ``continue_from`` in another process. None: no run."""
        return None

    def continue_from(self, reference: dict[str, Any]) -> bool:
        """Point a fresh callback at the run ``reference`` names (as a resumed training continues its run);
        whether that run can be continued here."""
        return False

    def log_facts(self, tags: dict[str, str], params: dict[str, str], step: int = 0) -> None:
        """``_log_facts`` on the open run (nothing when none is open on this process)."""
        if self._initialized and self._is_open():
            self._log_facts(tags, params, step)

    def report_results(self, args, state, metrics: Mapping[str, float], tags: dict[str, str],
                       params: dict[str, str], files: list[str]) -> bool:
        """After training, in this process or another: the run named by ``continue_from`` reopened, ``metrics``
        logged at ``state.global_step``, the facts and ``files`` attached, the run ended again; whether it was
        open."""
        self._continuing, self._in_train = True, False
        if not self._ensure_setup(args, state, None):
            self._end(failed=False)
            return False
        try:
            self._buffer.append((state.global_step, dict(metrics)))
            self.flush()
            self._log_facts(tags, params, state.global_step)
            for path in files:
                self._log_file(path)
        finally:
            self._end(failed=False)
        return True

    # -- the lifecycle ---------------------------------------------------------------------------------------
    def _ensure_setup(self, args, state, model, **kwargs) -> bool:
        """Open once on world process zero; returns whether this process talks to the tracker now."""
        if not state.is_world_process_zero:
            return False
        if not self._initialized:
            self._initialized = True
            self._open(args, state, model)
        return self._is_open()

    def send_pending_logs(self) -> None:
        """Hand every buffered log event to the tracker now (or to the sender thread)."""
        self._raise_send_error()
        events, self._buffer, self._buffered_values = self._buffer, [], 0
        self._last_send = time.monotonic()
        if not events:
            return
        if not self.background_sends:
            self._send(events)
            return
        if self._sender is None:
            self._sender = Sender(self.integration_name, self._send_failed)
        self._sender.submit("send", lambda: self._send(events))

    def _submit(self, what: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` after the sends before it: in the sender thread, or now."""
        if self._sender is None:
            fn()
        else:
            self._sender.submit(what, fn)

    def flush(self) -> None:
        """Send what is buffered and wait for the sender, at most for what is left of FLYTRAIN_TRACKER_TIMEOUT."""
        self.send_pending_logs()
        if self._sender is not None and not self._sender.wait(self._budget.wait_limit):
            self._budget.spend(self._budget.left)
            raise self._budget.exhausted_error("sends still unconfirmed")
        self._raise_send_error()

    def _send_failed(self, what: str, error: BaseException, seconds: float) -> None:
        """A send failed (in the sender thread or inline): it spends budget; training goes on until it is spent."""
        self._budget.spend(max(seconds, 1e-6))  # a failure always counts, however fast it was
        if self._budget.exhausted:
            self._send_error = self._budget.exhausted_error(f"{what}: {type(error).__name__}: {error}")
        elif not self._warned_failure:
            self._warned_failure = True
            logging.getLogger(type(self).__module__).warning(
                "%s: %s failed (%s: %s); that data is dropped, and the tracker is retried until failing calls have "
                "taken FLYTRAIN_TRACKER_TIMEOUT=%gs in total", self.integration_name, what, type(error).__name__,
                error, self._budget.seconds,
            )

    def _raise_send_error(self) -> None:
        error, self._send_error = self._send_error, None
        if error is not None:
            raise error

    def _add(self, args, state, model, control, values: Mapping[str, Any] | None) -> None:
        if not values or not self._ensure_setup(args, state, model):
            return
        self._buffer.append((state.global_step, dict(values)))
        self._buffered_values += len(values)
        if not self._in_train:
            self.flush()  # evaluate/predict outside training: out at once, and the run is closed again
            self._end(failed=False)
        elif (control.should_save or control.should_training_stop or send_due(self._last_send, self._send_interval)
              or (self.max_buffered_values is not None and self._buffered_values >= self.max_buffered_values)):
            self.send_pending_logs()

    def _end(self, failed: bool) -> None:
        was_open, self._initialized = self._initialized, False
        if was_open:
            self._close(failed)

    # -- events ----------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._in_train = True
        self._ensure_setup(args, state, model)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, model=None, **kwargs):
        self._add(args, state, model, control, logs)

    def on_predict(self, args, state, control, metrics=None, model=None, **kwargs):
        if self.logs_predict_metrics:
            self._add(args, state, model, control, metrics)

    def on_save(self, args, state, control, model=None, checkpoint_folder: str | None = None, **kwargs):
        if not self._initialized or not self._is_open():
            return
        self.send_pending_logs()
        if checkpoint_folder and self._in_train:
            self._log_checkpoint(args, state, checkpoint_folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._in_train = False
        if not self._initialized or not self._is_open():
            self._initialized = False
            return
        self.flush()
        self._finish(args, state, model)
        self._end(failed=False)

    def on_train_error(self, args, state, control, error: BaseException | None = None, **kwargs):
        """Training raised: what was logged before the error still reaches the tracker, then the run ends failed."""
        self._in_train = False
        if not self._initialized or not self._is_open():
            return
        try:
            self.flush()
        finally:
            self._end(failed=True)

    def on_integration_error(self, event: str, error: BaseException) -> None:
        self._in_train = False
        self._buffer, self._buffered_values = [], 0
        self._end(failed=True)


#: metrics the Trainer logs once, at the end of training: trackers put them in the run summary, not in charts
RUN_SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")


def save_model_files(model, folder: str) -> str:
    """Write ``model``'s weights (safetensors) and its dict config (config.json) into ``folder`` for an artifact."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if isinstance(config, Mapping):
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(redact(config), f, indent=2, sort_keys=True, default=str)
    elif config is not None and hasattr(config, "to_dict"):
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(redact(config.to_dict()), f, indent=2, sort_keys=True, default=str)
    return folder
