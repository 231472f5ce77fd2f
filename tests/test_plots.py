"""The evaluate stage's static charts: self-contained SVG, byte-identical for identical inputs."""

from __future__ import annotations

import re

from workflows.plots import PLOT_FILES, nice_ticks, write_plots

HISTORY = [
    {"loss": 2.3, "grad_norm": 1.1, "learning_rate": 1e-3, "epoch": 0.5, "step": 10},
    {"eval_loss": 0.9, "eval_accuracy": 0.71, "epoch": 1.0, "step": 20},
    {"loss": 0.4, "grad_norm": 0.5, "learning_rate": 5e-4, "epoch": 1.5, "step": 30},
    {"eval_loss": 0.3, "eval_accuracy": 0.93, "epoch": 2.0, "step": 40},
    {"train_loss": 1.2, "epoch": 2.0, "step": 40},
]


def test_charts_are_self_contained_and_identical_between_runs(tmp_path):
    actual, predicted = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    first = write_plots(HISTORY, actual, predicted, ["cat", "dog", "eel"], str(tmp_path / "a"))
    second = write_plots(HISTORY, actual, predicted, ["cat", "dog", "eel"], str(tmp_path / "b"))
    assert [p.rsplit("/", 1)[1] for p in first] == list(PLOT_FILES)
    for a, b in zip(first, second):
        svg = open(a, encoding="utf-8").read()
        assert svg == open(b, encoding="utf-8").read()
        assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
        # nothing to fetch: the only URL is the SVG namespace
        assert re.findall(r"https?://[^\"' ]+", svg) == ["http://www.w3.org/2000/svg"]
    loss = open(first[0], encoding="utf-8").read()
    assert ">training<" in loss and ">validation<" in loss and loss.count("<polyline") == 2
    accuracy = open(first[1], encoding="utf-8").read()
    assert ">accuracy<" in accuracy and "eval_loss" not in accuracy and accuracy.count("<polyline") == 1
    confusion = open(first[3], encoding="utf-8").read()
    cells = re.findall(r'<rect x="\d+" y="\d+" width="\d+" height="\d+" fill="#[0-9a-f]{6}" stroke="#ddd"/>'
                       r'(?:<text [^>]*>(\d+)</text>)?', confusion)
    assert [int(c or 0) for c in cells] == [1, 1, 0, 0, 1, 0, 1, 0, 2]  # rows: actual, columns: predicted
    assert "4 of 6 right (66.7%)" in confusion


def test_ticks_are_round_numbers_covering_the_range():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.5, 1.0]
    assert nice_ticks(-0.05, 2.4) == [0.0, 1.0, 2.0]
    assert nice_ticks(0.0, 1200.0, 6) == [0.0, 500.0, 1000.0]
    assert nice_ticks(3.0, 3.0) == [3.0]
