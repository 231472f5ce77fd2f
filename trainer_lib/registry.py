"""report_to names → integration callback classes, through the ``flytrain.integrations`` entry-point group.

trainer_lib imports no tracker: each integration registers itself (an entry point ``name = "module:Class"``, or
``register_integration`` at run time), and a class is only imported when its name is selected.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "flytrain.integrations"

#: names excluded from report_to="all": flyte needs a running task; azure_ml is skipped when mlflow is there
_NOT_IN_ALL = {"flyte"}

_runtime: dict[str, str | type] = {}


def register_integration(name: str, target: str | type) -> None:
    """Register an integration at run time: ``target`` is a class or ``"module:Class"``."""
    _runtime[name] = target


def available_names() -> dict[str, str | type]:
    """Every known name with its target (entry points first, run-time registrations override)."""
    names: dict[str, str | type] = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    names.update(_runtime)
    return names


def _load(target: str | type) -> type:
    if isinstance(target, type):
        return target
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _is_available(cls: type) -> bool:
    check = getattr(cls, "is_available", None)
    return bool(check()) if callable(check) else True


def resolve_report_to(report_to: list[str] | str | None) -> list[type]:
    """The callback classes for ``report_to``; a clear error for an unknown name or a missing package."""
    if report_to is None or report_to == "none":
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n for n in names if n != "none"]
    known = available_names()
    if "all" in names:
        chosen = []
        for name, target in sorted(known.items()):
            if name in _NOT_IN_ALL:
                continue
            cls = _load(target)
            if _is_available(cls):
                chosen.append(name)
        if "azure_ml" in chosen and "mlflow" in chosen:
            chosen.remove("azure_ml")
        if "dagshub" in chosen:
            chosen.remove("dagshub")  # DagsHub extends MLflow and needs a DagsHub URI: only when named
        names = chosen + [n for n in names if n != "all" and n not in chosen]
    classes = []
    for name in dict.fromkeys(names):
        if name not in known:
            raise ValueError(
                f"TrainingArguments.report_to: unknown integration {name!r}; valid names are "
                f"{sorted(known) + ['all', 'none']}"
            )
        cls = _load(known[name])
        if not _is_available(cls):
            extra = getattr(cls, "pip_extra", "") or name
            raise ImportError(
                f"TrainingArguments.report_to={name!r} needs packages that are not installed: "
                f"pip install 'flytrain[{extra}]'"
            )
        classes.append(cls)
    return classes
