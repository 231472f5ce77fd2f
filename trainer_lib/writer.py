"""Background checkpoint writing: reusable staging buffers and the writer thread (at most one write in flight)."""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from .checkpoint import CheckpointPayload, write_checkpoint


class StagingArea:
    """Reusable CPU buffers that a background write reads while training goes on.

    Copying into memory that is already mapped avoids fresh allocations, whose page faults cost hundreds of ms
    per checkpoint for a large model. The caller must wait for the previous write before copying again.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def snapshot(self, obj: Any, path: tuple = ()) -> Any:
        if isinstance(obj, torch.Tensor):
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
                buffer = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=obj.is_cuda)
                self._buffers[path] = buffer
            buffer.copy_(obj.detach(), non_blocking=obj.is_cuda)
            return buffer
        if isinstance(obj, dict):
            return {k: self.snapshot(v, path + (k,)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.snapshot(v, path + (i,)) for i, v in enumerate(obj))
        return obj


def _yield_to_training() -> None:
    """Lower this thread's CPU priority (Linux: per thread), so that the writer's work (mostly the CRC) runs in the
    gaps of training rather than preempting its threads; the training thread waiting for the write lets it run."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not permitted: normal priority
        pass


class CheckpointWriter:
    """Writes checkpoints synchronously, or in a background thread with at most one write in flight."""

    def __init__(self, asynchronous: bool = False):
        self.asynchronous = asynchronous
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done = None

    def submit(self, payload: CheckpointPayload, output_dir: str, on_done) -> None:
        self.wait()
        if not self.asynchronous:
            on_done(write_checkpoint(payload, output_dir))
            return

        def run() -> None:
            _yield_to_training()
            try:
                folder = write_checkpoint(payload, output_dir)
            except BaseException as error:  # surfaced in the training thread by wait(): at the next save or the end
                if hasattr(error, "add_note"):  # Python >= 3.11
                    error.add_note(f"while writing checkpoint-{payload.step} in the background to {output_dir}")
                self._error = error
                return
            self._done = (on_done, folder)

        self._done = None
        self._thread = threading.Thread(target=run, name="flytrain-checkpoint-writer", daemon=False)
        self._thread.start()

    def poll(self) -> None:
        """Finish a background write that has completed (runs its completion here); never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Block until the write in flight (if any) is complete, then run its completion in this thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._done is not None:
                on_done, folder = self._done
                self._done = None
                on_done(folder)
