"""TensorBoard: scalars and texts through ``torch.utils.tensorboard``; a resumed run continues the same event dir."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from trainer_lib.state import ExportableState

from ._common import TrackerCallback, redact, rewrite_logs

logger = logging.getLogger(__name__)


def _model_config_json(model) -> str | None:
    config = getattr(model, "config", None)
    if isinstance(config, Mapping):
        return json.dumps(redact(config), indent=2, sort_keys=True, default=str)
    if config is not None and hasattr(config, "to_dict"):
        return json.dumps(redact(config.to_dict()), indent=2, sort_keys=True, default=str)
    return None


def _inside(path: str, *folders: str) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(f)]) == os.path.realpath(f) for f in folders if f)


def write_scalars(writer, scalars: list[tuple[str, float]], step: int) -> None:
    """A log event's scalars as one TensorBoard event (one ``Summary`` holding every value, as TensorFlow's merged
    summaries are) when ``writer`` is torch's SummaryWriter; ``add_scalar`` per value otherwise (tensorboardX, a
    user's writer). The values are those ``add_scalar`` writes (``simple_value``), a fourth of the events and no
    per-value tensor conversion."""
    if not scalars:
        return
    file_writer = getattr(writer, "_get_file_writer", None)
    if file_writer is None or type(writer).__module__ != "torch.utils.tensorboard.writer":
        for key, value in scalars:
            writer.add_scalar(key, value, step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=key, simple_value=float(value)) for key, value in scalars])
    file_writer().add_summary(summary, step)  # _get_file_writer: also hides a resumed run's later steps (purge)


class TensorBoardCallback(TrackerCallback, ExportableState):
    """Writes the logs to TensorBoard event files in ``args.logging_dir`` (or into a given ``tb_writer``).

    The event directory is saved in checkpoints: a resumed run writes into the same directory, and opens its writer
    with ``purge_step`` so the steps a previous attempt logged after the checkpoint are hidden, not doubled.
    Log events are written and flushed together once per ``FLYTRAIN_TENSORBOARD_SEND_INTERVAL`` seconds (2 s;
    see ``TrackerCallback``), before every checkpoint and at the end.
    """

    integration_name = "tensorboard"
    required_modules = ("tensorboard",)
    pip_extra = "tensorboard"

    def __init__(self, tb_writer=None) -> None:
        super().__init__()
        self.tb_writer = tb_writer
        self._owns_writer = tb_writer is None
        #: event directory of this run; restored from the checkpoint on resume
        self.log_dir: str | None = None
        self._last_step: dict[str, int] = {}

    def state(self) -> dict:
        return {"args": {}, "attributes": {"log_dir": self.log_dir}}

    def _open(self, args, state, model) -> None:
        if self.tb_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # The checkpoint's log dir, when it exists here (a retry on another machine starts a new one) and lies
            # in this run's folders: a checkpoint is data from elsewhere and must not choose where we write.
            log_dir = self.log_dir if self.log_dir and os.path.isdir(self.log_dir) else args.logging_dir
            if self._continuing:
                log_dir = self.log_dir  # continue_from checked it: an existing TensorBoard log dir
            elif log_dir != args.logging_dir and not _inside(log_dir, args.output_dir, os.path.dirname(args.logging_dir)):
                logger.warning("TensorBoard: not continuing in %s from the checkpoint: it is outside output_dir and "
                               "logging_dir; writing to %s", log_dir, args.logging_dir)
                log_dir = args.logging_dir
            if state.is_hyper_param_search and state.trial_name and not self.log_dir:
                log_dir = os.path.join(log_dir, state.trial_name)
            # Hide whatever an earlier attempt logged after the step this run continues from.
            purge_step = state.global_step + 1 if state.global_step > 0 and not self._continuing else None
            self.tb_writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)
            self._owns_writer = True
        self.log_dir = self.tb_writer.log_dir if hasattr(self.tb_writer, "log_dir") else self.log_dir
        self._last_step = {}
        if self._continuing:
            return
        self.tb_writer.add_text("args", json.dumps(redact(args.to_dict()), indent=2, sort_keys=True, default=str))
        config = _model_config_json(model)
        if config is not None:
            self.tb_writer.add_text("model_config", config)

    def _send(self, events) -> None:
        for step, logs in events:
            self._write(step, logs)
        self.tb_writer.flush()

    def _write(self, step: int, logs: dict[str, Any]) -> None:
        scalars: list[tuple[str, float]] = []
        for key, value in rewrite_logs(logs).items():
            # "epoch" comes with every train and eval log of a step: write each tag once per step.
            if self._last_step.get(key) == step:
                continue
            if isinstance(value, bool):
                value = int(value)
            if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
                value = value.item()
            if isinstance(value, (int, float)):
                scalars.append((key, value))
            elif isinstance(value, str):
                self.tb_writer.add_text(key, value, step)
            else:
                logger.warning(
                    "TensorBoard: not logging %r=%r of type %s: only numbers and strings are supported",
                    key, value, type(value).__name__,
                )
                continue
            self._last_step[key] = step
        write_scalars(self.tb_writer, scalars, step)


    def _log_facts(self, tags: dict[str, str], params: dict[str, str], step: int) -> None:
        self.tb_writer.add_text("provenance", json.dumps({**tags, **params}, indent=2, sort_keys=True), step)
        self.tb_writer.flush()

    def run_reference(self) -> dict[str, Any] | None:
        return {"log_dir": os.path.abspath(self.log_dir)} if self.log_dir else None

    def continue_from(self, reference: dict[str, Any]) -> bool:
        """Only an existing log dir that holds TensorBoard event files (the reference is data read from a file;
        it must not choose where a new folder is written)."""
        log_dir = reference.get("log_dir")
        if not log_dir or not glob.glob(os.path.join(glob.escape(log_dir), "events.out.tfevents.*")):
            return False
        self.log_dir = log_dir
        return True

    def _close(self, failed: bool) -> None:
        if self.tb_writer is not None:
            if self._owns_writer:
                self.tb_writer.close()
                self.tb_writer = None
            else:
                self.tb_writer.flush()
