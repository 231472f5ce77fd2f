"""Reading a config's text: bounded, safe, and as YAML 1.2 (the YAML DVC reads and writes params.yaml in).

A file over MAX_CONFIG_BYTES, or YAML whose aliases expand to more than MAX_CONFIG_VALUES values or nest deeper
than MAX_CONFIG_DEPTH (an alias bomb), is refused before anything walks it; an error message shows at most a short
excerpt of a value.

YAML 1.2, not PyYAML's YAML 1.1: ``dvc exp run -S training.eval_strategy=no`` writes ``eval_strategy: no`` back
unquoted, which YAML 1.1 reads as the boolean false (and ``5e-05`` as a string, ``010`` as 8, ``1:30`` as 90). Here only
``true``/``false`` are booleans, ``5e-05`` is a number and ``no``, ``on``, ``1:30`` stay strings, as DVC and
DVCLive (ruamel.yaml) read them.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
from typing import Any

import yaml

#: the largest params.yaml / config file read (a real one is a few hundred bytes)
MAX_CONFIG_BYTES = 1 << 20
#: the most values (mapping entries, list items, scalars) a config may hold once YAML aliases are expanded
MAX_CONFIG_VALUES = 10_000
#: the deepest nesting of mappings and lists a config may have (the schema itself is 3 levels deep)
MAX_CONFIG_DEPTH = 32

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


class ConfigError(ValueError):
    """A config value that is unknown, of the wrong type or out of range; the message names its key."""


def show(value: Any) -> str:
    """A bounded excerpt of ``value`` for an error message (reprlib stops early, so a huge value costs nothing)."""
    text = _SHORT.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_size(data: Any, origin: str) -> None:
    """Refuse a parsed config whose aliases expand too far, counting at most MAX_CONFIG_VALUES values."""
    count = 0
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{origin}: more than {MAX_CONFIG_VALUES} values once YAML aliases are expanded "
                              "(an alias bomb?)")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{origin}: nested deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader (no objects built) with YAML 1.2's core schema for plain scalars."""


_YAML11_ONLY = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int"}
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+|0b[01_]+)$"),
    list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*|[0-9][0-9_]*(?=[eE]))(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")  # digit separators, as ruamel.yaml reads them
    if text.startswith(("0o", "0x", "0b")):
        return int(text, 0)
    return int(text, 10)  # "010" is ten in YAML 1.2 (YAML 1.1: eight)


def _yaml12_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).replace("_", "").lower()
    if text.endswith((".inf", ".nan")):
        return float(text.replace(".", ""))
    return float(text)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)
_Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _yaml12_float)


def load_yaml(text: str) -> Any:
    """YAML 1.2 text → plain data (unbounded: callers bound it, see parse_text)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def parse_text(text: str, origin: str) -> Any:
    """YAML 1.2/JSON text → plain data (a safe loader: no objects built), bounded as the module says."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{origin}: {len(text)} characters, more than a config may hold ({MAX_CONFIG_BYTES})")
    try:
        data = load_yaml(text)
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())
        raise ConfigError(f"{origin} is not valid YAML/JSON: {detail[:300]}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: nested too deeply") from None
    _check_size(data, origin)
    return data


def parse_json(text: str, origin: str) -> Any:
    """JSON text → plain data (``Infinity`` included, so that the finiteness checks name the key), bounded."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{origin}: {len(text)} characters, more than a config may hold ({MAX_CONFIG_BYTES})")
    try:
        data = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{origin}: nested too deeply") from None
    except ValueError as error:
        raise ConfigError(f"{origin} is not valid JSON: {error}") from None
    _check_size(data, origin)
    return data


def read_config_file(path: str) -> dict[str, Any] | None:
    """A YAML/JSON config file as plain data, bounded as the module says; an error names the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path!r} is {size} bytes, more than a config may hold ({MAX_CONFIG_BYTES})")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path!r} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    data = parse_text(text, f"config file {path!r}")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping, got {type(data).__name__}")
    return data
