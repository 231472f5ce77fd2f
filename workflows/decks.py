"""The Evaluation deck of the Flyte workflow, and, after a local ``pyflyte run``, where the run's decks are.

flytekit writes each task's deck into a new random folder of its local sandbox only after the task returns, so the
locations are printed when the ``pyflyte run`` process exits (after its outputs line), with the test metrics.
"""

from __future__ import annotations

import atexit
import csv
import glob
import json
import os
import sys
from typing import Any

from callbacks.flyte_deck import evaluation_html

#: a mark of each of our decks in flytekit's deck.html, most specific first (a local run's later decks also carry
#: the earlier tasks' tabs)
DECK_OWNERS = {'class="flytrain-heatmap': "evaluate_model", 'class="flytrain-log-history': "train_model"}
_state: dict[str, Any] = {"registered": False, "metrics": None, "sandbox": None, "silenced": False,
                          "cached_metrics_dir": None}


def confusion_matrix(confusion_csv: str, classes: list[str]) -> list[list[int]]:
    """Counts ``[actual][predicted]`` from the pipeline's confusion.csv (one ``actual,predicted`` row per example)."""
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    with open(confusion_csv, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            matrix[index[row["actual"]]][index[row["predicted"]]] += 1
    return matrix


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def evaluation_deck_html(metrics_dir: str, model_dir: str) -> str:
    """The deck's HTML from what pipeline.evaluate wrote (metrics.json, confusion.csv) and the model folder's
    meta.json (class names) and provenance.json (tracker runs, when the training recorded them)."""
    metrics = _read_json(os.path.join(metrics_dir, "metrics.json")) or {}
    classes = (_read_json(os.path.join(model_dir, "meta.json")) or {}).get("classes") or []
    matrix = confusion_matrix(os.path.join(metrics_dir, "confusion.csv"), classes)
    trackers = (_read_json(os.path.join(model_dir, "provenance.json")) or {}).get("trackers") or {}
    return evaluation_html(metrics, classes, matrix, trackers)


#: the Evaluation deck's HTML in the metrics folder (a cached evaluation renders no deck; its outputs carry this)
EVALUATION_HTML = "evaluation.html"


def render_evaluation_deck(metrics_dir: str, model_dir: str) -> None:
    """Add the Evaluation deck to the running task (shown when the task has ``enable_deck=True``) and write it to
    ``metrics_dir/evaluation.html``."""
    from flytekit import Deck

    html = evaluation_deck_html(metrics_dir, model_dir)
    Deck("Evaluation", html)
    with open(os.path.join(metrics_dir, EVALUATION_HTML), "w", encoding="utf-8") as f:
        f.write(f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Evaluation</title>"
                "<style>body{font-family:system-ui,sans-serif;margin:1.5em}</style></head>"
                f"<body>{html}</body></html>")


def _local_sandbox() -> str | None:
    """The local sandbox of a ``pyflyte run`` (where flytekit writes decks), None inside a cluster's task."""
    from flytekit.core.context_manager import FlyteContextManager

    context = FlyteContextManager.current_context()
    if context.execution_state is None or not context.execution_state.is_local_execution():
        return None
    return str(context.file_access.local_sandbox_dir)


def announce_at_exit() -> None:
    """In a local run, print the test metrics and the decks' paths when the process ends (once per process)."""
    if _state["registered"]:
        return
    sandbox = _local_sandbox()
    if sandbox is None:
        return
    _state.update(registered=True, sandbox=sandbox)
    _watch_cached_evaluation()
    atexit.register(_announce)


def _watch_cached_evaluation() -> None:
    """Note the metrics folder of an evaluation that flytekit's local cache answered (its task body never runs, so
    it cannot tell us itself); without that flytekit function the cached run just prints less."""
    try:
        from flytekit.core.local_cache import LocalTaskCache
    except ImportError:  # pragma: no cover - another flytekit layout
        return
    original = LocalTaskCache.__dict__.get("get")
    if not isinstance(original, staticmethod) or getattr(original.__func__, "_flytrain_watch", False):
        return
    lookup = original.__func__

    def get(task_name, *args, **kwargs):
        outputs = lookup(task_name, *args, **kwargs)
        if outputs is not None and task_name.endswith(".evaluate_model"):
            blob = getattr(getattr(outputs.literals.get("metrics"), "scalar", None), "blob", None)
            if blob is not None and os.path.isdir(blob.uri):
                _state["cached_metrics_dir"] = blob.uri
        return outputs

    get._flytrain_watch = True
    LocalTaskCache.get = staticmethod(get)


def silence_at_exit() -> None:
    """A local run that ends early (refused input, interrupted) has no decks or metrics to announce."""
    _state["silenced"] = True


def remember_test_metrics(metrics: dict[str, float]) -> None:
    _state["metrics"] = dict(metrics)


def find_decks(sandbox: str) -> list[tuple[str, str]]:
    """``(task, path)`` of every deck in ``sandbox``, oldest first; the task named from the deck it holds."""
    found = []
    for path in sorted(glob.glob(os.path.join(sandbox, "*", "deck.html")), key=os.path.getmtime):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        owner = next((task for mark, task in DECK_OWNERS.items() if mark in text), "a task")
        found.append((owner, path))
    return found


def _announce() -> None:
    if _state["silenced"]:
        return
    lines = []
    metrics = _state["metrics"]
    cached = _state["cached_metrics_dir"]
    if metrics is None and cached:
        metrics = _read_json(os.path.join(cached, "metrics.json"))
        lines.append("evaluate_model: from Flyte's cache (model and data unchanged)")
    if metrics:
        lines.append("test metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        if "test_accuracy" in metrics:
            lines.append(f"test accuracy: {metrics['test_accuracy']:.4f}")
    decks = find_decks(_state["sandbox"])
    if cached and os.path.isfile(os.path.join(cached, EVALUATION_HTML)) and not any(t == "evaluate_model" for t, _ in decks):
        decks.append(("evaluate_model", os.path.join(cached, EVALUATION_HTML)))
    if decks:
        lines.append("Flyte decks (open in a browser):")
        lines.extend(f"  {task}: file://{path}" for task, path in decks)
    else:
        lines.append("no Flyte decks were written (tasks whose results came from the cache render none)")
    print("\n".join(lines), file=sys.stdout, flush=True)
