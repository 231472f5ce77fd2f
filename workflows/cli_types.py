"""``pyflyte run --config`` / ``--search``: read through our bounded loader, before flytekit's own parser sees them.

flytekit turns a dataclass input into a ``JsonParamType``, which reads a ``.yaml`` path with an unbounded
``yaml.safe_load`` and then ``json.dumps`` the result: a 300-byte alias bomb expands to billions of values there and
the command hangs before any of our code runs. ``install()`` makes pyflyte give PipelineConfig and SearchConfig
inputs a click type of ours instead: a file goes through ``read_config_file`` (size, alias and depth bounds), any
other string through ``parse_json`` (JSON, as flytekit takes it, with the same bounds), and any ConfigError is click's short usage error naming the file or key.

flytekit offers no hook for a type's click parameter, so ``install`` wraps ``literal_type_to_click_type`` in
``flytekit.interaction.click_types`` (looked up there by ``FlyteLiteralConverter`` when pyflyte builds the command's
options, after it has imported the workflow module). Every other type keeps flytekit's click type; the value passed
on is the same dataclass instance flytekit's type produced, so local and remote runs are unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import click

from workflows.config import ConfigError, PipelineConfig, SearchConfig, parse_json

#: the inputs that get ConfigParamType (their classes have ``load(path)`` and ``from_dict``)
BOUNDED_TYPES = (PipelineConfig, SearchConfig)


class ConfigParamType(click.ParamType):
    """A config input: a JSON/YAML object or a YAML/JSON file path, parsed with the bounds of workflows/config.py."""

    def __init__(self, python_type: type) -> None:
        self.python_type = python_type
        self.name = f"JSON object or YAML/JSON file ({python_type.__name__})"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.python_type) or not isinstance(value, str | dict):
            return value  # a default already built, or an artifact query flytekit resolves itself
        try:
            if isinstance(value, dict):
                return self.python_type.from_dict(value)
            if os.path.isfile(value):
                return self.python_type.load(value)
            return self.python_type.from_dict(parse_json(value, f"--{param.name if param else 'config'}"))
        except click.BadParameter:
            raise
        except ConfigError as error:
            # trainer_lib is loaded already here (the workflow module imports it); not at import: it loads torch
            from trainer_lib.redaction import mask_urls

            self.fail(mask_urls(str(error)), param, ctx)


def install() -> None:
    """Route pyflyte's click type for BOUNDED_TYPES to ConfigParamType (idempotent; a no-op without flytekit)."""
    try:
        from flytekit.interaction import click_types
    except ImportError:
        return
    original = click_types.literal_type_to_click_type
    if getattr(original, "flytrain_bounded", False):
        return

    def literal_type_to_click_type(lt, python_type):
        if dataclasses.is_dataclass(python_type) and python_type in BOUNDED_TYPES:
            return ConfigParamType(python_type)
        return original(lt, python_type)

    literal_type_to_click_type.flytrain_bounded = True
    click_types.literal_type_to_click_type = literal_type_to_click_type
