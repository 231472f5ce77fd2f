"""workflows/flyte_types.py: the pipeline's dataclasses get flytekit's own Flyte type and values, the type computed
once per class instead of at every task interface and input."""

from __future__ import annotations

from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.type_engine import DataclassTransformer, TypeEngine

import workflows.tuning  # noqa: F401 (registers the trial dataclasses)
from workflows import flyte_types
from workflows.config import PipelineConfig, SearchConfig
from workflows.tuning import TrialResult, TrialSpec


def test_same_type_and_values_as_flytekit_with_the_schema_built_once(monkeypatch):
    plain = DataclassTransformer()
    built = []
    original = DataclassTransformer.get_literal_type
    monkeypatch.setattr(DataclassTransformer, "get_literal_type", lambda self, t: built.append(t) or original(self, t))
    monkeypatch.setattr(flyte_types.TRANSFORMER, "_literal_types", {})
    ctx = FlyteContextManager.current_context()
    spec = TrialSpec(3, '{"training.learning_rate": 0.002}', PipelineConfig(), "study-1")
    for t, value in ((PipelineConfig, PipelineConfig()), (SearchConfig, SearchConfig()), (TrialSpec, spec),
                     (TrialResult, TrialResult(1, "{}", 0.5))):
        assert TypeEngine.get_transformer(t) is flyte_types.TRANSFORMER
        ours = TypeEngine.to_literal_type(t)
        assert ours == plain.get_literal_type(t)
        literal = TypeEngine.to_literal(ctx, value, t, ours)
        assert TypeEngine.to_python_value(ctx, literal, t) == value
    built.clear()
    for _ in range(3):
        for t in (PipelineConfig, SearchConfig, TrialSpec, TrialResult):
            TypeEngine.to_literal_type(t)
    assert built == []  # answered from the memo: no schema rebuilt
