"""Secret redaction: nothing that looks like a token, key or password leaves the process in params, files or logs.

The name rule (``is_secret_key``): a name is split into word parts (on ``_ - . /``, spaces and camelCase) and is a
secret when one part is a credential word (token, key, secret, password, passwd, auth, credential, private, dsn,
cookie, session, …) or ends in a strong one (``authtoken``, ``dbpassword``), unless the part right after the last
such word says the value is only *about* a credential (``pad_token_id``, ``session_count``, ``metric_key_prefix``,
``password_file``). Word parts, not substrings: ``monkey``, ``tokenizer_name`` and ``num_tokens`` are not secrets.
A secret name hides its whole value (a dict or list under it included); every string value anywhere also has a URL
password (``postgresql://u:***@host/db``) and secret-named query parameters masked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***REDACTED***"
#: what replaces the password of a URL's userinfo (``scheme://user:***@host``)
MASK = "***"

#: a word part that is a credential (or a container of them)
_SECRET_WORDS = frozenset({
    "token", "key", "apikey", "secret", "secrets", "password", "passwd", "pwd", "passphrase", "auth",
    "authorization", "authentication", "credential", "credentials", "creds", "private", "privatekey", "dsn",
    "cookie", "cookies", "session", "sessionid",
})
#: a word part ending in one of these is a credential too (``authtoken``, ``dbpassword``, ``clientsecret``);
#: ``key`` is not among them, or ``monkey`` and ``hotkey`` would be secrets
_SECRET_ENDINGS = ("token", "password", "passwd", "secret", "apikey", "credential", "credentials")
#: a part right after the last credential word that makes the name describe a credential rather than hold one
_QUALIFIERS = frozenset({
    "id", "ids", "type", "types", "count", "counts", "num", "len", "length", "size", "limit", "max", "min",
    "prefix", "suffix", "index", "idx", "name", "names", "path", "file", "dir", "url", "uri", "timeout", "steps",
    "step", "interval", "column", "field", "env", "var", "enabled", "required",
})
_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")

#: ``scheme://userinfo@``: group 1 the scheme, 2 the user, 3 ``:password`` (may be absent)
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^\s/?#@:]*)(:[^\s/?#]*)?@")
_QUERY_PARAM = re.compile(r"([?&;])([^=&;#\s]+)=([^&;#\s]*)")


def name_parts(name: str) -> list[str]:
    """``"apiKey"`` → ``["api", "key"]``, ``"DB_PASSWORD"`` → ``["db", "password"]``."""
    return [p.lower() for p in _PARTS.findall(name)]


def is_secret_key(key: str) -> bool:
    """Whether a parameter, config key or environment variable named ``key`` holds a credential (rule above)."""
    parts = name_parts(str(key))
    last = -1
    for i, part in enumerate(parts):
        if part in _SECRET_WORDS or part.endswith(_SECRET_ENDINGS):
            last = i
    if last < 0:
        return False
    return last + 1 >= len(parts) or parts[last + 1] not in _QUALIFIERS


#: values of credential-named variables that are settings, not secrets (HF_HUB_DISABLE_IMPLICIT_TOKEN=true)
_NOT_SECRET_VALUES = frozenset({"true", "false", "yes", "no", "on", "off", "none", "null"})


def secret_values() -> set[str]:
    """Values of environment variables that hold credentials (never to be sent anywhere)."""
    return {
        v for k, v in os.environ.items()
        if is_secret_key(k) and len(v) >= 4 and v.strip().lower() not in _NOT_SECRET_VALUES
        and not (v.isdigit() and len(v) < 8)  # a short number would be masked inside every step count
    }


def _mask_userinfo(match: re.Match) -> str:
    scheme, user, password = match.group(1), match.group(2), match.group(3)
    if password is None:  # a lone user part is often the token itself (https://<token>@host)
        return f"{scheme}{MASK}@" if user else match.group(0)
    return f"{scheme}{user}:{MASK}@"


def _mask_query(match: re.Match) -> str:
    sep, name, value = match.groups()
    return f"{sep}{name}={REDACTED}" if value and is_secret_key(name) else match.group(0)


def mask_urls(text: str) -> str:
    """``text`` with every URL's password (or lone user token) and secret-named query parameters masked."""
    if "://" in text:
        text = _URL_USERINFO.sub(_mask_userinfo, text)
    if "=" in text:
        text = _QUERY_PARAM.sub(_mask_query, text)
    return text


def redact_text(text: str, _secrets: set[str] | None = None) -> str:
    """A string with URL passwords masked and any known secret value (from the environment) replaced."""
    text = mask_urls(text)
    for secret in secret_values() if _secrets is None else _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_value(value: Any, _secrets: set[str] | None = None) -> Any:
    """Any JSON-like value redacted: mappings by key name, every string by content; tuples become lists."""
    secrets = secret_values() if _secrets is None else _secrets
    if isinstance(value, Mapping):
        return redact(value, secrets)
    if isinstance(value, (list, tuple)):
        return [redact_value(v, secrets) for v in value]
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value


def redact(params: Mapping[str, Any], _secrets: set[str] | None = None) -> dict[str, Any]:
    """Parameters with credential-named keys hidden whole (nested dicts and lists too), strings masked."""
    secrets = secret_values() if _secrets is None else _secrets
    out: dict[str, Any] = {}
    for key, value in params.items():
        if is_secret_key(str(key)) and value not in (None, "", False) and not (
            isinstance(value, (Mapping, list, tuple)) and not value
        ):
            out[key] = REDACTED
        else:
            out[key] = redact_value(value, secrets)
    return out
