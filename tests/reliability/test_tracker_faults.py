"""R3 (a tracker fails mid-run), R6 (a canary secret leaks nowhere), R7 (concurrent runs on one MLflow server)."""

from __future__ import annotations

import pytest

from tests.reliability import canary, trackers_faults


def _assert_all_held(results):
    failed = [(case, detail) for case, held, detail in results if not held]
    assert not failed, failed


@pytest.mark.timeout(180)
def test_r3_outages_leave_training_and_other_trackers_whole(mlflow_server_factory):
    results = trackers_faults.tracker_outage_trials(mlflow_server_factory)
    assert [case for case, _, _ in results] == [
        "mlflow server SIGKILLed at step 6 of 12", "mlflow URI at a dead port from the start",
        "registered integration raising on every event"]
    _assert_all_held(results)


@pytest.mark.timeout(300)
def test_r6_canary_secret_appears_in_no_file_or_output(mlflow_server):
    results = canary.canary_trials(mlflow_server)
    assert len(results) == 8, results  # six file groups, MLflow's store, the output
    _assert_all_held(results)


@pytest.mark.timeout(300)
def test_report_to_all_runs_every_installed_tracker(mlflow_server):
    # azure_ml is not installed here, flyte needs a running task, dagshub a DagsHub repository
    results = canary.canary_trials(mlflow_server, report_to_all=True)
    assert any(case.startswith('report_to="all"') for case, _, _ in results)
    _assert_all_held(results)


@pytest.mark.timeout(300)
def test_r7_four_concurrent_trainings_on_one_mlflow_server(mlflow_server):
    results = trackers_faults.concurrent_mlflow_trials(mlflow_server, processes=4, steps=20)
    assert len(results) == 4
    _assert_all_held(results)

