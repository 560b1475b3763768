"""Work handed to warm task workers, with a deadline at every wait.

Prefect's background tasks (``task.delay()``) queue on the server until a task worker
(``deployments/task_worker.py``) takes them; nothing in Prefect notices a queue no worker
serves, a worker killed mid-run (its task run stays Running for ever) or a run that never
ends. :class:`Watch` does, for whoever waits on the work (a flow run, the RunPod-compatible
endpoint, a sweep), from Prefect's own records:

* **no worker** - Prefect's task-worker registry (``/task_workers/filter``, the workers
  connected now, by task key) has held no worker for the task for ``GPU_TASK_PICKUP_TIMEOUT``
  seconds: the run fails, saying so. (A queue behind busy workers waits as long as it takes.)
* **a dead worker** - each worker leaves a claim (``claims/<task run id>`` in the shared result
  storage: its Prefect client id), rewritten every :data:`CLAIM_BEAT` seconds while it runs;
  when that worker leaves the registry (SIGKILL, OOM, a lost node: the server notices its
  websocket close within seconds) and its claim stops beating (:data:`BEAT_STALE`) the run
  is scheduled again, the same task run with the same stored parameters, for another worker
  (a worker that still beats was only cut off from the registry, by a server restart or a
  dropped socket, and is waited for); after ``GPU_TASK_RETRIES`` such losses it fails. Stage results finished before the loss are
  cache hits for the next attempt.
* **too long** - a run Running for longer than its deadline (``GPU_TASK_TIMEOUT``, by default
  scaled to the audio) is failed; the worker stops it at its next checkpoint
  (:class:`flows.runguard.RunGuard`) or, stuck in native code, exits (its watchdog).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
import uuid
from uuid import UUID

from speech.errors import Stopped, WorkerUnavailable
from speech.settings import Settings, get_settings

log = logging.getLogger(__name__)

CLAIMS = "claims"
UNIT_TAG = "unit:"  # one per delayed run; its nested stage runs carry it too
WORKER_TAG = "task-worker"  # every delayed run (and its stage runs): a busy pool has some Running
IDLE_GRACE = 30.0  # seconds an idle pool may leave a run it should take queued, past the pickup timeout
LOST_AFTER = 4.0  # seconds a claiming worker must be missing from the registry to count as gone...
CLAIM_BEAT = 5.0  # seconds between a worker's rewrites of the claims it holds (their "beat")
BEAT_STALE = 3 * CLAIM_BEAT  # ...and, where its claims beat, this long without a new beat
POLL, POLL_MAX = 0.25, 2.0  # seconds between reads of a waited-for run's state: 0.25 s, growing 0.05 s per s waited
CHECK_EVERY = 2.0  # seconds between Watch checks of a waited-for run (the registry, its claim)
GRACE = 60.0  # beyond its deadline, a run the worker has not stopped itself is failed from outside


def run_deadline(audio_seconds: float, settings: Optional[Settings] = None) -> float:
    """Seconds one file's GPU task may run: ``GPU_TASK_TIMEOUT``, else 300 s + 2 s per second of
    audio (a CPU worker's transcription, alignment and diarization with room to spare)."""
    settings = settings or get_settings()
    return settings.gpu_task_timeout or 300.0 + 2.0 * max(0.0, audio_seconds)


# --- claims: which worker holds a run ------------------------------------------------------


def claim_path(task_run_id: Any) -> str:
    return f"{CLAIMS}/{task_run_id}"


def write_claim(storage: Any, task_run_id: Any, worker: str, at: Optional[float] = None) -> None:
    """``worker`` holds the run since ``at`` (default now); ``beat``: when this was written (the
    worker rewrites it while it runs, so a waiter can tell a live worker that is only missing from
    the registry, after a server restart or a dropped socket, from a dead one)."""
    now = time.time()
    storage.write_path(claim_path(task_run_id), json.dumps({"worker": worker, "at": at or now, "beat": now}).encode())


def read_claim(storage: Any, task_run_id: Any) -> Optional[dict[str, Any]]:
    from tasks.storage import read_if_there

    raw = read_if_there(storage, claim_path(task_run_id))
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def drop_claim(storage: Any, task_run_id: Any) -> None:
    from tasks.storage import remove_path

    remove_path(storage, claim_path(task_run_id))


def serving_workers(client: Any, task_key: str) -> set[str]:
    """Client ids of the task workers connected now that serve ``task_key`` (Prefect's registry)."""
    reply = client.request("POST", "/task_workers/filter", json={"task_worker_filter": {"task_keys": [task_key]}})
    reply.raise_for_status()
    return {w["identifier"] for w in reply.json()}


# --- the waiting side ---------------------------------------------------------------------


@dataclass
class Watch:
    """What is known about one task run handed to workers; :meth:`check` acts on it."""

    task_run_id: UUID
    task_key: str
    label: str  # what the work is, for messages: "gpu-stages of call.wav"
    deadline: float  # seconds it may run
    storage: Any  # where claims are
    settings: Settings = field(default_factory=get_settings)
    created: float = field(default_factory=time.monotonic)
    served_at: float = field(default_factory=time.monotonic)  # last time a worker served the task
    idle_since: Optional[float] = None  # workers connected, none busy, this run still queued
    missing_since: Optional[float] = None
    beat: Any = None  # the claim's beat when its worker went missing from the registry
    claim: Optional[dict[str, Any]] = None
    next_claim_look: float = 0.0
    notes: list[str] = field(default_factory=list)  # what was done, for the caller's log
    ended: Optional[str] = None  # why this watch ended the run, if it did

    def check(self, client: Any, task_run: Any, workers: Optional[set[str]] = None,
              busy: Optional[Callable[[], bool]] = None) -> None:
        """One look at a run that is not final: fail it (no worker, an idle pool that does not take
        it, out of time), or schedule it again (its worker is gone). ``workers``: the registry,
        when the caller read it already; ``busy``: whether any worker is running something."""
        state = task_run.state
        now = time.monotonic()
        if workers is None:
            workers = serving_workers(client, self.task_key)
        if workers:
            self.served_at = now
        kind = state.type.value if state is not None else "SCHEDULED"
        # a worker claims a run as it takes it and starts it at once: a run still Scheduled a while
        # after a claim was its worker's last act (looked for every 10 s: a long queue, few reads)
        if kind != "SCHEDULED" and self.claim is None:
            self.claim = read_claim(self.storage, self.task_run_id)
        elif kind == "SCHEDULED" and state is not None and _age(state.timestamp) > 20 and now >= self.next_claim_look:
            self.claim, self.next_claim_look = read_claim(self.storage, self.task_run_id), now + 10
        if self.claim is None:  # queued: no worker has taken it
            if kind == "SCHEDULED":
                self._queued(client, workers, now, busy)
            elif state is not None and _age(state.timestamp) > self.deadline + GRACE:
                # taken but its claim could not be written or read (a storage fault): a worker lost
                # now would go unseen, so its deadline is the backstop
                self._end(client, "Failed", f"{self.label} has been {kind.lower()} without a claim for more than its "
                          f"{self.deadline:.0f} s deadline (GPU_TASK_TIMEOUT; its worker could not record it in "
                          "the shared storage) and was stopped", task_run)
            return
        if self.claim["worker"] not in workers:
            self._missing(client, task_run, now)
            return
        self.missing_since = None
        if kind == "RUNNING" and _age(state.timestamp) > self.deadline + GRACE:
            self._end(client, "Failed", f"{self.label} ran past its {self.deadline:.0f} s deadline "
                      "(GPU_TASK_TIMEOUT) and was stopped", task_run)
        elif kind != "RUNNING" and time.time() - float(self.claim.get("at", time.time())) > self.deadline + GRACE:
            self._end(client, "Failed", f"{self.label} was taken by task worker {self.claim['worker']} but not "
                      f"run within its {self.deadline:.0f} s deadline (GPU_TASK_TIMEOUT); stopped")

    def _missing(self, client: Any, task_run: Any, now: float) -> None:
        """The claiming worker is not in the registry: gone once it has been missing for
        :data:`LOST_AFTER` and its claim has not beaten for :data:`BEAT_STALE` (a claim without a
        beat, or none: at once). A worker that still beats is only disconnected (a restarted
        server, a dropped socket; a busy worker reconnects when a slot frees): it is waited for.
        Beats are compared with each other, never with this machine's clock."""
        if self.missing_since is None:
            self.missing_since, self.beat = now, (read_claim(self.storage, self.task_run_id) or {}).get("beat")
            return
        if now - self.missing_since < LOST_AFTER:
            return
        fresh = read_claim(self.storage, self.task_run_id)
        beat = (fresh or {}).get("beat")
        if beat is not None and beat != self.beat:  # alive: look again later
            self.claim, self.missing_since, self.beat = fresh, now, beat
        elif beat is None or now - self.missing_since >= BEAT_STALE:
            self._lost(client, task_run)

    def _queued(self, client: Any, workers: set[str], now: float, busy: Optional[Callable[[], bool]]) -> None:
        """A run no worker has taken: fail it when no worker serves the task, or when workers are
        connected but the pool sits idle without taking it (a stuck or mismatched worker), each for
        ``GPU_TASK_PICKUP_TIMEOUT``. A queue behind busy workers waits."""
        timeout = self.settings.gpu_task_pickup_timeout
        if not workers:
            self.idle_since = None
            if now - self.served_at >= timeout:
                self._end(client, "Failed", f"no task worker serves {self.label}: none took it within "
                          f"{timeout:.0f} s (GPU_TASK_PICKUP_TIMEOUT). Start `python -m deployments.task_worker` "
                          "against this Prefect API, with the same code version and RESULTS_STORAGE "
                          f"(task key {self.task_key})")
            return
        if now - self.created < timeout:
            return
        if busy() if busy is not None else pool_busy(client):
            self.idle_since = None
            return
        self.idle_since = self.idle_since or now
        if now - self.idle_since >= IDLE_GRACE:
            self._end(client, "Failed", f"{len(workers)} task worker(s) serving {self.label} are connected but "
                      f"none took it within {timeout:.0f} s while none was busy (GPU_TASK_PICKUP_TIMEOUT): "
                      f"see the task workers' logs (task key {self.task_key})")

    def _lost(self, client: Any, task_run: Any) -> None:
        worker, attempts = self.claim["worker"], max(1, task_run.run_count)
        self.claim, self.missing_since, self.beat = None, None, None
        current = client.read_task_run(task_run.id).state  # a worker that finished it, then left, lost nothing
        if current is not None and current.is_final():
            return
        drop_claim(self.storage, self.task_run_id)
        crash_stages(client, task_run, f"its task worker {worker} stopped while running it")
        if attempts > self.settings.gpu_task_retries:
            self._end(client, "Crashed", f"{self.label}: its task worker {worker} stopped (killed, crashed or lost) "
                      f"while running it, {attempts} time(s) (GPU_TASK_RETRIES={self.settings.gpu_task_retries})")
            return
        reschedule(client, task_run, f"task worker {worker} stopped while running it: scheduled again "
                   f"(attempt {attempts + 1} of {self.settings.gpu_task_retries + 1})")
        self.notes.append(f"{self.label}: task worker {worker} stopped; running it again (attempt {attempts + 1})")
        log.warning(self.notes[-1])

    def _end(self, client: Any, kind: str, message: str, task_run: Any = None) -> None:
        """End the run with ``message``; the stage runs it left Running end with it."""
        from prefect.states import Crashed, Failed

        client.set_task_run_state(self.task_run_id, (Crashed if kind == "Crashed" else Failed)(message=message),
                                  force=True)
        if task_run is not None:
            crash_stages(client, task_run, message)
        self.ended = message
        self.notes.append(message)
        log.warning(message)


def crash_stages(client: Any, task_run: Any, why: str) -> None:
    """The stage runs a dead worker left Running under ``task_run`` (its unit tag): Crashed."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType, TaskRunFilterTags
    from prefect.states import Crashed

    unit = next((t for t in task_run.tags or [] if t.startswith(UNIT_TAG)), None)
    if unit is None:
        return
    for run in client.read_task_runs(task_run_filter=TaskRunFilter(
            tags=TaskRunFilterTags(all_=[unit]),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=["PENDING", "RUNNING"]))), limit=200):
        if run.id != task_run.id:
            client.set_task_run_state(run.id, Crashed(message=why), force=True)


def reschedule(client: Any, task_run: Any, message: str) -> None:
    """Queue ``task_run`` again for any worker (Prefect's retry queue, ahead of new work), with the
    parameters it was created with."""
    from prefect.states import AwaitingRetry

    parameters_id = next((s.state_details.task_parameters_id for s in client.read_task_run_states(task_run.id)
                          if s.state_details.task_parameters_id is not None), None)
    state = AwaitingRetry(message=message)
    state.state_details.deferred = True
    state.state_details.task_parameters_id = parameters_id
    client.set_task_run_state(task_run.id, state, force=True)


def pool_busy(client: Any) -> bool:
    """Whether any task worker is running a delayed run now (Prefect's records, one query). A run
    Running for longer than the longest deadline is a leftover no one ended (its waiter and its
    worker both gone), not work: it does not count, so it cannot keep a queued run waiting for
    ever behind a pool that is really idle."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType, TaskRunFilterTags
    from prefect.client.schemas.sorting import TaskRunSort

    horizon = run_deadline(get_settings().max_audio_seconds) + GRACE
    runs = client.read_task_runs(task_run_filter=TaskRunFilter(
        tags=TaskRunFilterTags(all_=[WORKER_TAG]),
        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=["PENDING", "RUNNING"]))),
        sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=20)
    return any(run.state is not None and _age(run.state.timestamp) <= horizon for run in runs)


def pool_busy_once(client: Any) -> Callable[[], bool]:
    """:func:`pool_busy`, asked at most once (for one look at many runs), and only if needed."""
    answer: list[bool] = []

    def busy() -> bool:
        if not answer:
            answer.append(pool_busy(client))
        return answer[0]

    return busy


def _age(timestamp: Any) -> float:
    from datetime import datetime, timezone

    return (datetime.now(timezone.utc) - timestamp).total_seconds() if timestamp is not None else 0.0


def delay(task: Any, *args: Any, tags: tuple[str, ...] = ()) -> Any:
    """``task.delay(*args)`` with ``tags``, from a thread with no run context: Prefect stores the
    caller's context beside the parameters, and a flow run's context pickles its flow, which a
    deployment loads from a file path (module ``transcribe``, ``sweep``) that task workers
    cannot import; they would then delete the run. (So the task run is not linked to the flow
    run: the caller tags it instead.)"""
    from prefect import tags as prefect_tags

    box: dict[str, Any] = {}
    tags = (*tags, WORKER_TAG, f"{UNIT_TAG}{uuid.uuid4().hex[:16]}")  # inherited by its stage runs

    def send() -> None:
        try:
            with prefect_tags(*tags):
                box["future"] = task.delay(*args)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            box["error"] = exc

    thread = threading.Thread(target=send, name="delay")  # a new thread starts with an empty context
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["future"]


def run_on_worker(task: Any, *args: Any, label: str, deadline: float, storage: Any,
                  tags: tuple[str, ...] = ()) -> Any:
    """``task.delay(*args)`` to a warm task worker and wait for its result, watched
    (:class:`Watch`); raises the task's own error, or :class:`WorkerUnavailable` with one line."""
    from prefect.client.orchestration import get_client

    from prefect.exceptions import ObjectNotFound

    future = delay(task.with_options(result_storage=storage), *args, tags=tags)
    watch = Watch(future.task_run_id, task.task_key, label, deadline, storage)
    started = next_check = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            try:  # the state read directly: Prefect's state events reach a waiter ~1.5 s late
                task_run = client.read_task_run(future.task_run_id)
            except ObjectNotFound:  # a worker deletes a run whose parameters it cannot read
                raise WorkerUnavailable(f"{label}: its task run was deleted (a task worker could not read its "
                                        "parameters: do the workers use the same RESULTS_STORAGE?)") from None
            if task_run.state is not None and task_run.state.is_final():
                break
            now = time.monotonic()
            if now >= next_check:
                watch.check(client, task_run)
                next_check = now + CHECK_EVERY
            time.sleep(min(POLL_MAX, POLL + 0.05 * (now - started)))  # short files: soon; long ones: rarely
    state = task_run.state
    if state.is_completed():
        return state.result()  # not future.result(): its first call starts an event subscription (~1.5 s)
    if watch.ended:  # the watch failed it: no worker, a worker lost too often, out of time
        raise (Stopped if "deadline" in watch.ended else WorkerUnavailable)(watch.ended)
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - no stored exception (set from outside, or unreadable)
        error = None
    if isinstance(error, Exception):
        raise error  # the task's own failure: a bad file, a refused model ...
    raise WorkerUnavailable(state.message or f"{label} ended {state.name}")


def follow(task_run_ids: list[Any], task_key: str, storage: Any, every: float = 2.0,
           label: str = "transcribe-job") -> dict[Any, Any]:
    """Watch many runs of one task until each is final (a :class:`Watch` each: no worker, a dead
    worker, the deadline backstop); their final states by id. The worker itself stops a run at
    its own deadline, scaled to its audio; the backstop here is the longest audio's."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
    from prefect.states import Failed

    settings = get_settings()
    watches = {i: Watch(i, task_key, f"{label} {i}", run_deadline(settings.max_audio_seconds, settings), storage,
                        settings) for i in task_run_ids}
    done: dict[Any, Any] = {}
    with get_client(sync_client=True) as client:
        while len(done) < len(watches):
            pending = [i for i in watches if i not in done]
            workers = serving_workers(client, task_key)
            busy = pool_busy_once(client)
            seen = set()
            for start in range(0, len(pending), 200):
                for run in client.read_task_runs(task_run_filter=TaskRunFilter(
                        id=TaskRunFilterId(any_=pending[start:start + 200])), limit=200):
                    seen.add(run.id)
                    if run.state is not None and run.state.is_final():
                        done[run.id] = run.state
                    else:
                        watches[run.id].check(client, run, workers, busy)
            for gone in set(pending) - seen:  # deleted (a worker that could not read its parameters)
                done[gone] = Failed(message="its task run was deleted (a task worker could not read its parameters: "
                                    "the same RESULTS_STORAGE everywhere?)")
            if len(done) < len(watches):
                time.sleep(every)
    return done
