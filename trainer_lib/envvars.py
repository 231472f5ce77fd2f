"""Settings read from environment variables: a bad value is an error that names the variable and what it expects."""

from __future__ import annotations

import os


def env_seconds(name: str, default: float, maximum: float | None = None, meaning: str = "") -> float:
    """A number of seconds >= 0 (and <= ``maximum``) from the environment, ``default`` when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 and (maximum is None or value <= maximum)):
        expected = "a number of seconds " + (f"between 0 and {maximum:g}" if maximum is not None else ">= 0")
        raise ValueError(f"environment variable {name}={raw!r}: expected {expected}{meaning}")
    return value
