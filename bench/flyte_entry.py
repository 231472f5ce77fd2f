"""Row 8: what the Flyte entry point costs on its own. The default job by ``pyflyte run workflows/training.py
training_workflow`` against ``python -m workflows run`` (the same pipeline, plain), alternated in pairs, each in a
fresh HOME with Flyte's local cache off; then a rerun of an identical ``pyflyte run`` with the cache on (every
cached task skipped: what is left is pyflyte's start, the resolve step and the evaluation)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from .core import paired

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _env(home: str, cache: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HOME=home, TMPDIR=home, FLYTE_LOCAL_CACHE_ENABLED="true" if cache else "false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{done.stderr[-3000:]}")
    if "test accuracy" not in done.stdout:
        raise RuntimeError(f"{' '.join(argv[:4])} printed no test accuracy:\n{done.stdout[-2000:]}")
    return elapsed


def _pyflyte(cache: bool, home: str | None = None) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-flyte-") as fresh:
        return _timed([os.path.join(BIN, "pyflyte"), "run", "workflows/training.py", "training_workflow"],
                      _env(home or fresh, cache))


def _plain() -> float:
    with tempfile.TemporaryDirectory(prefix="bench-plain-") as home:
        argv = [sys.executable, "-m", "workflows", "run", "--workdir", os.path.join(home, "outputs")]
        return _timed(argv, _env(home, cache=False))


def compare(repeats: int = 3) -> dict[str, float]:
    """Median wall times (s) of both entry points, the median per-pair ratio, and the cached rerun's time."""
    r = paired(_plain, lambda: _pyflyte(cache=False), repeats)
    with tempfile.TemporaryDirectory(prefix="bench-cached-") as home:
        _pyflyte(cache=True, home=home)  # fills the cache
        cached = sorted(_pyflyte(cache=True, home=home) for _ in range(repeats))[repeats // 2]
    return {"plain_s": r["a"], "pyflyte_s": r["b"], "ratio": r["ratio"], "ratio_min": r["ratio_min"],
            "ratio_max": r["ratio_max"], "cached_s": cached}
