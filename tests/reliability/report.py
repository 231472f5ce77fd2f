"""Every reliability figure at full size: ``python -m tests.reliability.report`` prints ``| figure | tried | held |``
and the failing cases, and exits non-zero if any case did not hold. Starts its own MLflow servers.
``python -m tests.reliability.report R8 R13`` runs only the figures named (by their first word)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from tests.reliability import bad_inputs, canary, checks, hostile, identity_faults, trackers_faults

Trial = tuple[str, bool, str]


def flyte_chain_trials(kills: int = 5) -> list[Trial]:
    """R1 through a cluster's attempts: ``kills`` pyflyte-execute attempts, each SIGKILLed after its first new Flyte
    checkpoint and resumed by the next from ``--prev-checkpoint``; the last one's model equals an uninterrupted run.
    The whole chain is one trial (its attempts share one verdict)."""
    import torch
    from flytekit.types.directory import FlyteDirectory

    from tests import flyte_helpers as fh
    from tests.test_flyte import MAX_STEPS, small_config
    from trainer_lib import checkpoint as ckpt
    from workflows import pipeline
    from workflows.config import PipelineConfig
    from workflows.flyte_cache import run_fingerprint

    with tempfile.TemporaryDirectory() as root:
        data = os.path.join(root, "data")
        pipeline.prepare(small_config(save_steps=5), data)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the pyflyte subprocesses (OMP_NUM_THREADS=1): identical float reductions
        try:
            pipeline.train(small_config(save_steps=5), data, os.path.join(root, "ref-ck"), os.path.join(root, "ref"),
                           report_to=[])
        finally:
            torch.set_num_threads(threads)
        reference = ckpt.load_weights(os.path.join(root, "ref"))
        config = small_config(save_steps=5, report_to=["flyte"])
        fh.write_inputs(os.path.join(root, "inputs.pb"),
                        {"config": config, "data": FlyteDirectory(data), "workdir": "",
                         "fingerprint": run_fingerprint(config)},
                        {"config": PipelineConfig, "data": FlyteDirectory, "workdir": str, "fingerprint": str})
        env, prev, prev_step, kills_at, problems = fh.flyte_env(root), "", 0, [], []
        for k in range(kills + 1):
            cp, name = os.path.join(root, f"flyte-checkpoint-{k}"), f"attempt{k + 1}"

            def ready(cp=cp, after=prev_step) -> bool:
                newest = fh.complete_checkpoint(cp)
                return newest is not None and ckpt.checkpoint_step(newest) > after

            done = fh.run_until(fh.execute_command(root, name, "train_model", cp, prev), env, os.path.join(root, f"log{k}"),
                             ready if k < kills else None)
            resumed = re.search(r"resuming from \S+/checkpoint-(\d+)", done.stderr)
            if k and not (resumed and int(resumed.group(1)) >= prev_step):
                problems.append(f"{name} did not resume from checkpoint-{prev_step}")
            if k == kills:
                break
            if not done.signalled or done.returncode != -9:
                problems.append(f"{name} was not killed (rc={done.returncode}): {done.stderr[-300:]}")
                break
            prev, prev_step = cp, ckpt.checkpoint_step(fh.complete_checkpoint(cp))
            kills_at.append(prev_step)
        if not problems:
            if done.returncode != 0:
                problems.append(f"the last attempt failed: {done.stderr[-500:]}")
            else:
                model_dir = fh.read_outputs(os.path.join(root, name, "out"))["model"]
                weights = ckpt.load_weights(model_dir)
                if weights.keys() != reference.keys() or not all(torch.equal(weights[n], reference[n])
                                                                 for n in reference):
                    problems.append("final weights differ from the uninterrupted run")
                history = json.load(open(os.path.join(model_dir, "log_history.json")))
                steps = [e["step"] for e in history if "loss" in e]
                if steps != [1] + list(range(10, MAX_STEPS + 1, 10)):
                    problems.append(f"log history not continuous: loss at steps {steps}")
    # one chain is one experiment, whatever its number of attempts: one verdict, one row
    at = ", ".join(f"checkpoint-{s}" for s in kills_at) or "no checkpoint"
    detail = "; ".join(problems) or f"SIGKILLed at {at}; resumed bit-exactly to step {MAX_STEPS}"
    return [(f"a chain of {kills + 1} attempts, {len(kills_at)} SIGKILLed", not problems, detail)]


def _figures(private_server: Callable[[], object], shared) -> list[tuple[str, Callable[[], list[Trial]]]]:
    return [
        ("R1 kill -9 at random moments, resume (12, sync)", lambda: checks.kill_nine_trials(12, mode="sync")),
        ("R1 kill -9 of chained pyflyte-execute attempts (one chain of 6 attempts, 5 killed)", flyte_chain_trials),
        ("R2 damaged checkpoints", checks.damaged_checkpoint_trials),
        ("R3 tracker outage (TensorBoard + DVCLive keep all data)",
         lambda: trackers_faults.tracker_outage_trials(private_server)),
        ("R4 bad inputs, CLI", bad_inputs.cli_trials),
        ("R4 bad inputs, Python API", bad_inputs.api_trials),
        ("R5 malicious pickles in checkpoints", checks.malicious_pickle_trials),
        ("R4 YAML alias bomb through the stage CLI", lambda: [bad_inputs.alias_bomb_trial()]),
        ("R4 runtime errors of the stage CLI (ENOTDIR, debug traceback, diverging training, EACCES as non-root, "
         "EROFS, ENOSPC)",
         bad_inputs.runtime_error_trials),
        ("R6 canary secret, 8 trackers (files, stores, output)",
         lambda: canary.canary_trials(shared.uri, str(shared.root))),
        ("R7 4 concurrent trainings on one MLflow server",
         lambda: trackers_faults.concurrent_mlflow_trials(shared.uri, processes=4, steps=50)),
        ("R8 tampered checkpoint content, manifest agreeing", hostile.tampered_content_trials),
        ("R9 callback-state injection, tracker run ids round-trip",
         lambda: hostile.injection_trials() + hostile.tracker_state_round_trip()),
        ("R10 non-finite loss / gradient norm, settings", hostile.nonfinite_trials),
        ("R11 tied weights (sync, async, save_model)", hostile.tied_weights_trials),
        ("R12 background-write errors, temporary folders", hostile.async_error_trials),
        ("R13 run identity: two runs on one workdir (together, then killed at random moments 10 times, rerun)",
         lambda: identity_faults.identity_trials(kills=10, rounds=2)),
    ]


def main(only: list[str] | None = None) -> int:
    from tests.conftest import MlflowServer, is_tracker_env

    only = sys.argv[1:] if only is None else only

    for name in [n for n in os.environ if is_tracker_env(n)]:
        os.environ.pop(name, None)
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10",
                      MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0", MLFLOW_HTTP_REQUEST_BACKOFF_JITTER="0",
                      MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as work:
        servers = [MlflowServer(Path(work) / "shared")]
        servers[0].start()

        def private_server() -> MlflowServer:
            server = MlflowServer(Path(work) / f"private-{len(servers)}")
            servers.append(server)
            server.start()
            return server

        try:
            for figure, trials in _figures(private_server, servers[0]):
                if only and figure.split()[0] not in only:
                    continue
                start = time.monotonic()
                print(f"running {figure} ...", file=sys.stderr, flush=True)
                try:
                    with contextlib.redirect_stdout(sys.stderr):  # trainings print their logs: keep stdout clean
                        results = trials()
                except Exception:
                    results = [("(the check itself)", False, traceback.format_exc()[-1500:])]
                held = sum(1 for _, ok, _ in results if ok)
                rows.append((figure, len(results), held))
                failures += [(figure, case, detail) for case, ok, detail in results if not ok]
                print(f"  {held}/{len(results)} held in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        finally:
            for server in servers:
                server.stop()
    if not rows:
        print(f"no figure named {' '.join(only)} (names: R1 ... R13)", file=sys.stderr)
        return 2
    print("\n| figure | tried | held |\n|---|---|---|")
    for figure, tried, held in rows:
        print(f"| {figure} | {tried} | {held} |")
    if failures:
        print("\nDid not hold:")
        for figure, case, detail in failures:
            print(f"- {figure} / {case}: {detail}")
    return 1 if failures or any(tried == 0 for _, tried, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
