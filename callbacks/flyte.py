"""Flyte: keep the newest checkpoint in the task's Flyte checkpoint (a retried attempt resumes from it) and render
the log history as a deck with a table and inline SVG charts (no external scripts: decks are opened offline).

flytekit is imported only when a callback is created or a helper is called, never by ``import callbacks.flyte``.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from trainer_lib import checkpoint as ckpt

from ._common import TrackerCallback, logger

#: log keys that measure time: left out of the charts (they are in the table)
TIMING_SUFFIXES = ("_runtime", "_per_second")
#: keys charted before the eval metrics, when present
TRAIN_CHART_KEYS = ("loss", "learning_rate", "grad_norm")
MAX_TABLE_ROWS = 1000
MAX_CHART_POINTS = 400


# -- the Flyte checkpoint --------------------------------------------------------------------------------------
class NotInFlyteTask(RuntimeError):
    """FlyteCallback was created outside a running Flyte task."""


def current_flyte_checkpoint():
    """The running Flyte task's checkpoint, or None when no task is running in this process."""
    from flytekit.core.context_manager import FlyteContextManager

    state = FlyteContextManager.current_context().execution_state
    # Outside a task flytekit still hands out a default context, but it has no mode and no checkpoint; every way of
    # running a task (pyflyte run, pyflyte-execute, an elastic worker) gives the task's context a checkpoint.
    if state is None or state.mode is None or state.user_space_params is None:
        return None
    try:
        return state.user_space_params.checkpoint
    except NotImplementedError:
        return None


def _link_tree(source: str, target: str) -> None:
    """Mirror ``source`` into ``target`` with hard links (copies where linking is refused)."""
    os.makedirs(target)
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(src):
            _link_tree(src, dst)
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def save_to_flyte(folder: str, checkpoint) -> None:
    """Upload checkpoint ``folder`` as ``<flyte checkpoint>/checkpoint-<step>/``, then remove older ones there.

    A new folder never overwrites the previous one, so an upload cut short leaves the previous checkpoint intact
    (restore validates each folder's manifest and takes the newest complete one).
    """
    name = os.path.basename(os.path.normpath(folder))
    with tempfile.TemporaryDirectory(prefix="flytrain-sync-") as stage:
        _link_tree(folder, os.path.join(stage, name))
        checkpoint.save(stage)
    _remove_older(checkpoint, keep=name)


def _remove_older(checkpoint, keep: str) -> None:
    destination = getattr(checkpoint, "_checkpoint_dest", None)  # SyncCheckpoint's upload location
    if not destination:
        return
    from flytekit.core.context_manager import FlyteContextManager

    try:
        fs = FlyteContextManager.current_context().file_access.get_filesystem_for_path(str(destination))
        for entry in fs.ls(str(destination), detail=False):
            name = os.path.basename(str(entry).rstrip("/"))
            if ckpt.checkpoint_step(name) is not None and name != keep:
                fs.rm(entry, recursive=True)
    except Exception as error:  # only costs storage: the newest checkpoint is already uploaded
        logger.warning("Flyte: could not remove older checkpoints from %s: %s", destination, error)


def restore_from_flyte(checkpoint, local_dir: str) -> str | None:
    """Download the previous attempt's Flyte checkpoint into ``local_dir``; the newest complete checkpoint in it."""
    if checkpoint is None or not checkpoint.prev_exists():
        return None
    from flytekit.exceptions.user import FlyteDataNotFoundException

    os.makedirs(local_dir, exist_ok=True)
    try:
        restored = checkpoint.restore(local_dir)
    except FlyteDataNotFoundException:  # the previous attempt stopped before its first checkpoint
        return None
    if restored is None:
        return None
    restored = str(restored)
    if ckpt.checkpoint_step(restored) is None and os.path.isfile(os.path.join(restored, ckpt.MANIFEST)):
        return restored  # a checkpoint folder saved flat (checkpoint.save(folder) by other code)
    return ckpt.latest_valid_checkpoint(restored)


