"""What MLflow accepts: metric and param names, MLFLOW_TAGS, JSON-valued params redacted inside, batch sizes."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from ._common import flatten_dict, redact

logger = logging.getLogger("callbacks.mlflow")

_BAD_NAME_CHARS = re.compile(r"[^\w\-./ ]")


def sanitize_name(name: Any) -> str:
    """A metric or param name MLflow accepts everywhere: other characters become "_", no empty path parts."""
    parts = [p for p in _BAD_NAME_CHARS.sub("_", str(name)).split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "_"


def _env_tags() -> dict[str, str]:
    raw = os.environ.get("MLFLOW_TAGS", "").strip()
    if not raw:
        return {}
    try:
        tags = json.loads(raw)
    except ValueError:
        tags = None
    if not isinstance(tags, Mapping):
        raise ValueError(f"environment variable MLFLOW_TAGS={raw!r}: expected a JSON object, e.g. '{{\"team\": \"nlp\"}}'")
    return {str(k): str(v) for k, v in tags.items()}


def _expand_json_params(params: Mapping[str, Any], flatten: bool) -> dict[str, Any]:
    """Redact inside JSON-encoded dict values (e.g. ``extra``) too, and spread them out when flattening."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        decoded = None
        if isinstance(value, str) and value.startswith("{"):
            try:
                decoded = json.loads(value)
            except ValueError:
                pass
        if isinstance(decoded, Mapping):
            clean = redact(decoded)
            if flatten:
                out.update({f"{key}.{k}": v for k, v in flatten_dict(clean).items()})
            else:
                out[key] = json.dumps(clean, sort_keys=True, default=str)
        else:
            out[key] = value
    return flatten_dict(out) if flatten else out


def _chunks(items: list, size: int):
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


def params_to_send(params: Mapping[str, Any], existing: Mapping[str, str], max_length: int) -> dict[str, str]:
    """The params to log, as MLflow-safe names and text: a value over MLflow's length limit is left out, a param a
    continued run already holds is not sent again (MLflow keeps the first value); both are warned about once."""
    new, too_long, changed = {}, [], []
    for key, value in params.items():
        name, text = sanitize_name(key), str(value)
        if len(text) > max_length:
            too_long.append(name)
        elif name in existing:
            if existing[name] != text:
                changed.append(name)
        else:
            new[name] = text
    if too_long:
        logger.warning("MLflow: parameters %s are longer than MLflow's limit of %d characters and are not logged",
                       too_long, max_length)
    if changed:
        logger.warning("MLflow: parameters %s differ from the continued run's; MLflow keeps the first values", changed)
    return new
