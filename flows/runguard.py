"""The working side of a run with a deadline: :class:`RunGuard`, the deadline and cancellation
checks a run's stages call, the watchdog that ends a process whose run is stuck past its
deadline where no check is reached (native code, a stalled download), and the watch that ends a
deployment run whose worker died (:func:`end_with_starter`). Used by a task worker's runs and by
the service's own flow runs (deployment runs, endpoint jobs); the waiting side is
:mod:`flows.dispatch`."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional
from uuid import UUID

from flows.dispatch import GRACE
from speech.errors import Stopped

log = logging.getLogger("flows.runguard")
WATCHDOG_EXIT = 70  # the exit status of a process its watchdog ended
ORPHAN_EXIT = 71  # ... of a run's process that outlived its worker and did not end on SIGTERM


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


def _watchdog_grace() -> float:
    from speech.settings import get_settings

    return get_settings().watchdog_grace


_WATCHDOG: Optional[threading.Thread] = None
_WATCHDOG_LOCK = threading.Lock()


def start_watchdog(before_exit: Optional[Callable[[list[str]], None]] = None, interval: float = 5.0,
                   grace: Optional[float] = None) -> threading.Thread:
    """End this process when one of its runs is past its deadline by more than ``grace`` (default
    ``WATCHDOG_GRACE``: stuck where no check is reached), so its slot and GPU come back;
    ``before_exit`` is told the stuck run ids first (given at most 10 s). One watchdog per process:
    a second call returns the first."""
    global _WATCHDOG
    if grace is None:
        grace = _watchdog_grace()
    interval = min(interval, grace)

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
    """The watchdog's last words in a process of flow runs (a deployment run's own, the in-process
    endpoint, the RunPod handler): each stuck flow run is set Failed with the reason, before the
    process ends (its worker then finds it final, not Crashed), and the process's other guarded
    runs, which end with it, Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    with RunGuard._lock:
        others = [run for run in RunGuard.running if run not in stuck]
    if others:
        _set_crashed(others, f"its process {os.getpid()} was ended because another run in it was stuck past its "
                             "deadline inside a stage that never returned: run it again")
    message = (f"ran past its deadline (GPU_TASK_TIMEOUT) by more than {_watchdog_grace():.0f} s (WATCHDOG_GRACE) "
               "inside a stage that never returned (a stalled download or a hung model): its process "
               f"{os.getpid()} was ended")
    for run_id in stuck:
        try:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(UUID(run_id), Failed(message=message), force=True)
        except Exception:  # noqa: BLE001 - the process ends anyway; the heartbeat automation crashes the run
            log.warning("could not set the stuck flow run %s Failed", run_id, exc_info=True)


_STARTER_WATCH: Optional[threading.Thread] = None
_STOP_SIGNAL = getattr(signal, "SIGUSR2", None)  # how the watch stops the run's main thread (SIGTERM is Prefect's)


class StarterGone(BaseException):
    """Raised in a deployment run's main thread when the process that started it died: a
    BaseException, so no stage's error handling takes it for a failure of its own; Prefect sets the
    run Crashed and its stages unwind (temporary files removed, nothing half-written)."""


_GONE = ["the process that started this run ended"]  # why, as the watch found it


def _stop_main(signum: int, frame: Any) -> None:
    raise StarterGone(_GONE[0])


def end_with_starter(flow_run_id: Any, interval: float = 1.0, grace: float = 30.0) -> Optional[threading.Thread]:
    """In a deployment run's own process: when the process that started it (``serve.py``, a
    process worker) dies, however it dies (SIGKILL, the OOM killer), end the run rather than go on
    unseen: nothing would count it against the worker's limit when the worker is restarted (two
    models on one GPU), and no one is left to cancel or reap it. The run's main thread is stopped
    (:class:`StarterGone`: Prefect sets the run Crashed, its stages clean up, outputs are only ever
    written whole) and the state message then names the cause; a run that has not stopped within
    ``grace`` seconds is set Crashed and its process ends (:data:`ORPHAN_EXIT`). Call from the run's
    main thread. Not started where the parent is init or a container's runtime (pid 0 or 1: such
    a run ends with its container). One per process."""
    global _STARTER_WATCH
    parent = os.getppid()
    if parent <= 1 or (_STARTER_WATCH is not None and _STARTER_WATCH.is_alive()):
        return None
    main = threading.main_thread()
    if threading.current_thread() is main and _STOP_SIGNAL is not None:
        signal.signal(_STOP_SIGNAL, _stop_main)
    run_id = str(flow_run_id)

    def last_words(reason: str) -> None:
        end = time.monotonic() + grace
        while main.is_alive() and time.monotonic() < end:  # the run unwinds; Prefect sets it Crashed
            time.sleep(0.2)
        with RunGuard._lock:
            runs = [run_id, *RunGuard.running]
        _set_crashed(runs, reason)  # ... and the cause goes on its state
        if main.is_alive():
            _flush_api_logs()
            logging.shutdown()
            os._exit(ORPHAN_EXIT)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        reason = (f"the process that started this run (pid {parent}: serve.py or its worker) ended while the run was "
                  "working, so the run was stopped rather than left running outside any worker; outputs are only "
                  "written for finished files: run it again (a sweep triggers it again by itself)")
        _GONE[0] = reason  # the state Prefect sets names it too, until the cause replaces it
        # not a daemon: the interpreter waits for it once the run has unwound
        threading.Thread(target=last_words, args=(reason,), name="orphan-last-words", daemon=False).start()
        if _STOP_SIGNAL is not None and signal.getsignal(_STOP_SIGNAL) is _stop_main:
            signal.pthread_kill(main.ident, _STOP_SIGNAL)  # interrupts a blocking call of the main thread
        else:
            import _thread

            _thread.interrupt_main()
        try:  # last: the console may have been a pipe to the dead worker
            log.error("%s", reason)
        except Exception:  # noqa: BLE001
            pass

    _STARTER_WATCH = threading.Thread(target=watch, name="starter-watch", daemon=True)
    _STARTER_WATCH.start()
    return _STARTER_WATCH


def _flush_api_logs() -> None:
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception:  # noqa: BLE001 - logs only
        pass


def _set_crashed(run_ids: list[str], reason: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    for run_id in dict.fromkeys(run_ids):
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(UUID(run_id)).state
                if state is not None and state.is_final() and not state.is_crashed():
                    continue  # it finished (or failed) on its own before the stop reached it
                client.set_flow_run_state(UUID(run_id), Crashed(message=reason), force=True)
        except Exception:  # noqa: BLE001 - the heartbeat automation crashes the run in the end
            log.warning("could not set the flow run %s Crashed", run_id, exc_info=True)
