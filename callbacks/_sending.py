"""How a tracker's calls are bounded: a failure budget (FLYTRAIN_TRACKER_TIMEOUT) and one daemon sender thread."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class FailureBudget:
    """The seconds a failing tracker backend may hold this process up in total (``FLYTRAIN_TRACKER_TIMEOUT``).

    Calls the training thread waits on run through ``call``: in a daemon thread, waited for at most what is left
    of the budget; a call that fails or does not return in time spends what it took. Once spent, every further
    call is refused at once, and nothing waits for an abandoned call at exit (a daemon thread is not joined).
    """

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what, self.spent = seconds, what, 0.0
        self._lock = threading.Lock()

    @property
    def left(self) -> float:
        return max(0.0, self.seconds - self.spent)

    @property
    def exhausted(self) -> bool:
        """Spent: failures took the whole budget (with 0 seconds: once anything failed)."""
        return self.spent > 0 and self.spent >= self.seconds

    @property
    def wait_limit(self) -> float | None:
        """How long a wait may last now; None with a budget of 0 ("give up at the first failure"), where only the
        client's own request timeouts bound a call."""
        return self.left if self.seconds > 0 else None

    def spend(self, seconds: float) -> None:
        with self._lock:
            self.spent += seconds

    def exhausted_error(self, cause: str) -> RuntimeError:
        return RuntimeError(
            f"{self.what} keeps failing ({cause}); {self.spent:.1f}s spent waiting on it reached "
            f"FLYTRAIN_TRACKER_TIMEOUT={self.seconds:g}s"
        )

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` bounded by the budget; raises its error, or TimeoutError when it did not return."""
        if self.exhausted:
            raise self.exhausted_error(f"{what} not attempted")
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            try:
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as error:  # handed to the waiting thread
                outcome["error"] = error
            done.set()

        start = time.monotonic()
        threading.Thread(target=target, name=f"flytrain-{what}", daemon=True).start()
        if not done.wait(self.wait_limit):
            self.spend(self.left)
            raise TimeoutError(f"{self.what}: {what} did not answer within FLYTRAIN_TRACKER_TIMEOUT={self.seconds:g}s")
        if "error" in outcome:
            self.spend(max(time.monotonic() - start, 1e-6))
            raise outcome["error"]
        return outcome.get("value")


class Sender:
    """One daemon thread that runs a tracker's sends in order, so training never waits for the network."""

    def __init__(self, name: str, on_error: Callable[[str, BaseException, float], None]) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name=f"flytrain-{name}-sender", daemon=True)
        self._thread.start()

    def submit(self, what: str, fn: Callable[[], Any]) -> None:
        self._queue.put((what, fn))

    def _run(self) -> None:
        while True:
            what, fn = self._queue.get()
            start = time.monotonic()
            try:
                fn()
            except BaseException as error:  # reported to the tracker's budget, never kills the thread
                self._on_error(what, error, time.monotonic() - start)
            finally:
                self._queue.task_done()

    def wait(self, seconds: float | None) -> bool:
        """Wait up to ``seconds`` (None: as long as it takes) for every submitted send; whether all finished."""
        deadline = None if seconds is None else time.monotonic() + seconds
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True
