"""The working side of a run with a deadline: :class:`RunGuard`, the deadline and cancellation
checks a run's stages call, and the watchdog that ends a process whose run is stuck past its
deadline where no check is reached (native code, a stalled download). Used by a task worker's
runs and by the service's own flow runs (deployment runs, endpoint jobs); the waiting side is
:mod:`flows.dispatch`."""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Optional
from uuid import UUID

from flows.dispatch import GRACE
from speech.errors import Stopped

log = logging.getLogger("flows.runguard")
WATCHDOG_EXIT = 70  # the exit status of a process its watchdog ended


class RunGuard:
    """Inside a run (a task on a worker, a flow run of the service): :meth:`check` raises
    :class:`Stopped` once the run is past its deadline or was cancelled / failed from outside (read
    from the API at most every ``every`` seconds). Stages call it between steps and from their
    progress callbacks."""

    running: dict[str, float] = {}  # run id -> monotonic deadline, for the process's watchdog
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


_WATCHDOG: Optional[threading.Thread] = None
_WATCHDOG_LOCK = threading.Lock()


def start_watchdog(before_exit: Optional[Callable[[list[str]], None]] = None, interval: float = 5.0,
                   grace: float = GRACE) -> threading.Thread:
    """End this process when one of its runs is past its deadline by more than ``grace`` (stuck
    where no check is reached), so its slot and GPU come back; ``before_exit`` is told the stuck
    run ids first (given at most 10 s). One watchdog per process: a second call returns the first."""
    global _WATCHDOG

    def watch() -> None:
        while True:
            time.sleep(interval)
            stuck = RunGuard.overdue(grace)
            if not stuck:
                continue
            log.error("run(s) %s stuck past their deadline: exiting so the slot and the GPU come back",
                      ", ".join(stuck))
            if before_exit is not None:
                last = threading.Thread(target=before_exit, args=(stuck,), name="watchdog-last-words", daemon=True)
                last.start()
                last.join(10.0)
            logging.shutdown()
            os._exit(WATCHDOG_EXIT)

    with _WATCHDOG_LOCK:
        if _WATCHDOG is None or not _WATCHDOG.is_alive():
            _WATCHDOG = threading.Thread(target=watch, name="deadline-watchdog", daemon=True)
            _WATCHDOG.start()
        return _WATCHDOG


def flow_run_guard(flow_run_id: Any, seconds: float, label: str) -> RunGuard:
    """A guard on a flow run of the service (a deployment run, an endpoint's job): stopped past
    ``seconds`` or once its flow run is cancelled or ended from outside."""

    def read_state() -> Any:
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                return client.read_flow_run(UUID(str(flow_run_id))).state
        except Exception:  # noqa: BLE001 - an API hiccup must not stop the work
            return None

    return RunGuard(flow_run_id, seconds, label, read_state=read_state)


def fail_stuck_flow_runs(stuck: list[str]) -> None:
    """The watchdog's last words in a flow run's own process: each stuck flow run is set Failed
    with the reason, before the process ends (the worker then finds it final, not Crashed)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    for run_id in stuck:
        try:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(UUID(run_id), Failed(message=(
                    f"ran past its deadline (GPU_TASK_TIMEOUT) by more than {GRACE:.0f} s inside a stage that never "
                    f"returned (a stalled download or a hung model): its process {os.getpid()} was ended")),
                    force=True)
        except Exception:  # noqa: BLE001 - the process ends anyway; the heartbeat automation crashes the run
            log.warning("could not set the stuck flow run %s Failed", run_id, exc_info=True)
