"""DVCLive: params, metrics against the global step (the x-axis of ``dvc plots``) and model artifacts.

DVCLive's step is set to ``state.global_step`` at every log, so a plot row's ``step`` is the training step, not
the number of log events. A resumed training reopens the same folder with ``resume=True`` after cutting the rows a
previous attempt wrote after the checkpoint, so no step appears twice and none is lost.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
from typing import Any

from ._common import (
    RUN_SUMMARY_KEYS,
    TrackerCallback,
    numeric_items,
    rewrite_logs,
    save_model_files,
    training_params,
)

logger = logging.getLogger(__name__)


def _log_model_from_env() -> bool | str:
    raw = os.environ.get("HF_DVCLIVE_LOG_MODEL", "").strip().lower()
    if raw == "all":
        return "all"
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"environment variable HF_DVCLIVE_LOG_MODEL={raw!r}: expected true, false or all")


def _find_dvc_root(start: str) -> str | None:
    path = os.path.realpath(start)
    while True:
        if os.path.isdir(os.path.join(path, ".dvc")):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _live_class():
    """DVCLive's ``Live``, except that it never runs ``dvc init`` in a Git repository that has no DVC."""
    from dvclive import Live

    class _Live(Live):
        def _init_dvc(self):
            if os.getenv("DVC_ROOT") or _find_dvc_root(os.getcwd()):
                return super()._init_dvc()
            logger.debug("DVCLive: no DVC repository above %s; logging to files only", os.getcwd())
            self._dvc_file = self._init_dvc_file()

        def post_data_to_studio(self):
            # DVCLive gathers the Studio payload (params.yaml parsed with ruamel, every plot file re-read) at each
            # sync even when Studio is not configured and the "data" event is then dropped: ~0.1-0.2 s per burst
            # and at the end, for nothing. Only gather it when it will be sent.
            if "data" in getattr(self, "_studio_events_to_skip", ()):
                return
            super().post_data_to_studio()

    return _Live


def append_plot_rows(live, rows: dict[str, list[tuple[int, Any]]]) -> None:
    """Append a burst's plot rows, one file write per metric, as DVCLive's ``log_metric`` writes them row by row.

    ``Live.log_metric`` opens the metric's file (and creates its folder) once per value: with a burst of 20 log
    events of 4 metrics that was 80 opens and 160 ``mkdir`` calls in the training thread. The rows and the header
    are DVCLive's (tab-separated ``step`` and the metric's last name component; NaN and infinity as text); a
    ``Live`` without DVCLive's metric objects (another version, a user's own class) gets ``log_metric`` per value.
    """
    metrics = getattr(live, "_metrics", None)
    for name, values in rows.items():
        metric = metrics.get(name) if isinstance(metrics, dict) else None
        path = getattr(metric, "output_path", None)
        if path is None:
            for step, value in values:
                live.step = step
                live.log_metric(name, value)
            continue
        existed = os.path.exists(path)
        with open(path, "a", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator=os.linesep)
            if not existed:
                writer.writerow(["step", os.path.basename(metric.name)])
            writer.writerows((step, _plot_value(value)) for step, value in values)


def _plot_value(value: Any) -> Any:
    if not isinstance(value, str) and (math.isnan(value) or math.isinf(value)):
        return str(value)  # as DVCLive writes them
    return value


