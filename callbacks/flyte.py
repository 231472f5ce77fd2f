"""Flyte: keep the newest checkpoint in the task's Flyte checkpoint (a retried attempt resumes from it) and render
the log history as a deck (charts and table from callbacks.flyte_deck; no external scripts: decks open offline).

flytekit is imported only when a callback is created or a helper is called, never by ``import callbacks.flyte``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from trainer_lib import checkpoint as ckpt

from ._common import TrackerCallback
from .flyte_deck import chart_series, log_history_html, log_history_table, svg_line_chart  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)


# -- the Flyte checkpoint --------------------------------------------------------------------------------------
class NotInFlyteTask(RuntimeError):
    """FlyteCallback was created outside a running Flyte task."""


def current_flyte_checkpoint():
    """The running Flyte task's checkpoint, or None when no task is running in this process."""
    from flytekit.core.context_manager import FlyteContextManager

    state = FlyteContextManager.current_context().execution_state
    # Outside a task flytekit still hands out a default context, but it has no mode and no checkpoint; every way of
    # running a task (pyflyte run, pyflyte-execute, an elastic worker) gives the task's context a checkpoint.
    if state is None or state.mode is None or state.user_space_params is None:
        return None
    try:
        return state.user_space_params.checkpoint
    except NotImplementedError:
        return None


def _link_tree(source: str, target: str) -> None:
    """Mirror ``source`` into ``target`` with hard links (copies where linking is refused)."""
    os.makedirs(target)
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(src):
            _link_tree(src, dst)
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def save_to_flyte(folder: str, checkpoint) -> None:
    """Upload checkpoint ``folder`` as ``<flyte checkpoint>/checkpoint-<step>/``, then remove older ones there.

    A new folder never overwrites the previous one, so an upload cut short leaves the previous checkpoint intact
    (restore validates each folder's manifest and takes the newest complete one).
    """
    name = os.path.basename(os.path.normpath(folder))
    with tempfile.TemporaryDirectory(prefix="flytrain-sync-") as stage:
        _link_tree(folder, os.path.join(stage, name))
        checkpoint.save(stage)
    _remove_older(checkpoint, keep=name)


def _remove_older(checkpoint, keep: str) -> None:
    destination = getattr(checkpoint, "_checkpoint_dest", None)  # SyncCheckpoint's upload location
    if not destination:
        return
    from flytekit.core.context_manager import FlyteContextManager

    try:
        fs = FlyteContextManager.current_context().file_access.get_filesystem_for_path(str(destination))
        for entry in fs.ls(str(destination), detail=False):
            name = os.path.basename(str(entry).rstrip("/"))
            if ckpt.checkpoint_step(name) is not None and name != keep:
                fs.rm(entry, recursive=True)
    except Exception as error:  # only costs storage: the newest checkpoint is already uploaded
        logger.warning("Flyte: could not remove older checkpoints from %s: %s", destination, error)


def restore_from_flyte(checkpoint, local_dir: str) -> str | None:
    """Download the previous attempt's Flyte checkpoint into ``local_dir``; the newest complete checkpoint in it."""
    if checkpoint is None or not checkpoint.prev_exists():
        return None
    from flytekit.exceptions.user import FlyteDataNotFoundException

    os.makedirs(local_dir, exist_ok=True)
    try:
        restored = checkpoint.restore(local_dir)
    except FlyteDataNotFoundException:  # the previous attempt stopped before its first checkpoint
        return None
    if restored is None:
        return None
    restored = str(restored)
    if ckpt.checkpoint_step(restored) is None and os.path.isfile(os.path.join(restored, ckpt.MANIFEST)):
        return restored  # a checkpoint folder saved flat (checkpoint.save(folder) by other code)
    return ckpt.latest_valid_checkpoint(restored)


# -- the callback ----------------------------------------------------------------------------------------------
class FlyteCallback(TrackerCallback):
    """Syncs each new checkpoint to the Flyte checkpoint and adds a "Log History" deck when training ends.

    Create it inside a running Flyte task (``report_to=["flyte"]`` in a task's training arguments); give the task
    ``enable_deck=True`` to see the deck.
    """

    integration_name = "flyte"
    required_modules = ("flytekit",)
    pip_extra = "flyte"

    def __init__(self, save_log_history: bool = True, sync_checkpoints: bool = True) -> None:
        super().__init__()
        self.checkpoint = current_flyte_checkpoint()
        if self.checkpoint is None:
            raise NotInFlyteTask(
                "FlyteCallback needs a running Flyte task (a @task function executed by pyflyte run, "
                "pyflyte-execute or a cluster): no Flyte task context with a checkpoint was found. "
                "Remove 'flyte' from report_to when training outside Flyte."
            )
        self.save_log_history = save_log_history
        self.sync_checkpoints = sync_checkpoints
        self._synced: str | None = None

    def _open(self, args, state, model) -> None:
        """Nothing to open: the checkpoint handle comes from the task context."""

    def on_save(self, args, state, control, checkpoint_folder: str | None = None, **kwargs):
        if not self.sync_checkpoints or not self._ensure_setup(args, state, kwargs.get("model")):
            return
        if not checkpoint_folder or checkpoint_folder == self._synced:
            return
        save_to_flyte(checkpoint_folder, self.checkpoint)
        self._synced = checkpoint_folder

    def on_train_end(self, args, state, control, **kwargs):
        if not self.save_log_history or not self._ensure_setup(args, state, kwargs.get("model")):
            return
        from flytekit import Deck

        Deck("Log History", log_history_html(state.log_history))
