"""``python -m bench``: the benchmark table; every row measured side by side in this one invocation."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform

import torch

ROWS = ("core", "trackers", "reference", "stall", "resume", "import", "eval", "flyte", "tuning")


def _row(name: str, ours: str, theirs: str, ratio: float, target: str) -> str:
    return f"| {name} | {ours} | {theirs} | {ratio:.3f}x | {target} |"


@contextlib.contextmanager
def _without_progress_override():
    """Row 1 chooses the terminal itself: a FLYTRAIN_PROGRESS from the shell would override that."""
    saved = os.environ.pop("FLYTRAIN_PROGRESS", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["FLYTRAIN_PROGRESS"] = saved


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    opts = parser.parse_args()
    rows = set(opts.rows.split(","))
    from . import core
    from . import rows as extra

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"python {platform.python_version()}")
    print("| row | flytrain | compared with | ratio | target |")
    print("|---|---|---|---|---|")
    if "core" in rows:
        for terminal, where in ((True, "on a terminal: progress bar"), (False, "no terminal: log lines")):
            with _without_progress_override():
                r = core.compare(opts.steps, opts.repeats, terminal=terminal)
            print(_row(f"1. per-step overhead, default callbacks, {where} ({opts.steps} steps)",
                       f"{r['trainer_steps_per_s']:.0f} steps/s", f"hand loop {r['hand_steps_per_s']:.0f} steps/s",
                       r["ratio"], f">= 0.95x (pairs {r['ratio_min']:.2f}-{r['ratio_max']:.2f})"), flush=True)
    if "trackers" in rows:
        from . import trackers

        r = trackers.compare(opts.steps, opts.repeats)
        print(_row("2. file trackers on (tensorboard, mlflow sqlite, wandb offline, dvclive, codecarbon), log/10 steps,"
                   " through the end of training",
                   f"{r['tracked_steps_per_s']:.0f} steps/s ({r['end_s'] * 1000:.0f} ms after the last step)",
                   f"report_to none {r['plain_steps_per_s']:.0f} steps/s",
                   r["ratio"], f">= 0.90x (pairs {r['ratio_min']:.2f}-{r['ratio_max']:.2f})"), flush=True)
    if "reference" in rows:
        from . import reference

        for name, module in (("transformers", "transformers"), ("lightning", "lightning")):
            if importlib.util.find_spec(module) is None:
                print(f"| 3. {name} Trainer on row 1's work | not installed | | | for comparison |")
                continue
            r = reference.compare(name, opts.steps, opts.repeats)
            print(_row(f"3. {name} on row 1's work", f"{r['theirs_steps_per_s']:.0f} steps/s",
                       f"hand loop {r['hand_steps_per_s']:.0f} steps/s", r["ratio"], "for comparison"), flush=True)
    if "stall" in rows:
        r = extra.checkpoint_stall()
        print(_row(f"4. checkpoint stall ({r['params'] / 1e6:.1f}M params, save every 50 steps)",
                   f"{r['lost_async_s'] * 1000:.0f} ms lost/checkpoint (async)",
                   f"sync save {r['lost_sync_s'] * 1000:.0f} ms", r["ratio"], "<= 0.25x"), flush=True)
    if "resume" in rows:
        r = extra.resume_cost()
        print(_row("5. resume cost: start to first optimizer step, mid-epoch resume", f"{r['resume_s'] * 1000:.0f} ms",
                   f"fresh start {r['fresh_s'] * 1000:.0f} ms", r["ratio"], "<= 1.1x"), flush=True)
    if "import" in rows:
        r = extra.import_cost()
        print(f"| 6. `from trainer_lib import Trainer; import callbacks` beyond import torch | {r['seconds']:.3f} s | | | <= 0.15 s |",
              flush=True)
    if "eval" in rows:
        r = extra.eval_throughput()
        print(_row("7. evaluation throughput", f"{r['trainer_samples_per_s']:.0f} samples/s",
                   f"inference_mode loop {r['hand_samples_per_s']:.0f} samples/s", r["ratio"], ">= 0.95x"),
              flush=True)
    if "flyte" in rows:
        from . import flyte_entry

        r = flyte_entry.compare(min(opts.repeats, 3))
        print(_row("8. default job: pyflyte run (local cache off) vs python -m workflows run", f"{r['pyflyte_s']:.1f} s",
                   f"{r['plain_s']:.1f} s", r["ratio"], f"<= 1.5x (pairs {r['ratio_min']:.2f}-{r['ratio_max']:.2f})"),
              flush=True)
        print(f"| 8. cached rerun of the same pyflyte run | {r['cached_s']:.1f} s | | | <= 5 s |", flush=True)
    if "tuning" in rows:
        from . import tuning

        r = tuning.compare()
        print(_row("9. local Flyte tuning workflow, 4 trials x 300 steps (2 rounds of 2)",
                   f"{r['workflow_trials_per_min']:.1f} trials/min", f"plain loop over pipeline.train "
                   f"{r['loop_trials_per_min']:.1f} trials/min", r["ratio"],
                   f">= 0.8x (pairs {r['ratio_min']:.2f}-{r['ratio_max']:.2f})"), flush=True)


if __name__ == "__main__":
    main()
