"""Flyte's dataclass conversion for the pipeline's own dataclasses, with each type's Flyte type computed once.

flytekit's ``DataclassTransformer.get_literal_type`` builds the dataclass's whole JSON schema (mashumaro compiles a
class per nested default on the way) every time it is asked, and it is asked for every task interface it builds and
every input it converts: in the tuning workflow, 6.8 s of a 20 s study on the 2-core VM went there (a map task is
built per round). The schema of a class never changes while the process runs, so ``register`` gives our dataclasses
a transformer that keeps it. Everything else (msgpack values, the Flyte type itself) is flytekit's own.
"""

from __future__ import annotations

from typing import Any

from flytekit.core.type_engine import DataclassTransformer, TypeEngine
from flytekit.models.types import LiteralType


class SchemaKeepingDataclassTransformer(DataclassTransformer):
    """flytekit's dataclass transformer; ``get_literal_type`` answered from a per-class memo."""

    def __init__(self) -> None:
        super().__init__()
        self._name = "flytrain-dataclass"
        self._literal_types: dict[Any, LiteralType] = {}

    def get_literal_type(self, t: Any) -> LiteralType:
        try:
            return self._literal_types[t]
        except KeyError:
            literal_type = self._literal_types[t] = super().get_literal_type(t)
            return literal_type
        except TypeError:  # an unhashable annotation: ask flytekit every time
            return super().get_literal_type(t)


TRANSFORMER = SchemaKeepingDataclassTransformer()


def register(*types: type) -> None:
    """Route these dataclasses through TRANSFORMER (idempotent: a module run twice re-registers its new classes)."""
    for t in types:
        TypeEngine.register_additional_type(TRANSFORMER, t, override=True)
