"""Secret redaction: nothing that looks like a token, key or password leaves the process in params or files."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

#: any key whose name suggests a credential
_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|apikey|credential|auth)", re.IGNORECASE)
REDACTED = "***REDACTED***"


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def secret_values() -> set[str]:
    """Values of environment variables that hold credentials (never to be sent anywhere)."""
    return {v for k, v in os.environ.items() if is_secret_key(k) and v and len(v) >= 4}


def redact(params: Mapping[str, Any], _secrets: set[str] | None = None) -> dict[str, Any]:
    """Parameters with credential-looking keys, and any value containing a known secret, replaced."""
    secrets = secret_values() if _secrets is None else _secrets
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out[key] = redact(value, secrets)
        elif is_secret_key(str(key)) and value not in (None, "", False):
            out[key] = REDACTED
        elif isinstance(value, str) and any(s in value for s in secrets):
            for s in secrets:
                value = value.replace(s, REDACTED)
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = [redact({"v": v}, secrets)["v"] for v in value]
        else:
            out[key] = value
    return out
