"""R8 run identity with real processes: two ``python -m workflows run`` on one workdir (exactly one trains, the other
is refused while the first holds the lock), and both killed at random moments, then each config rerun: each must end
bit-identical to an uninterrupted run of its own config. Each check returns (case, held, detail)."""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: two runs that differ only in their learning rate: the case where a silent mix-up is invisible in the metrics
CONFIGS = {
    name: {
        "model": {"hidden_sizes": [32]},
        "training": {"max_steps": 40, "per_device_train_batch_size": 16, "learning_rate": lr, "logging_steps": 10,
                     "eval_strategy": "no", "save_strategy": "steps", "save_steps": 5, "save_total_limit": 2},
    }
    for name, lr in (("A", 0.001), ("B", 0.003))
}
LOCKED_EXIT = 3


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("FLYTRAIN_KILL", None)
    return env


def _params(root: str) -> dict[str, str]:
    paths = {}
    for name, values in CONFIGS.items():
        paths[name] = os.path.join(root, f"params-{name}.yaml")
        with open(paths[name], "w") as f:
            yaml.safe_dump(values, f)
    return paths


def _start(params: str, workdir: str, log: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "workflows", "--params", params, "run", "--workdir", workdir],
                                cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)


def references(root: str) -> dict[str, dict[str, torch.Tensor]]:
    """The weights of an uninterrupted run of each config (in-process, one thread like the subprocesses)."""
    from trainer_lib.checkpoint import load_weights
    from workflows import pipeline
    from workflows.config import PipelineConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, values in CONFIGS.items():
            workdir = os.path.join(root, f"reference-{name}")
            pipeline.run(PipelineConfig.from_dict(values), workdir)
            out[name] = load_weights(os.path.join(workdir, "model"))
        return out
    finally:
        torch.set_num_threads(threads)


def _same(workdir: str, expected: dict[str, torch.Tensor]) -> bool:
    from trainer_lib.checkpoint import load_weights

    weights = load_weights(os.path.join(workdir, "model"))
    return weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


def _holder_pid(lock_file: str) -> int | None:
    try:
        with open(lock_file) as f:
            return int(json.loads(f.read() or "{}")["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _lock_is_held(lock_file: str) -> bool:
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _wait(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def concurrent_start_trial(root: str, refs: dict) -> tuple[str, bool, str]:
    """A and B started together on one workdir. The first to take the lock is frozen (SIGSTOP) while it holds it,
    so the other must be refused without waiting for it; then the first is let go and must finish as its own run."""
    params, workdir = _params(root), os.path.join(root, "together")
    lock_file = os.path.join(workdir, ".flytrain.lock")
    procs = {name: _start(params[name], workdir, os.path.join(root, f"together-{name}.log")) for name in CONFIGS}
    problems = []
    try:
        pids = {p.pid: name for name, p in procs.items()}
        winner = None
        while winner is None:  # event: a process wrote its pid into the lock file it holds
            pid = _holder_pid(lock_file) if os.path.exists(lock_file) else None
            if pid in pids:
                winner = pids[pid]
                os.kill(pid, signal.SIGSTOP)
            elif all(p.poll() is not None for p in procs.values()):
                return ("two runs started together", False, "neither took the lock: "
                        + open(os.path.join(root, "together-A.log")).read()[-800:])
            time.sleep(0.002)
        loser = next(n for n in CONFIGS if n != winner)
        started = time.monotonic()
        code = _wait(procs[loser])
        waited = time.monotonic() - started
        message = open(os.path.join(root, f"together-{loser}.log")).read()
        if code != LOCKED_EXIT:
            problems.append(f"the second run exited {code}, expected {LOCKED_EXIT}")
        if not re.search(rf"error: {re.escape(workdir)} is in use by another training \(pid "
                         rf"{procs[winner].pid} on host \S+\)", message):
            problems.append(f"no lock message naming the folder and holder: {message[-400:]!r}")
        if len(message.strip().splitlines()) != 1:
            problems.append(f"the refusal is not one line: {message[-400:]!r}")
        if procs[winner].poll() is not None or not _lock_is_held(lock_file):
            problems.append("the first run did not hold the lock while the second was refused")
        os.kill(procs[winner].pid, signal.SIGCONT)
        if _wait(procs[winner]) != 0:
            problems.append(f"the first run failed: {open(os.path.join(root, f'together-{winner}.log')).read()[-500:]}")
        elif not _same(workdir, refs[winner]):
            problems.append(f"the first run ({winner}) did not end with its own config's weights")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    detail = "; ".join(problems) or f"{winner} trained; the other was refused {waited:.2f} s after the lock was taken"
    return ("two runs started together on one workdir", not problems, detail)


def concurrent_then_kills(kills: int, rounds: int, seed: int = 0) -> list[tuple[str, bool, str]]:
    """The concurrent start, then ``kills`` kill trials whose random moments span that run's wall time."""
    with tempfile.TemporaryDirectory() as root:
        refs = references(root)
        started = time.monotonic()
        together = concurrent_start_trial(root, refs)
        span = time.monotonic() - started
        return [together] + kill_trials(root, refs, kills, rounds, seed, span=span)


def kill_trials(root: str, refs: dict, trials: int, rounds: int = 1, seed: int = 0,
                span: float | None = None) -> list[tuple[str, bool, str]]:
    """Per trial: ``rounds`` times start A and B together on one workdir and SIGKILL each at its own random moment
    (uniform over 1.2 x ``span``, one uninterrupted process's wall time, measured when not given); then rerun B and
    A to the end: each must end with its own config's uninterrupted weights."""
    params, rng, results = _params(root), random.Random(seed), []
    span = span or _duration(params["A"], os.path.join(root, "timing"))
    for trial in range(trials):
        workdir = os.path.join(root, f"trial-{trial}")
        moments = []
        for r in range(rounds):
            procs = {n: _start(params[n], workdir, os.path.join(root, f"t{trial}-{r}-{n}.log")) for n in CONFIGS}
            delays = {n: rng.uniform(0.0, 1.2 * span) for n in CONFIGS}
            started = time.monotonic()
            for name in sorted(CONFIGS, key=delays.get):
                while procs[name].poll() is None and time.monotonic() - started < delays[name]:
                    time.sleep(0.005)
                if procs[name].poll() is None:
                    procs[name].kill()
                procs[name].wait()
            moments.append(", ".join(f"{n} at {delays[n]:.1f}s" for n in CONFIGS))
        problems = []
        for name in ("B", "A"):  # B first: the original failure was B finishing with A's weights
            rerun = _start(params[name], workdir, os.path.join(root, f"t{trial}-rerun-{name}.log"))
            if _wait(rerun) != 0:
                problems.append(f"rerun {name} failed: "
                                f"{open(os.path.join(root, f't{trial}-rerun-{name}.log')).read()[-400:]}")
            elif not _same(workdir, refs[name]):
                problems.append(f"rerun {name} did not end with its own config's uninterrupted weights")
        results.append((f"trial {trial}: killed {'; '.join(moments)}", not problems,
                        "; ".join(problems) or "each config ended bit-identical to its own uninterrupted run"))
    return results


def _duration(params: str, workdir: str) -> float:
    """Wall time of one uninterrupted process (the span the random kill moments are drawn from)."""
    started = time.monotonic()
    proc = _start(params, workdir, workdir + ".log")
    _wait(proc)
    return time.monotonic() - started


def identity_trials(kills: int = 10, rounds: int = 2, seed: int = 0) -> list[tuple[str, bool, str]]:
    """The full figure: the concurrent start and ``kills`` kill trials (for the reliability report)."""
    return concurrent_then_kills(kills, rounds, seed)
