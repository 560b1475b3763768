"""The working side of a task worker's run: :class:`RunGuard`, the deadline and cancellation
checks a run's stages call (and the worker's watchdog reads), apart from the waiting side
(:mod:`flows.dispatch`)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional
from uuid import UUID

from flows.dispatch import GRACE
from speech.errors import Stopped


class RunGuard:
    """Inside a task on a worker: :meth:`check` raises :class:`Stopped` once the run is past its
    deadline or was cancelled / failed from outside (read from the API at most every
    ``every`` seconds). Stages call it between steps and from their progress callbacks."""

    running: dict[str, float] = {}  # task run id -> monotonic deadline, for the worker's watchdog
    _lock = threading.Lock()

    def __init__(self, task_run_id: Any, seconds: float, label: str, every: float = 2.0,
                 read_state: Optional[Callable[[], Any]] = None):
        self.task_run_id, self.label, self.every = str(task_run_id), label, every
        self.started = time.monotonic()
        self.seconds = seconds
        self.deadline = self.started + seconds
        self._read_state = read_state or self._api_state
        self._next_look = 0.0

    def __enter__(self) -> "RunGuard":
        with self._lock:
            RunGuard.running[self.task_run_id] = self.deadline
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            RunGuard.running.pop(self.task_run_id, None)

    def extend(self, seconds: float) -> None:
        """The run may take ``seconds`` from its start (its audio's length is known now)."""
        self.seconds, self.deadline = seconds, self.started + seconds
        with self._lock:
            if self.task_run_id in RunGuard.running:
                RunGuard.running[self.task_run_id] = self.deadline

    def check(self) -> None:
        now = time.monotonic()
        if now > self.deadline:
            raise Stopped(f"{self.label} ran past its {self.seconds:.0f} s deadline (GPU_TASK_TIMEOUT) and was stopped")
        if now < self._next_look:
            return
        self._next_look = now + self.every
        state = self._read_state()
        if state is not None and (state.is_final() or state.type.value == "CANCELLING"):
            raise Stopped(f"{self.label} was stopped: its run is {state.name}" +
                          (f" ({state.message})" if state.message else ""))

    def _api_state(self) -> Any:
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                return client.read_task_run(UUID(self.task_run_id)).state
        except Exception:  # noqa: BLE001 - an API hiccup must not stop the work
            return None

    @classmethod
    def overdue(cls, grace: float = GRACE) -> list[str]:
        """Runs of this process past their deadline by more than ``grace`` (stuck where no
        checkpoint is reached: the watchdog ends the process)."""
        now = time.monotonic()
        with cls._lock:
            return [run for run, deadline in cls.running.items() if now > deadline + grace]
