"""What the DVC train stage adds to a training: DVCLive logs in the folder that dvc.yaml declares.

The folder is a declared output of the stage whatever ``training.report_to`` says, so ``dvc exp show``,
``dvc metrics diff`` and ``dvc plots show`` always find it and no revision lacks it (an output that exists only for
some configs makes DVC report errors for the others, and a clone of such a revision reruns the stage). Timing
values (``*_runtime``, ``*_per_second``) stay out of it, so a forced ``dvc repro`` of the same run writes the same
bytes and leaves ``dvc.lock`` unchanged.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from callbacks.dvclive import DVCLiveCallback

from .config import ConfigError, PipelineConfig

TIMING_SUFFIXES = ("_runtime", "_per_second")


class StageLiveCallback(DVCLiveCallback):
    """DVCLiveCallback without the timing values (they differ from run to run; the log history keeps them)."""

    def _send(self, events) -> None:
        super()._send(
            [(step, {k: v for k, v in logs.items() if not k.endswith(TIMING_SUFFIXES)}) for step, logs in events]
        )

    def _log_facts(self, tags, params, step) -> None:
        """Nothing: the facts (times, host) differ between identical runs; they are in the model's
        provenance.json."""

    def run_reference(self):
        """Marked as the stage's output: the evaluate stage does not write into it (a changed train output would
        make DVC retrain); its test metrics are metrics/metrics.json."""
        reference = super().run_reference()
        return {**reference, "stage_output": True} if reference else None


def dvclive_setup(config: PipelineConfig, live_dir: str) -> tuple[list[Any], dict[str, Any]]:
    """The callbacks and TrainingArguments overrides that log the stage's DVCLive output into ``live_dir``."""
    if importlib.util.find_spec("dvclive") is None:
        raise ConfigError(f"the DVC train stage logs to {live_dir} with DVCLive: pip install 'flytrain[dvc]'")
    names = [n for n in config.training.report_to if n not in ("dvclive", "none")]
    return [StageLiveCallback(dir=live_dir)], {"report_to": names}
