"""Static charts of a run (SVG): training and validation curves and the test confusion matrix.

They open anywhere with no network (``dvc plots show`` embeds them as images; the Vega plots need a CDN) and are
byte-identical for identical runs (no dates, no random ids), so a forced ``dvc repro`` leaves ``dvc.lock`` as it was.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

#: one colour per series (colour-blind safe: Okabe-Ito)
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")
FONT = 'font-family="DejaVu Sans, Arial, sans-serif"'
#: the files write_plots writes into its folder
PLOT_FILES = ("loss.svg", "accuracy.svg", "learning_rate.svg", "confusion.svg")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _number(value: float) -> str:
    return f"{value:.4g}"


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if low == high:
        pad = abs(low) * 0.05 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def line_chart(title: str, series: Mapping[str, Sequence[tuple[float, float]]], y_label: str,
               width: int = 560, height: int = 320) -> str:
    """An SVG line chart of named ``(step, value)`` series sharing one y axis; non-finite points are left out."""
    data = {name: [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
            for name, points in series.items()}
    data = {name: sorted(points) for name, points in data.items() if points}
    left, right, top, bottom = 70, 16, 40, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-size="15" {FONT}>{html.escape(title)}</text>',
    ]
    if not data:
        out.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" font-size="13" {FONT}>'
                   "no data</text></svg>")
        return "".join(out) + "\n"
    x_low, x_high = _span([x for points in data.values() for x, _ in points])
    y_low, y_high = _span([y for points in data.values() for _, y in points])
    x_low = max(x_low, 0.0) if min(x for p in data.values() for x, _ in p) >= 0 else x_low

    def sx(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y_low) / (y_high - y_low) * plot_h

    tick = f'font-size="11" fill="#333" {FONT}'
    for y in nice_ticks(y_low, y_high):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" {tick}>{_number(y)}</text>')
    for x in nice_ticks(x_low, x_high, 6):
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
                   'stroke="#666"/>')
        out.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 17}" text-anchor="middle" {tick}>{_number(x)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#666"/>')
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle" font-size="12" {FONT}>'
               "step</text>")
    out.append(f'<text x="14" y="{top + plot_h / 2:.0f}" text-anchor="middle" font-size="12" {FONT} '
               f'transform="rotate(-90 14 {top + plot_h / 2:.0f})">{html.escape(y_label)}</text>')
    for i, (name, points) in enumerate(data.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        if len(points) <= 60:
            out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in points)
        legend_x = left + 10 + i * 150
        out.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="30" y2="30" stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text x="{legend_x + 24}" y="34" font-size="12" {FONT}>{html.escape(name)}</text>')
    return "".join(out) + "</svg>\n"


def confusion_chart(actual: Sequence[int], predicted: Sequence[int], classes: Sequence[Any],
                    title: str = "Test confusion matrix") -> str:
    """An SVG heat map of counts: rows are the actual classes, columns the predicted ones."""
    n = len(classes)
    counts = [[0] * n for _ in range(n)]
    for a, p in zip(actual, predicted):
        counts[a][p] += 1
    peak = max((max(row) for row in counts), default=0) or 1
    cell = max(18, min(44, 440 // max(n, 1)))
    left, top = 90, 56
    width, height = left + n * cell + 20, top + n * cell + 50
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-size="15" {FONT}>{html.escape(title)}</text>',
        f'<text x="{left + n * cell / 2:.0f}" y="{top - 22}" text-anchor="middle" font-size="12" {FONT}>'
        "predicted</text>",
        f'<text x="16" y="{top + n * cell / 2:.0f}" text-anchor="middle" font-size="12" {FONT} '
        f'transform="rotate(-90 16 {top + n * cell / 2:.0f})">actual</text>',
    ]
    size = max(9, min(12, cell // 3))
    for i, name in enumerate(classes):
        label = html.escape(str(name))
        out.append(f'<text x="{left + i * cell + cell / 2:.1f}" y="{top - 6}" text-anchor="middle" '
                   f'font-size="{size}" {FONT}>{label}</text>')
        out.append(f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4:.1f}" text-anchor="end" '
                   f'font-size="{size}" {FONT}>{label}</text>')
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            shade = count / peak
            # white to blue; the diagonal (right answers) and the mistakes share one scale
            r, g, b = (round(255 - shade * (255 - c)) for c in (8, 81, 156))
            x, y = left + j * cell, top + i * cell
            out.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="#{r:02x}{g:02x}{b:02x}" '
                       'stroke="#ddd"/>')
            if count:
                colour = "white" if shade > 0.5 else "#222"
                out.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" text-anchor="middle" '
                           f'font-size="{size}" fill="{colour}" {FONT}>{count}</text>')
    total = sum(sum(row) for row in counts)
    right = sum(counts[i][i] for i in range(n))
    out.append(f'<text x="{left}" y="{height - 16}" font-size="12" {FONT}>{right} of {total} right'
               f'{f" ({right / total:.1%})" if total else ""}</text>')
    return "".join(out) + "</svg>\n"


def _points(history: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(e["step"], e[key]) for e in history
            if key in e and "step" in e and isinstance(e[key], (int, float)) and not isinstance(e[key], bool)]


def write_plots(history: Sequence[Mapping[str, Any]], actual: Sequence[int], predicted: Sequence[int],
                classes: Sequence[Any], out_dir: str) -> list[str]:
    """Write PLOT_FILES into ``out_dir`` from a log history and the test predictions; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    accuracy_keys = sorted(k for e in history for k in e if k.startswith("eval_") and k != "eval_loss"
                           and not k.endswith(("_runtime", "_per_second")))
    charts = {
        "loss.svg": line_chart("Loss", {"training": _points(history, "loss"),
                                        "validation": _points(history, "eval_loss")}, "loss"),
        "accuracy.svg": line_chart("Validation metrics",
                                   {k[len("eval_"):]: _points(history, k) for k in dict.fromkeys(accuracy_keys)},
                                   "value"),
        "learning_rate.svg": line_chart("Learning rate", {"learning rate": _points(history, "learning_rate")},
                                        "learning rate"),
        "confusion.svg": confusion_chart(actual, predicted, classes),
    }
    paths = []
    for name, svg in charts.items():
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(svg)
        paths.append(path)
    return paths
