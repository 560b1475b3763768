"""Callers take turns on a work pool: the endpoint's ``--deployment`` mode with several callers.

A work pool's workers take scheduled runs first come, first served: one caller's 500 queued jobs
would hold up another caller's one job for as long as the 500 take. So with several callers the
endpoint makes each job's flow run **held**: ``Scheduled`` under the name ``AwaitingTurn``,
``HOLD_S`` in the future, where no worker takes it. A releaser keeps ``ahead`` released runs
waiting for the workers (``Scheduled`` now), releasing each time the next held run of the caller
served longest ago, as the in-process mode's own queue does; everything else about a job (its
id, status, cancel, purge, the queue shares) stays as it was.

Nothing lives only here: held runs are rows in the Prefect database, a restarted endpoint goes on
releasing them, and were no endpoint ever to come back, a held run still starts when its hold
ends (``HOLD_S`` after it was sent: the pool's own order again). A release never brings back a
job cancelled in the meantime: cancel, purge and release hold one lock in this process, and a
release that finds (across endpoint replicas) that another state came between puts it back.
"""
from __future__ import annotations

import contextvars
import datetime as dt
import logging
import threading
from collections import OrderedDict
from typing import Any, Iterable, Optional

from deployments.callers import tag

log = logging.getLogger(__name__)

HELD = "AwaitingTurn"  # the state name of a held run (type SCHEDULED)
HOLD_S = 6 * 3600  # a held run starts at the latest this long after it was sent (no endpoint left to release it)
AHEAD = 2  # released runs waiting for the workers (--turns-ahead)
INTERVAL_S = 1.0  # between looks at the pool


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Turns:
    """Held runs of ``deployment`` from ``callers`` (their runs carry ``tags`` and
    ``runpod-caller:<name>``), released in turn so that ``ahead`` of them wait for the workers."""

    def __init__(self, deployment: str, callers: Iterable[str], tags: list[str], ahead: int = AHEAD,
                 hold: float = HOLD_S, interval: float = INTERVAL_S):
        if ahead < 1:
            raise ValueError("ahead must be at least 1")
        self.deployment, self.callers, self.tags = deployment, list(callers), list(tags)
        self.ahead, self.hold, self.interval = ahead, hold, interval
        self._deployment_id: Any = None
        self.served: "OrderedDict[str, None]" = OrderedDict()  # callers, the one served longest ago first
        self.lock = threading.RLock()  # release, cancel and purge one at a time in this process
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def deployment_id(self, client: Any) -> Any:
        """The deployment's id (read once)."""
        from prefect.exceptions import ObjectNotFound

        if self._deployment_id is None:
            try:
                self._deployment_id = client.read_deployment_by_name(self.deployment).id
            except ObjectNotFound:
                raise LookupError(f"no deployment {self.deployment} on this Prefect API") from None
        return self._deployment_id

    def held_state(self) -> Any:
        """The state a new job's flow run is created in: Scheduled, ``hold`` from now, named ``AwaitingTurn``."""
        from prefect.states import Scheduled

        return Scheduled(scheduled_time=_now() + dt.timedelta(seconds=self.hold), name=HELD,
                         message="waiting for its caller's turn on the work pool (the endpoint releases it)")

    def start(self) -> None:
        """Release in the background every ``interval`` seconds (the endpoint starts it, so held
        runs an earlier endpoint left are released; the Prefect settings of this context come along)."""
        with self.lock:
            if self._thread is not None:
                return
            context = contextvars.copy_context()
            self._thread = threading.Thread(target=context.run, args=(self._loop,), name="turns", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """No more background releases (held runs stay held: a new endpoint releases them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        said = ""
        while not self._stop.wait(self.interval):
            said = self.release_soon(said)

    def _filter(self, client: Any, caller: Optional[str], held: bool) -> Any:
        """This deployment's scheduled runs of ours (``caller``'s, when given), held or released."""
        from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterState,
                                                    FlowRunFilterStateName, FlowRunFilterStateType, FlowRunFilterTags)

        name = FlowRunFilterStateName(any_=[HELD]) if held else FlowRunFilterStateName(not_any_=[HELD])
        tags = self.tags + ([tag(caller)] if caller else [])
        return FlowRunFilter(tags=FlowRunFilterTags(all_=tags),
                             deployment_id=FlowRunFilterDeploymentId(any_=[self.deployment_id(client)]),
                             state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]), name=name))

    def release_soon(self, said: str = "") -> str:
        """:meth:`release`, never raising: a job just sent exists whatever happens here, and the
        background releaser tries again within ``interval`` (the API away for a moment). A failure
        is a warning, unless it is ``said`` (the last one: once per cause, not every second);
        returns what it said ("" for none)."""
        try:
            self.release()
            return ""
        except Exception as exc:  # noqa: BLE001 - see above
            if str(exc) != said:
                log.warning("releasing held runs of %s: %s: %s", self.deployment, type(exc).__name__, exc)
            return str(exc)

    def release(self) -> list[Any]:
        """Release held runs, in turn across callers, until ``ahead`` released ones wait for a
        worker: the ids released."""
        from prefect.client.orchestration import get_client

        released: list[Any] = []
        with self.lock, get_client(sync_client=True) as client:
            waiting = client.count_flow_runs(flow_run_filter=self._filter(client, None, held=False))
            while waiting < self.ahead:
                run = self._next(client)
                if run is None:
                    break
                if self._release(client, run):
                    released.append(run.id)
                    waiting += 1
        return released

    def _next(self, client: Any) -> Any:
        """The oldest held run of the caller whose turn it is: one not served yet, else the one
        served longest ago; that caller goes to the back of the line. None: nothing is held."""
        from prefect.client.schemas.sorting import FlowRunSort

        order = [c for c in self.callers if c not in self.served] + [c for c in self.served if c in self.callers]
        for caller in order:
            runs = client.read_flow_runs(flow_run_filter=self._filter(client, caller, held=True),
                                         sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
            if runs:
                self.served[caller] = None
                self.served.move_to_end(caller)
                return runs[0]
        return None

    def _release(self, client: Any, run: Any) -> bool:
        """Schedule a held run for now. Prefect accepts Scheduled after any state, so when the
        state before ours turns out not to be the hold (cancelled by another endpoint replica in
        the meantime), that state is put back."""
        from prefect.states import Scheduled

        client.set_flow_run_state(run.id, Scheduled(scheduled_time=_now(), message="its caller's turn"))
        states = sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp)
        before = states[-2] if len(states) >= 2 else None
        if before is not None and before.id != run.state.id:
            client.set_flow_run_state(run.id, before.model_copy(update={"id": None}), force=True)
            return False
        return True
