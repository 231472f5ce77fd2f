"""Callback states in checkpoints: saved as data, restored only into the fields a callback declares.

A callback takes part when it has a ``state()`` method returning the reference's shape ``{"args": {...},
"attributes": {...}}`` (flytrain's ExportableState, or any reference callback such as transformers'
EarlyStoppingCallback, whatever its base class). On resume a stored value is set only for a name that the fresh
callback's own ``state()`` declares, that the instance already has, and only when the value has the type the
instance holds (a field that is still None takes a plain scalar: a run id to continue). Nothing read from disk
chooses which attribute to set; everything else is ignored with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

_PLAIN = (bool, int, float, str)


def declared_state(callback: Any) -> dict[str, dict[str, Any]] | None:
    """The callback's ``state()`` when it has the reference's shape and is plain JSON; None otherwise."""
    method = getattr(type(callback), "state", None)
    if not callable(method):
        return None
    try:
        value = callback.state()
        if not isinstance(value, dict) or not all(isinstance(value.get(k, {}), dict) for k in ("args", "attributes")):
            raise TypeError("state() must return {'args': {...}, 'attributes': {...}}")
        json.dumps(value, allow_nan=False)
    except Exception as error:  # a callback's own bug must not stop a checkpoint
        logger.warning("not saving the state of %s: %s", type(callback).__name__, error)
        return None
    return {"args": dict(value.get("args", {})), "attributes": dict(value.get("attributes", {}))}


def collect_callback_states(callbacks: list) -> dict[str, Any]:
    """``{class name: state}`` (a list when several callbacks share a class), as the reference stores them."""
    exported: dict[str, Any] = {}
    for callback in callbacks:
        value = declared_state(callback)
        if value is None:
            continue
        name = type(callback).__name__
        if name in exported:
            if not isinstance(exported[name], list):
                exported[name] = [exported[name]]
            exported[name].append(value)
        else:
            exported[name] = value
    return exported


def _accepts(current: Any, value: Any) -> bool:
    if current is None:
        return isinstance(value, _PLAIN) or value is None
    if isinstance(current, bool) or isinstance(value, bool):
        return type(current) is type(value)
    if isinstance(current, float):
        return isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(current, (int, str)):
        return type(value) is type(current)
    return isinstance(current, (list, dict)) and type(value) is type(current)


def _plan(callback: Any, entry: dict, source: str) -> list[tuple[str, Any]]:
    """The (name, value) pairs of ``entry`` that ``callback`` declares and that fit; warns about the rest."""
    declared = declared_state(callback) or {"args": {}, "attributes": {}}
    writes, refused, exported_only = [], [], []
    missing = object()
    for part in ("args", "attributes"):
        for name, value in (entry.get(part) or {}).items():
            current = getattr(callback, name, missing) if isinstance(name, str) else missing
            if name in declared[part] and current is missing:
                exported_only.append(name)  # saved for readers of the checkpoint, not a field to restore
            elif name in declared[part] and _accepts(current, value):
                writes.append((name, value))
            else:
                refused.append(f"{part}.{name}")
    if exported_only:
        logger.debug("%s: %s declares %s but has no such fields", source, type(callback).__name__, exported_only)
    if refused:
        logger.warning("%s: ignoring state of %s that it does not declare or that has another type: %s",
                       source, type(callback).__name__, ", ".join(map(str, refused)))
    return writes


def restore_callback_states(callbacks: list, stored: dict[str, Any], source: str) -> None:
    """Restore ``stored`` (checked by trainer_lib.validation) into ``callbacks``, matched by class name in order.

    The writes are planned first and then made: nothing here can fail halfway.
    """
    plans = []
    for name, entries in (stored or {}).items():
        entries = entries if isinstance(entries, list) else [entries]
        matching = [cb for cb in callbacks if type(cb).__name__ == name and declared_state(cb) is not None]
        if not matching:
            logger.warning("%s holds state for callback %s, which this Trainer does not have", source, name)
            continue
        plans += [(cb, _plan(cb, entry, source)) for cb, entry in zip(matching, entries)]
    for callback, writes in plans:
        for name, value in writes:
            setattr(callback, name, value)
