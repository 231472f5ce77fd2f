"""R4: bad inputs through the CLI (DVC stages' entry point) and the Python API; runtime errors of the CLI."""

from __future__ import annotations

from tests.reliability import bad_inputs


def test_r4_cli_bad_inputs():
    results = bad_inputs.cli_trials()
    assert len(results) >= 30
    failed = [r for r in results if not r[1]]
    assert not failed, failed


def test_r4_api_bad_inputs():
    results = bad_inputs.api_trials()
    failed = [r for r in results if not r[1]]
    assert not failed, failed


def test_a_yaml_alias_bomb_is_refused_at_once_with_one_line():
    case, held, detail = bad_inputs.alias_bomb_trial()
    assert held, detail


def test_runtime_errors_of_the_cli_are_one_line_naming_the_path_with_exit_status_1():
    results = bad_inputs.runtime_error_trials()
    # the ENOTDIR and debug cases always run; EROFS and ENOSPC wherever mount is permitted (root here)
    assert [case for case, _, _ in results][:2] == [
        "output folder under a regular file (ENOTDIR), real process", "FLYTRAIN_DEBUG=1 adds the traceback"]
    if bad_inputs._unprivileged() is not None:  # root with setpriv/runuser, or not root: always on this machine
        assert "unwritable output folder as a non-root user (EACCES), real process" in [c for c, _, _ in results]
    failed = [r for r in results if not r[1]]
    assert not failed, failed
