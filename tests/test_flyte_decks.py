"""The decks' HTML: charts whose axes respect the data, tables with metrics first, the confusion heatmap with
per-class scores, tracker links; and both decks rendered by headless Chromium to a PNG that is not blank."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET

import pytest

from tests.browser import inked, pixels_near, requires_chromium, screenshot_html

SVG = "{http://www.w3.org/2000/svg}"


def history(steps: int = 300) -> list[dict]:
    """A run's log history: loss falling over 4 decades, a linear learning rate to 0, evals, a final summary."""
    entries = [{"loss": 2.3 * 0.96**s + 1e-4, "learning_rate": 1e-3 * (1 - s / steps), "grad_norm": 1 + (s % 7) / 10,
                "epoch": s / 40, "step": s} for s in range(1, steps + 1, 10)]
    entries += [{"eval_loss": 0.5 / s, "eval_accuracy": min(1.0, 0.5 + s / 400), "eval_runtime": 0.1,
                 "eval_samples_per_second": 2000.0, "epoch": s / 40, "step": s} for s in range(40, steps + 1, 40)]
    entries.append({"train_runtime": 3.0, "train_samples_per_second": 100.0, "total_flos": 0.0, "train_loss": 0.5,
                    "epoch": steps / 40, "step": steps})
    return entries


def chart(html: str, name: str) -> ET.Element:
    match = re.search(rf'<svg class="flytrain-chart" data-metric="{name}".*?</svg>', html, re.S)
    assert match, f"no {name} chart"
    return ET.fromstring(match.group(0))


def tick_values(svg: ET.Element, axis: str) -> list[float]:
    return [float(t.text) for t in svg.iter(f"{SVG}text") if t.get("class") == f"{axis}-tick"]


# -- charts ----------------------------------------------------------------------------------------------------------
def test_charts_have_four_ticks_per_axis_and_never_dip_below_zero_for_non_negative_data():
    from callbacks.flyte_deck import log_history_html

    html = log_history_html(history())
    for name in ("loss", "learning_rate", "grad_norm", "eval_loss", "eval_accuracy"):
        svg = chart(html, name)
        assert len(tick_values(svg, "x")) >= 4 and len(tick_values(svg, "y")) >= 4, name
        assert min(tick_values(svg, "y")) >= 0, f"{name}: a tick below 0 for data that is never negative"
        assert svg.get("width") is None and svg.get("viewBox")  # as wide as the page (CSS), not a fixed size
    assert chart(html, "learning_rate").get("data-scale") == "linear"
    from callbacks.flyte_deck import svg_line_chart

    lr = ET.fromstring(svg_line_chart("learning_rate", [(s, 1e-3 * (1 - s / 100)) for s in range(0, 101, 10)]))
    assert 0.0 in tick_values(lr, "y")  # the schedule ends at 0: the axis shows it ...
    frame = lr.find(f"{SVG}rect")
    lowest = max(float(p.split(",")[1]) for p in lr.find(f"{SVG}polyline").get("points").split())
    assert lowest == pytest.approx(float(frame.get("y")) + float(frame.get("height")), abs=0.1)  # ... at the bottom


def test_value_range_pads_the_data_but_not_below_zero():
    from callbacks.flyte_deck import value_range

    assert value_range([0.0, 1e-3])[0] == 0.0
    low, high = value_range([0.1, 2.3])
    assert 0 <= low < 0.1 and high > 2.3
    assert value_range([-1.0, 1.0])[0] < -1.0  # data below zero keeps its padding


def test_loss_spanning_more_than_two_decades_is_charted_on_a_log_scale():
    from callbacks.flyte_deck import svg_line_chart

    wide = ET.fromstring(svg_line_chart("loss", [(s, 10.0 ** -(s / 10)) for s in range(31)]))
    assert wide.get("data-scale") == "log"
    ticks = tick_values(wide, "y")
    assert len(ticks) >= 4 and all(t > 0 for t in ticks)
    narrow = ET.fromstring(svg_line_chart("loss", [(s, 2.0 - s / 100) for s in range(31)]))
    assert narrow.get("data-scale") == "linear"


@pytest.mark.parametrize("points", [
    [(1, 0.5), (2, 0.5)],  # constant
    [(40, 0.83)],  # a single point
    [(1, -3.0), (2, 5.0)],  # crosses zero: the range may go below
    [(0, 1e-7), (1000, 3e-7)],
])
def test_every_chart_has_at_least_four_labels_per_axis(points):
    from callbacks.flyte_deck import svg_line_chart

    svg = ET.fromstring(svg_line_chart("x", points))
    assert len(tick_values(svg, "x")) >= 4 and len(tick_values(svg, "y")) >= 4
    assert len(set(tick_values(svg, "y"))) == len(tick_values(svg, "y"))  # distinct labels


