"""R1 (kill -9 at random moments), R2 (damaged checkpoints), R5 (malicious pickles) on the plain Trainer."""

from __future__ import annotations

import pytest

from tests.reliability import checks


def _assert_all_held(results):
    failed = [(case, detail) for case, held, detail in results if not held]
    assert not failed, failed


def test_r1_kill_nine_sample():
    # one chain through the phases that matter most; the full >= 10-moment figure runs in the report script
    results = checks.kill_nine_trials(3, seed=1)
    assert len(results) == 3
    _assert_all_held(results)


@pytest.mark.slow
def test_r1_kill_nine_every_phase_sync_and_async():
    _assert_all_held(checks.kill_nine_trials(len(checks.PHASES), seed=2))
    _assert_all_held(checks.kill_nine_trials(len(checks.PHASES), seed=3, mode="async"))


def test_r2_damaged_checkpoints():
    results = checks.damaged_checkpoint_trials()
    assert len(results) >= 4
    _assert_all_held(results)


def test_r5_malicious_pickles_never_run():
    results = checks.malicious_pickle_trials()
    assert len(results) == 3
    _assert_all_held(results)
