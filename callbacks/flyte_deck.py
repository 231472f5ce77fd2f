"""HTML for Flyte decks, self-contained (no scripts, no external files: decks are opened offline): line charts as
inline SVG that follow the page's width, the log-history table, a confusion-matrix heatmap and small tables.

Pure functions over plain data: no flytekit import, so they are tested and reused without a task.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from trainer_lib.redaction import redact

#: log keys that measure time (or cost): collapsed under <details> in the table and never charted
TIMING_SUFFIXES = ("_runtime", "_per_second")
TIMING_KEYS = ("total_flos",)
#: keys charted before the eval metrics, when present
TRAIN_CHART_KEYS = ("loss", "learning_rate", "grad_norm")
#: series whose values are never negative (eval_* metrics are checked on their data)
MAX_TABLE_ROWS = 1000
MAX_CHART_POINTS = 400
MIN_TICKS = 4
#: a loss spanning more than this many decades is charted on a log scale
LOG_SCALE_DECADES = 2.0
STYLE = (
    "<style>.flytrain-charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:10px}"
    ".flytrain-chart{width:100%;height:auto;display:block}"
    ".flytrain-table{border-collapse:collapse;font:12px sans-serif}"
    ".flytrain-table td,.flytrain-table th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    ".flytrain-heatmap td{min-width:34px;text-align:center}</style>"
)


def is_timing(key: str) -> bool:
    return key.endswith(TIMING_SUFFIXES) or key in TIMING_KEYS


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# -- axes --------------------------------------------------------------------------------------------------------
def linear_ticks(low: float, high: float, minimum: int = MIN_TICKS) -> list[float]:
    """Round tick values inside [low, high]: the widest step of 1, 2 or 5 × 10^k that still gives ``minimum``."""
    if not high > low:
        return [low]
    exponent = math.floor(math.log10(high - low))
    for power in range(exponent + 1, exponent - 4, -1):
        for multiple in (5, 2, 1):
            step = multiple * 10.0**power
            first = math.ceil(low / step - 1e-9)
            ticks = [(first + i) * step for i in range(int((high - low) / step) + 2)]
            ticks = [round(t, 12) for t in ticks if low - 1e-9 * step <= t <= high + 1e-9 * step]
            if len(ticks) >= minimum:
                return ticks
    return [low + (high - low) * i / (minimum - 1) for i in range(minimum)]


def log_ticks(low: float, high: float, minimum: int = MIN_TICKS) -> list[float]:
    """Ticks at 1, 2, 5 (or every digit) × 10^k inside [low, high] (both > 0), at least ``minimum`` of them."""
    for multiples in ((1,), (1, 3), (1, 2, 5), tuple(range(1, 10))):
        ticks = [
            m * 10.0**k
            for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for m in multiples
            if low <= m * 10.0**k <= high
        ]
        if len(ticks) >= minimum:
            return ticks
    return [low * (high / low) ** (i / (minimum - 1)) for i in range(minimum)]


def value_range(values: Sequence[float], log: bool = False) -> tuple[float, float]:
    """The plotted range: the data padded by 5 %, never below 0 for data that is never negative."""
    low, high = min(values), max(values)
    if log:
        return low / 10 ** (0.05 * math.log10(high / low)), high * 10 ** (0.05 * math.log10(high / low))
    pad = (high - low) * 0.05 if high > low else abs(low) * 0.05 or 1.0
    bottom = low - pad
    if low >= 0 > bottom:
        bottom = 0.0
    return bottom, high + pad


def use_log_scale(name: str, values: Sequence[float]) -> bool:
    """Loss series spanning more than LOG_SCALE_DECADES decades (all positive) are easier to read on a log axis."""
    if "loss" not in name or not values or min(values) <= 0:
        return False
    return math.log10(max(values) / min(values)) > LOG_SCALE_DECADES


def _thin(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    stride = (len(points) - 1) / (limit - 1)
    return [points[round(i * stride)] for i in range(limit)]


def svg_line_chart(name: str, points: Sequence[tuple[float, float]], width: int = 480, height: int = 240) -> str:
    """A self-contained SVG line chart of ``(step, value)`` points (non-finite values left out). ``width`` and
    ``height`` only set the aspect ratio: the chart is as wide as its container."""
    data = [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    data = _thin(sorted(data), MAX_CHART_POINTS)
    label = html.escape(name)
    log = use_log_scale(name, [y for _, y in data])
    left, right, top, bottom = 64, 14, 24, 34
    svg = [
        f'<svg class="flytrain-chart" data-metric="{label}" data-scale="{"log" if log else "linear"}" '
        f'xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" aria-label="{label} against step">',
        f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" font-family="sans-serif">'
        f'{label}{" (log scale)" if log else ""}</text>',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="none" stroke="#999"/>',
    ]
    if not data:
        svg.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" font-size="12">no data</text>')
        return "".join(svg) + "</svg>"
    x_low, x_high = value_range([x for x, _ in data])
    y_low, y_high = value_range([y for _, y in data], log)
    scale = math.log10 if log else (lambda v: v)

    def sx(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (scale(y) - scale(y_low)) / (scale(y_high) - scale(y_low)) * (height - top - bottom)

    tick = 'font-size="10" font-family="sans-serif" fill="#444"'
    for y in (log_ticks if log else linear_ticks)(y_low, y_high):
        svg.append(f'<text class="y-tick" x="{left - 4}" y="{sy(y) + 3:.1f}" text-anchor="end" {tick}>{y:.3g}</text>')
        svg.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
    for x in linear_ticks(x_low, x_high):
        svg.append(f'<text class="x-tick" x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle" {tick}>'
                   f"{x:g}</text>")
    svg.append(f'<text x="{width - right}" y="{height - 4}" text-anchor="end" {tick}>step</text>')
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in data)
    svg.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{path}"/>')
    if len(data) <= 60:
        svg.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="#1f77b4"/>' for x, y in data)
    return "".join(svg) + "</svg>"


# -- the log history -----------------------------------------------------------------------------------------------
def chart_series(history: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``key -> [(step, value)]`` for the training loss, learning rate, grad norm and every eval metric."""
    eval_keys = sorted({k for e in history for k in e if k.startswith("eval_") and not is_timing(k)})
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


