"""``key.path=value`` overrides of a config, as ``dvc exp run -S`` takes them (the value is YAML 1.2, as DVC reads
it: ``0.002``, ``5e-05``, ``[mlflow]``, ``null``; ``no`` is a string), applied through the same strict parser as
params.yaml: an unknown key is an error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import ConfigError, PipelineConfig, parse_text


def apply_overrides(config: PipelineConfig, overrides: Sequence[str]) -> PipelineConfig:
    """A new config with every ``section.key=value`` of ``overrides`` set; errors name the override's key."""
    values: dict[str, Any] = config.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. training.learning_rate=0.002)")
        value = parse_text(raw, f"override {key}")  # YAML 1.2 and bounded, as params.yaml is read
        *sections, name = key.split(".")
        target = values
        for depth, section in enumerate(sections):
            child = target.setdefault(section, {})  # an unknown section is reported by the parser below
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {'.'.join(sections[: depth + 1])} is a value, not a section")
            target = child
        target[name] = value
    try:
        return PipelineConfig.from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"override: {error}") from None
