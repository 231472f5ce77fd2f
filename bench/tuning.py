"""Bench row 9: trials per minute of the local Flyte tuning workflow vs the same trials as a plain loop.

Both sides prepare the data, train the same proposals of the same seeded study (``workflows.search``) with
``pipeline.train`` and evaluate the best trial; the workflow side adds Flyte's local orchestration (type conversion,
the study file between rounds, map tasks, deck). The local cache is off, so every repeat trains every trial.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from workflows.config import PipelineConfig, SearchConfig, apply_params

from .core import paired

#: a realistic small trial: 300 optimizer steps of the default MLP with an evaluation every 100
CONFIG = {"training": {"max_steps": 300, "logging_steps": 50, "eval_strategy": "steps", "eval_steps": 100,
                       "save_strategy": "steps", "save_steps": 100, "report_to": ["none"]}}
SEARCH = {"sampler": "random", "n_trials": 4, "parallelism": 2, "seed": 0}


def _workflow_run() -> float:
    from workflows.tuning import tuning_workflow

    started = time.perf_counter()
    tuning_workflow(config=PipelineConfig.from_dict(CONFIG), search=SearchConfig.from_dict(SEARCH))
    return time.perf_counter() - started


def _loop_run() -> float:
    from workflows import pipeline
    from workflows import search as study_file
    from workflows.tuning import trial_objective

    config, search = PipelineConfig.from_dict(CONFIG), SearchConfig.from_dict(SEARCH)
    root = tempfile.mkdtemp(prefix="bench-tuning-")
    try:
        started = time.perf_counter()
        data = os.path.join(root, "data")
        pipeline.prepare(config, data)
        path = os.path.join(root, "study.log")
        study_file.create(search, path)
        scores = {}
        while True:
            proposals = study_file.ask(search, path, search.parallelism)
            if not proposals:
                break
            for number, values in proposals:
                out = os.path.join(root, f"trial-{number}")
                pipeline.train(apply_params(config, values), data, os.path.join(out, "checkpoints"),
                               os.path.join(out, "model"), report_to=["none"])
                scores[number] = trial_objective(os.path.join(out, "model"), search.metric)
            study_file.tell(path, [(n, scores[n]) for n, _ in proposals])
        best = study_file.best(search, path)["number"]
        pipeline.evaluate(config, data, os.path.join(root, f"trial-{best}", "model"), os.path.join(root, "metrics"))
        return time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)


def compare(repeats: int = 3) -> dict[str, float]:
    """Trials per minute of both sides (medians) and the median per-pair ratio workflow/loop."""
    os.environ["FLYTE_LOCAL_CACHE_ENABLED"] = "false"
    n = SEARCH["n_trials"]
    _loop_run()  # warm-up: imports (torch._dynamo, optuna, flytekit) land outside the measurement
    _workflow_run()
    r = paired(lambda: n * 60 / _loop_run(), lambda: n * 60 / _workflow_run(), repeats)
    return {"loop_trials_per_min": r["a"], "workflow_trials_per_min": r["b"], "ratio": r["ratio"],
            "ratio_min": r["ratio_min"], "ratio_max": r["ratio_max"]}