# -- the Log History deck ----------------------------------------------------------------------------------------
def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _columns(history: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {"step": None, "epoch": None}
    for entry in history:
        seen.update(dict.fromkeys(entry))
    return [c for c in seen if any(c in e for e in history)]


def log_history_table(history: Sequence[Mapping[str, Any]], max_rows: int = MAX_TABLE_ROWS) -> str:
    """The log history as an HTML table; beyond ``max_rows`` only the first and last rows are kept."""
    columns = _columns(history)
    rows = list(history)
    skipped = 0
    if len(rows) > max_rows:
        skipped = len(rows) - max_rows
        rows = rows[: max_rows // 2] + [None] + rows[-(max_rows - max_rows // 2) :]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for entry in rows:
        if entry is None:
            body.append(f'<tr><td colspan="{len(columns)}">… {skipped} rows left out …</td></tr>')
            continue
        cells = "".join(f"<td>{html.escape(_format(entry[c])) if c in entry else ''}</td>" for c in columns)
        body.append(f"<tr>{cells}</tr>")
    return (
        '<table class="flytrain-log-history" border="1" style="border-collapse:collapse;font-size:12px">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _thin(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    stride = (len(points) - 1) / (limit - 1)
    return [points[round(i * stride)] for i in range(limit)]


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if low == high:
        pad = abs(low) * 0.05 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def svg_line_chart(name: str, points: Sequence[tuple[float, float]], width: int = 460, height: int = 220) -> str:
    """A self-contained SVG line chart of ``(step, value)`` points; non-finite values are left out."""
    data = [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    data = _thin(sorted(data), MAX_CHART_POINTS)
    label = html.escape(name)
    left, right, top, bottom = 62, 12, 24, 30
    svg = [
        f'<svg class="flytrain-chart" data-metric="{label}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{label} against step">',
        f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" font-family="sans-serif">{label}</text>',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="none" stroke="#999"/>',
    ]
    if not data:
        svg.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" font-size="12">no data</text>')
        return "".join(svg) + "</svg>"
    x_low, x_high = _span([x for x, _ in data])
    y_low, y_high = _span([y for _, y in data])

    def sx(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom)

    tick = 'font-size="10" font-family="sans-serif" fill="#444"'
    for y in (y_low, (y_low + y_high) / 2, y_high):
        svg.append(f'<text x="{left - 4}" y="{sy(y) + 3:.1f}" text-anchor="end" {tick}>{y:.4g}</text>')
        svg.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
    steps = [x for x, _ in data]
    for x in sorted({min(steps), max(steps)}):
        svg.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle" {tick}>{x:g}</text>')
    svg.append(f'<text x="{width - right}" y="{height - 4}" text-anchor="end" {tick}>step</text>')
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in data)
    svg.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{path}"/>')
    if len(data) <= 60:
        svg.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="#1f77b4"/>' for x, y in data)
    return "".join(svg) + "</svg>"


def chart_series(history: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``key -> [(step, value)]`` for the training loss, learning rate, grad norm and every eval metric."""
    eval_keys = sorted(
        {k for e in history for k in e if k.startswith("eval_") and not k.endswith(TIMING_SUFFIXES)}
    )
    series: dict[str, list[tuple[float, float]]] = {}
    for key in [*TRAIN_CHART_KEYS, *eval_keys]:
        points = [
            (e["step"], e[key])
            for e in history
            if key in e and "step" in e and isinstance(e[key], (int, float)) and not isinstance(e[key], bool)
        ]
        if points:
            series[key] = points
    return series


def log_history_html(history: Sequence[Mapping[str, Any]]) -> str:
    """The deck body: one chart per series, then the table."""
    charts = "".join(svg_line_chart(key, points) for key, points in chart_series(history).items())
    return (
        f'<h3>Training curves</h3><div style="display:flex;flex-wrap:wrap;gap:8px">{charts}</div>'
        f"<h3>Log history ({len(history)} entries)</h3>{log_history_table(history)}"
    )


# -- the callback ----------------------------------------------------------------------------------------------
class FlyteCallback(TrackerCallback):
    """Syncs each new checkpoint to the Flyte checkpoint and adds a "Log History" deck when training ends.

    Create it inside a running Flyte task (``report_to=["flyte"]`` in a task's training arguments); give the task
    ``enable_deck=True`` to see the deck.
    """

    integration_name = "flyte"
    required_modules = ("flytekit",)
    pip_extra = "flyte"

    def __init__(self, save_log_history: bool = True, sync_checkpoints: bool = True) -> None:
        super().__init__()
        self.checkpoint = current_flyte_checkpoint()
        if self.checkpoint is None:
            raise NotInFlyteTask(
                "FlyteCallback needs a running Flyte task (a @task function executed by pyflyte run, "
                "pyflyte-execute or a cluster): no Flyte task context with a checkpoint was found. "
                "Remove 'flyte' from report_to when training outside Flyte."
            )
        self.save_log_history = save_log_history
        self.sync_checkpoints = sync_checkpoints
        self._synced: str | None = None

    def setup(self, args, state, model, **kwargs) -> None:
        """Nothing to open: the checkpoint handle comes from the task context."""

    def on_save(self, args, state, control, **kwargs):
        if not self.sync_checkpoints or not self._ensure_setup(args, state, kwargs.get("model")):
            return
        folders = ckpt.list_checkpoints(args.output_dir)
        if not folders or folders[-1] == self._synced:
            return
        save_to_flyte(folders[-1], self.checkpoint)
        self._synced = folders[-1]

    def on_train_end(self, args, state, control, **kwargs):
        if not self.save_log_history or not self._ensure_setup(args, state, kwargs.get("model")):
            return
        from flytekit import Deck

        Deck("Log History", log_history_html(state.log_history))