def _columns(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """step, epoch, the training keys, eval metrics, then the rest in first-seen order."""
    seen: dict[str, None] = {}
    for entry in history:
        seen.update(dict.fromkeys(entry))
    order = ["step", "epoch", *TRAIN_CHART_KEYS]
    evals = sorted(k for k in seen if k.startswith("eval_"))
    first = [k for k in order if k in seen] + evals
    return first + [k for k in seen if k not in first]


def _table(history: Sequence[Mapping[str, Any]], columns: list[str], css_class: str, max_rows: int) -> str:
    rows: list[Mapping[str, Any] | None] = [e for e in history if any(c in e for c in columns if c != "step")]
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
        cells = "".join(f"<td>{html.escape(format_value(entry[c])) if c in entry else ''}</td>" for c in columns)
        body.append(f"<tr>{cells}</tr>")
    return (f'<table class="{css_class} flytrain-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def log_history_table(history: Sequence[Mapping[str, Any]], max_rows: int = MAX_TABLE_ROWS) -> str:
    """The training and eval metrics as a table; timing columns (runtimes, throughput, FLOs) in a second table
    collapsed under <details>. Beyond ``max_rows`` rows only the first and last are kept."""
    columns = _columns(history)
    metrics = [c for c in columns if not is_timing(c)]
    timing = [c for c in columns if is_timing(c)]
    parts = [_table(history, metrics, "flytrain-log-history", max_rows)]
    if timing:
        parts.append(f"<details><summary>Timing columns ({', '.join(map(html.escape, timing))})</summary>"
                     f"{_table(history, ['step', *timing], 'flytrain-timing', max_rows)}</details>")
    return "".join(parts)


def log_history_html(history: Sequence[Mapping[str, Any]]) -> str:
    """The training deck's body: one chart per series (a grid as wide as the page), then the table (redacted like
    every file flytrain writes)."""
    history = [redact(entry) for entry in history]
    charts = "".join(svg_line_chart(key, points) for key, points in chart_series(history).items())
    return (
        f'{STYLE}<h3>Training curves</h3><div class="flytrain-charts">{charts}</div>'
        f"<h3>Log history ({len(history)} entries)</h3>{log_history_table(history)}"
    )


# -- the evaluation ------------------------------------------------------------------------------------------------
def key_value_table(values: Mapping[str, Any], css_class: str = "flytrain-metrics") -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(format_value(v))}</td></tr>"
                   for k, v in values.items())
    return f'<table class="{css_class} flytrain-table"><tbody>{rows}</tbody></table>'


