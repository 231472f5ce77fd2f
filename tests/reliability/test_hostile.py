"""Hostile checkpoints and faults (tests/reliability/hostile.py): every case must hold."""

from __future__ import annotations

from tests.reliability import hostile


def _assert_all_held(results, at_least: int):
    assert len(results) >= at_least
    failed = [(case, detail) for case, held, detail in results if not held]
    assert not failed, failed


def test_tampered_checkpoint_content_is_refused_naming_file_and_field_and_resume_true_falls_back():
    # every case refused by path; the fallback to the older checkpoint for one case per file
    one_per_file = list({name: case for case in hostile.TAMPERED for name in [case[1]]}.values())
    _assert_all_held(hostile.tampered_content_trials(fallback=False), len(hostile.TAMPERED))
    _assert_all_held(hostile.tampered_content_trials(fallback=True, cases=one_per_file), 7)


def test_callback_state_injection_sets_no_undeclared_attribute_and_writes_nothing_outside_output_dir():
    _assert_all_held(hostile.injection_trials(), 5)


def test_tracker_run_ids_declared_as_state_survive_save_and_restore():
    _assert_all_held(hostile.tracker_state_round_trip(), 4)


def test_non_finite_loss_or_grad_norm_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint():
    _assert_all_held(hostile.nonfinite_trials(), 18)


def test_tied_weights_checkpoint_resume_bit_exactly_and_save_in_sync_and_async_modes():
    _assert_all_held(hostile.tied_weights_trials(), 4)


def test_background_write_errors_surface_and_live_writers_folders_are_never_removed():
    _assert_all_held(hostile.async_error_trials(), 6)


def test_a_checkpoint_beyond_this_runs_step_budget_is_refused_naming_global_step(tmp_path):
    import pytest

    from trainer_lib import CheckpointError

    hostile.small_trainer(str(tmp_path / "src")).train()  # checkpoint-8 of a run of 8 steps
    shorter = hostile.small_trainer(str(tmp_path / "short"), max_steps=6)
    with pytest.raises(CheckpointError, match=r"trainer_state.json: global_step must be an integer in \[0, 6\], got 8"):
        shorter.train(resume_from_checkpoint=str(tmp_path / "src" / "checkpoint-8"))


def test_on_an_accelerator_a_non_finite_grad_norm_is_flagged_without_a_sync_and_stops_at_the_next_check():
    import pytest
    import torch

    from trainer_lib import NonFiniteLossError
    from trainer_lib.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(torch.device("cuda"), skip=False)  # the accelerator path, run here on CPU tensors
    guard.reset(2)
    for step, norm in ((3, 1.0), (4, float("inf")), (5, 2.0)):
        guard.grad_norm(torch.tensor(norm), step)  # never raises: raising would need the value on the host
    with pytest.raises(NonFiniteLossError, match=r"^training stopped at step 6: a gradient norm is not finite "
                                                 r"\(it was finite at step 2\)"):
        guard.check(0.5, 6)
    guard.reset(6)
    guard.grad_norm(torch.tensor(1.0), 7)
    guard.check(0.5, 8)  # finite again: no error