def truncate_history(live_dir: str, last_step: int) -> None:
    """Drop plot rows logged after ``last_step`` and rebuild metrics.json from what is left."""
    metrics_root = os.path.join(live_dir, "plots", "metrics")
    summary: dict[str, Any] = {}
    for path in sorted(glob.glob(os.path.join(metrics_root, "**", "*.tsv"), recursive=True)):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            fields = reader.fieldnames or []
            rows = [row for row in reader if int(float(row["step"])) <= last_step]
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fields, delimiter="\t", lineterminator=os.linesep)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        if rows:
            name = os.path.relpath(path, metrics_root)[: -len(".tsv")].split(os.sep)
            node = summary
            for part in name[:-1]:
                node = node.setdefault(part, {})
            node[name[-1]] = _number(rows[-1][fields[-1]])
    summary["step"] = last_step
    with open(os.path.join(live_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=4)


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if math.isfinite(value) else text
    return text


class DVCLiveCallback(TrackerCallback):
    """Logs to DVCLive in ``dir`` (default ``<output_dir>/dvclive``), or into a given ``live``.

    ``log_model``: True logs the final model as an artifact, "all" logs ``output_dir`` at every checkpoint (None:
    from ``HF_DVCLIVE_LOG_MODEL``). Artifacts need a DVC repository. ``live_kwargs`` go to ``Live`` (defaults:
    ``save_dvc_exp=False, dvcyaml=None``, so nothing outside ``dir`` is written).

    Log events are written in bursts, once per ``FLYTRAIN_DVCLIVE_SEND_INTERVAL`` seconds (2 s, see
    ``TrackerCallback``), before every checkpoint and at the end; DVCLive's summary (metrics.json, rebuilt from
    every plot file) is refreshed after each burst.
    """

    integration_name = "dvclive"
    required_modules = ("dvclive",)
    pip_extra = "dvclive"

    def __init__(self, live=None, log_model: bool | str | None = None, dir: str | None = None, **live_kwargs) -> None:
        super().__init__()
        if log_model is None:
            log_model = _log_model_from_env()
        if log_model not in (True, False, "all"):
            raise ValueError(f"DVCLiveCallback: log_model must be True, False or 'all', got {log_model!r}")
        self.live = live
        self._owns_live = live is None
        self._log_model = log_model
        self._dir = dir
        self._live_kwargs = live_kwargs
        self._last_step: dict[str, int] = {}
        self._live_dir: str | None = None  # the folder in use, kept after the run ends (run_reference)

    def _open(self, args, state, model) -> None:
        if self.live is None:
            live_dir = self._dir or os.path.join(args.output_dir, "dvclive")
            resume = state.global_step > 0
            if resume and os.path.isdir(live_dir) and not self._continuing:
                truncate_history(live_dir, state.global_step)
            options = {"save_dvc_exp": False, "dvcyaml": None, **self._live_kwargs}
            self.live = _live_class()(dir=live_dir, resume=resume, **options)
            self._owns_live = True
        self._live_dir = os.path.abspath(self.live.dir)
        self._last_step = {}
        if not self._continuing:
            self.live.log_params(training_params(args, model))

    def _send(self, events) -> None:
        rows: dict[str, list[tuple[int, Any]]] = {}
        for step, logs in events:
            numbers, skipped = numeric_items(logs)
            if skipped:
                logger.debug("DVCLive: not logging non-numeric values %s", skipped)
            summary_only = set(rewrite_logs(dict.fromkeys(k for k in numbers if k in RUN_SUMMARY_KEYS)))
            self.live.step = step
            for key, value in rewrite_logs(numbers).items():
                if self._last_step.get(key) == step:
                    continue  # "epoch" comes with every train and eval log of a step
                # the summary now, the plot row with the others of this burst; test metrics (the evaluate stage's,
                # at the last step) belong in the summary, not in a plot
                self.live.log_metric(key, value, plot=False)
                if key not in summary_only and not key.startswith("test/"):
                    rows.setdefault(key, []).append((step, value))
                self._last_step[key] = step
        append_plot_rows(self.live, rows)
        # next_step rebuilds metrics.json from all plot files: once per burst, not once per event
        self.live.next_step()

    def _log_checkpoint(self, args, state, folder: str) -> None:
        if self._log_model == "all":
            self.live.log_artifact(args.output_dir)

    def _finish(self, args, state, model) -> None:
        if self._log_model is True and model is not None:
            name = "best" if args.load_best_model_at_end else "last"
            folder = save_model_files(model, os.path.join(args.output_dir, name))
            self.live.log_artifact(folder, name=name, type="model", copy=True)
        self.live.step = state.global_step

    def _log_facts(self, tags: dict[str, str], params: dict[str, str], step: int) -> None:
        self.live.log_params({**tags, **params})

    def run_reference(self) -> dict[str, Any] | None:
        return {"dir": self._live_dir} if self._live_dir else None

    def continue_from(self, reference: dict[str, Any]) -> bool:
        """An existing DVCLive folder (with its metrics.json), continued with ``resume=True``; not the DVC train
        stage's own output (``stage_output``), which must stay what the train stage wrote."""
        live_dir = reference.get("dir")
        if reference.get("stage_output") or not live_dir or not os.path.isfile(os.path.join(live_dir, "metrics.json")):
            return False
        self._dir = live_dir
        return True

    def _close(self, failed: bool) -> None:
        """End the Live run (its files stay consistent), also when training raised; a given ``live`` is ended at
        train end (as its summary needs) but left to its owner after an error."""
        if self.live is None or (failed and not self._owns_live):
            return
        self.live.end()
        if self._owns_live:
            self.live = None
