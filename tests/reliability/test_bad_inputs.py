"""R4: bad inputs through the CLI (DVC stages' entry point) and the Python API."""

from __future__ import annotations

from tests.reliability import bad_inputs


def test_r4_cli_bad_inputs():
    results = bad_inputs.cli_trials()
    assert len(results) >= 20
    failed = [r for r in results if not r[1]]
    assert not failed, failed


def test_r4_api_bad_inputs():
    results = bad_inputs.api_trials()
    failed = [r for r in results if not r[1]]
    assert not failed, failed