def test_table_shows_metrics_first_and_collapses_timing_columns():
    from callbacks.flyte_deck import log_history_table

    html = log_history_table(history())
    main, details = html.split("<details>", 1)
    headers = re.findall(r"<th>(.*?)</th>", main)
    assert headers[:5] == ["step", "epoch", "loss", "learning_rate", "grad_norm"]
    assert headers[5:7] == ["eval_accuracy", "eval_loss"]
    for timing in ("eval_runtime", "eval_samples_per_second", "train_runtime", "total_flos"):
        assert timing not in headers and f"<th>{timing}</th>" in details


# -- the evaluation deck -------------------------------------------------------------------------------------------
def test_evaluation_deck_holds_metrics_heatmap_with_per_class_scores_and_tracker_links():
    from callbacks.flyte_deck import evaluation_html

    matrix = [[8, 2, 0], [1, 9, 0], [0, 3, 7]]
    trackers = {
        "mlflow": {"run_id": "abc123", "experiment_id": "4", "tracking_uri": "http://mlflow.local:5000"},
        "wandb": {"run_path": "team/flytrain/r1"},
        "dagshub": {"run_id": "d1", "tracking_uri": "file:///tmp/mlruns"},
    }
    html = evaluation_html({"test_accuracy": 0.8, "test_loss": 0.51}, ["a", "b", "<c>"], matrix, trackers)
    assert "<th>test_accuracy</th><td>0.8</td>" in html
    heatmap = re.search(r'<table class="flytrain-heatmap.*?</table>', html, re.S).group(0)
    rows = re.findall(r"<tr><th>(.*?)</th>(.*?)</tr>", heatmap.split("<tbody>")[1])
    assert [name for name, _ in rows] == ["a", "b", "&lt;c&gt;"]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", body) for _, body in rows]
    # class b: precision 9 / (2 + 9 + 3), recall 9 / 10, support 10
    assert cells[1] == ["1", "9", "0", f"{9 / 14:.3f}", "0.900", "10"]
    assert cells[0][3:] == [f"{8 / 9:.3f}", "0.800", "10"]
    assert 'href="http://mlflow.local:5000/#/experiments/4/runs/abc123"' in html
    assert 'href="https://wandb.ai/team/flytrain/runs/r1"' in html
    assert "run_id=d1" in html and "file:///tmp/mlruns/#" not in html  # a file store has no page to link


def test_evaluation_deck_reads_what_the_pipeline_wrote(tmp_path):
    import json

    from workflows.decks import confusion_matrix, evaluation_deck_html

    metrics, model = tmp_path / "metrics", tmp_path / "model"
    metrics.mkdir()
    model.mkdir()
    (metrics / "metrics.json").write_text(json.dumps({"test_accuracy": 0.75}))
    (metrics / "confusion.csv").write_text("actual,predicted\ncat,cat\ncat,dog\ndog,dog\ndog,dog\n")
    (model / "meta.json").write_text(json.dumps({"classes": ["cat", "dog"]}))
    assert confusion_matrix(str(metrics / "confusion.csv"), ["cat", "dog"]) == [[1, 1], [0, 2]]
    html = evaluation_deck_html(str(metrics), str(model))
    assert "No tracker runs were recorded" in html and "<th>test_accuracy</th><td>0.75</td>" in html
    (model / "provenance.json").write_text(json.dumps({"trackers": {"wandb": {"run_path": "e/p/r"}}}))
    assert "https://wandb.ai/e/p/runs/r" in evaluation_deck_html(str(metrics), str(model))


# -- rendered by a browser -------------------------------------------------------------------------------------------
@requires_chromium
def test_both_decks_render_in_chromium_to_pictures_that_are_not_blank(tmp_path):
    from callbacks.flyte_deck import evaluation_html, log_history_html

    training = log_history_html(history())
    evaluation = evaluation_html({"test_accuracy": 0.9}, [str(i) for i in range(10)],
                                 [[30 if i == j else int(i == 9) for j in range(10)] for i in range(10)], {})
    for name, html, colour in (("training", training, (31, 119, 180)), ("evaluation", evaluation, (31, 78, 153))):
        assert len(html.encode()) < 1_000_000 and "<script" not in html
        png = str(tmp_path / f"{name}.png")
        pixels = screenshot_html(html, png)
        drawn = inked(pixels)
        assert drawn > 0.01 * pixels.shape[0] * pixels.shape[1], f"{name} deck rendered (almost) blank: {drawn} px"
        # the lines of the charts / the dark diagonal of the heatmap are drawn
        assert pixels_near(pixels, colour) > 500, f"{name}: no pixels of the chart/heatmap colour"
        os.remove(png + ".html")
