"""Wall time of a full `dvc repro` and of a no-op one (target <= 3 s) with the default params.yaml.

Runs in a temporary git + DVC repository holding a copy of the project: ``python -m bench.dvc_timing``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SOURCES = ["trainer_lib", "callbacks", "workflows", "data/raw", "dvc.yaml", "params.yaml", ".dvcignore",
           ".gitignore", "pyproject.toml"]


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.com")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run(repo: Path, env: dict[str, str], *cmd: str) -> tuple[float, str]:
    """Run ``cmd`` in ``repo``; returns (wall seconds, output); exits on failure."""
    if cmd[0] == "dvc":
        cmd = (str(VENV_BIN / "dvc"), *cmd[1:])
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}")
    return elapsed, proc.stdout


def make_repo(parent: Path, env: dict[str, str]) -> Path:
    """A git + DVC repository with a copy of the project's tracked sources, committed."""
    repo = parent / "project"
    repo.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(source, repo / name)
    for cmd in (("git", "init", "-q"), ("dvc", "init", "-q"), ("dvc", "config", "core.analytics", "false"),
                ("dvc", "config", "core.check_update", "false"), ("git", "add", "-A"),
                ("git", "commit", "-qm", "project")):
        _run(repo, env, *cmd)
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dvc_timing", description=__doc__)
    parser.add_argument("--noop-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the stages (default: unset)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary repository")
    opts = parser.parse_args()
    env = _env(opts.threads)
    parent = Path(tempfile.mkdtemp(prefix="flytrain-dvc-bench-"))
    try:
        repo = make_repo(parent, env)
        full, output = _run(repo, env, "dvc", "repro")
        stages = [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]
        noops = []
        for _ in range(opts.noop_repeats):
            elapsed, output = _run(repo, env, "dvc", "repro")
            if "Running stage" in output:
                sys.exit(f"the second `dvc repro` ran a stage:\n{output}")
            noops.append(elapsed)
        status, _ = _run(repo, env, "dvc", "status")
        metrics = (repo / "metrics" / "metrics.json").read_text().strip()
        print(f"default params.yaml, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
        print("| measurement | wall time | target |")
        print("|---|---|---|")
        print(f"| full `dvc repro` ({' -> '.join(stages)}) | {full:.1f} s | - |")
        print(f"| no-op `dvc repro` (median of {len(noops)}; min {min(noops):.2f} s) "
              f"| {statistics.median(noops):.2f} s | <= 3 s |")
        print(f"| `dvc status` (up to date) | {status:.2f} s | - |")
        print(f"test metrics: {metrics}")
        if opts.keep:
            print(f"repository kept in {repo}")
    finally:
        if not opts.keep:
            shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