def per_class_scores(matrix: Sequence[Sequence[int]]) -> list[tuple[float, float, int]]:
    """``(precision, recall, support)`` per class of a confusion matrix (rows: actual, columns: predicted)."""
    scores = []
    for i, row in enumerate(matrix):
        predicted = sum(r[i] for r in matrix)
        support = sum(row)
        scores.append((row[i] / predicted if predicted else 0.0, row[i] / support if support else 0.0, support))
    return scores


def _cell_style(fraction: float) -> str:
    # white -> #1f4e99 with the share of the row; white text on the dark half
    r, g, b = (round(255 + (c - 255) * fraction) for c in (31, 78, 153))
    return f"background:rgb({r},{g},{b});color:{'#fff' if fraction > 0.5 else '#000'}"


def confusion_heatmap(classes: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """The confusion matrix as a coloured table (each cell shaded by its share of the actual class), with each
    class's precision, recall and support."""
    names = [html.escape(str(c)) for c in classes]
    head = "".join(f"<th>{n}</th>" for n in names)
    body = []
    for name, row, (precision, recall, support) in zip(names, matrix, per_class_scores(matrix)):
        total = sum(row) or 1
        cells = "".join(f'<td style="{_cell_style(v / total)}">{v}</td>' for v in row)
        body.append(f"<tr><th>{name}</th>{cells}<td>{precision:.3f}</td><td>{recall:.3f}</td><td>{support}</td></tr>")
    return (
        '<table class="flytrain-heatmap flytrain-table"><thead>'
        f'<tr><th>actual \\ predicted</th>{head}<th>precision</th><th>recall</th><th>support</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def tracker_links(trackers: Mapping[str, Mapping[str, Any]]) -> str:
    """Links to (or ids of) the tracker runs of the training; offline runs and file stores show their ids."""
    if not trackers:
        return "<p>No tracker runs were recorded for this training (report_to names none with a run id).</p>"
    items = []
    for name, run in sorted(trackers.items()):
        url = _tracker_url(name, run)
        ids = ", ".join(f"{html.escape(str(k))}={html.escape(str(v))}" for k, v in sorted(run.items()) if v)
        link = f' — <a href="{html.escape(url)}">{html.escape(url)}</a>' if url else ""
        items.append(f"<li><b>{html.escape(name)}</b>: {ids}{link}</li>")
    return f'<ul class="flytrain-trackers">{"".join(items)}</ul>'


def _tracker_url(name: str, run: Mapping[str, Any]) -> str | None:
    uri = str(run.get("tracking_uri") or "")
    if name in ("mlflow", "dagshub") and uri.startswith(("http://", "https://")) and run.get("run_id"):
        return f"{uri.rstrip('/')}/#/experiments/{run.get('experiment_id') or 0}/runs/{run['run_id']}"
    path = str(run.get("run_path") or "")
    if name == "wandb" and path.count("/") == 2:
        entity, project, run_id = path.split("/")
        return f"https://wandb.ai/{entity}/{project}/runs/{run_id}"
    return None


def evaluation_html(
    metrics: Mapping[str, Any],
    classes: Sequence[str],
    matrix: Sequence[Sequence[int]],
    trackers: Mapping[str, Mapping[str, Any]],
) -> str:
    """The evaluation deck's body: test metrics, the confusion heatmap with per-class scores, the tracker runs
    (redacted: a tracking URI may carry a password)."""
    trackers = redact(trackers)
    return (
        f"{STYLE}<h3>Test metrics</h3>{key_value_table(metrics)}"
        f"<h3>Confusion matrix (test set)</h3>{confusion_heatmap(classes, matrix)}"
        f"<h3>Tracker runs</h3>{tracker_links(trackers)}"
    )
