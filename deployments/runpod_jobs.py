"""The job tables behind the RunPod-compatible endpoint (:mod:`deployments.runpod_api`): where a
job runs and where its status comes from.

* :class:`Jobs` (default): a ``transcribe-audio`` flow run in the endpoint's own process; jobs
  are kept in memory, as RunPod keeps them for a while.
* :class:`DeploymentJobs` (``--deployment``): a run of a Prefect deployment on its work pool; job
  id = flow run id, everything read back from the Prefect API.
* :class:`~deployments.runpod_task_jobs.TaskJobs` (``--task-workers``): the throughput path, a
  background task run of ``transcribe-job`` on warm task workers, in its own module.

Each table holds at most ``max_queued`` jobs that no worker has started, at most ``per_caller``
of one caller's (:class:`QueueFull` beyond: the endpoint answers 429). Every job belongs to the
caller that sent it (:mod:`deployments.callers`): ``view``, ``cancel`` and ``purge`` given a
caller see only that caller's jobs (None: any, for the endpoint's own bookkeeping).
"""
from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Optional

from deployments.callers import DEFAULT, owner, tag

# RunPod status -> its key in /health's job counts
HEALTH_KEYS = {"COMPLETED": "completed", "FAILED": "failed", "IN_PROGRESS": "inProgress", "IN_QUEUE": "inQueue",
               "CANCELLED": "cancelled"}
FINAL = ("COMPLETED", "FAILED", "CANCELLED")


MAX_QUEUED = 1000  # jobs waiting for a worker before /run answers 429 (--max-queued)


class QueueFull(Exception):
    """The queue, or the caller's share of it, is full: try again later (HTTP 429)."""

    def __init__(self, queued: int, limit: int, caller: Optional[str] = None):
        if caller is None:
            super().__init__(f"the queue is full: {queued} jobs wait for a worker (--max-queued {limit}); "
                             "try again later")
        else:
            super().__init__(f"your share of the queue is full: {queued} of your jobs wait for a worker "
                             f"(--max-queued-per-caller {limit}); try again later")


def _check_queue(queued: int, limit: int, caller: Optional[str] = None) -> None:
    if queued >= limit:
        raise QueueFull(queued, limit, caller)


class Jobs:
    """The job table: id -> state, with a thread pool running ``run(job, id)``. At most
    ``max_queued`` jobs wait for it (each holds its body in memory), at most ``per_caller`` of one
    caller's; a free worker takes the next job of the next caller in turn, so one caller's backlog
    does not hold up another's jobs; each caller keeps its last ``keep`` finished jobs."""

    reads_api = False  # a view is a dict lookup: no thread needed to read it
    poll = 0.25  # seconds between looks while a caller waits

    def __init__(self, run: Callable[[dict, str], dict], workers: int = 1, keep: int = 1000,
                 max_queued: int = MAX_QUEUED, per_caller: Optional[int] = None):
        self.run, self.keep, self.max_queued, self.per_caller = run, keep, max_queued, per_caller
        self.workers, self.running = workers, 0
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self.jobs: "OrderedDict[str, dict[str, Any]]" = OrderedDict()
        self.waiting: "dict[str, deque[str]]" = {}  # caller -> its queued job ids
        self.served: "OrderedDict[str, None]" = OrderedDict()  # callers, the one served longest ago first
        self.lock = threading.Lock()

    def submit(self, body: dict[str, Any], caller: str = DEFAULT) -> str:
        job_id = f"{uuid.uuid4()}-u1"
        with self.lock:
            _check_queue(sum(len(q) for q in self.waiting.values()), self.max_queued)
            _check_queue(len(self.waiting.get(caller, ())), self.per_caller or self.max_queued, caller)
            self.jobs[job_id] = {"id": job_id, "status": "IN_QUEUE", "submitted": time.time(), "caller": caller,
                                 "job": {"id": job_id, **body}}
            self.waiting.setdefault(caller, deque()).append(job_id)
            self._dispatch()
        return job_id

    def _dispatch(self) -> None:
        """(Lock held.) Start queued jobs while a worker is free: the first job of the caller whose
        turn it is (the one served longest ago), that caller then going to the back of the line."""
        while self.running < self.workers and self.waiting:
            caller = next((c for c in self.waiting if c not in self.served), None)  # a caller not served yet
            if caller is None:
                caller = next(c for c in self.served if c in self.waiting)  # else the one served longest ago
            self.served[caller] = None
            self.served.move_to_end(caller)
            queue = self.waiting[caller]
            job_id = queue.popleft()
            if not queue:
                del self.waiting[caller]
            state = self.jobs[job_id]
            state.update(status="IN_PROGRESS", started=time.time())
            self.running += 1
            self.pool.submit(self._execute, job_id, state.pop("job"))

    def _execute(self, job_id: str, job: dict[str, Any]) -> None:
        state = self.jobs[job_id]
        try:
            out = self.run(job, job_id)
        except Exception as exc:  # noqa: BLE001 - the handler answers errors itself; this is a bug net
            out = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            with self.lock:
                self.running -= 1
                self._dispatch()
        done = time.time()
        if set(out) == {"error"}:
            state.update(status="FAILED", error=out["error"], finished=done)
        else:
            state.update(status="COMPLETED", output=out, finished=done)
        with self.lock:
            self._trim(state["caller"])

    def cancel(self, job_id: str, caller: Optional[str] = None) -> Optional[dict[str, Any]]:
        """Cancel a queued job (a running one goes on); its view, None for no job of ``caller``'s."""
        with self.lock:
            state = self.jobs.get(job_id)
            if state is not None and state["status"] == "IN_QUEUE" and caller in (None, state["caller"]):
                queue = self.waiting[state["caller"]]
                queue.remove(job_id)
                if not queue:
                    del self.waiting[state["caller"]]
                state.pop("job", None)
                state.update(status="CANCELLED", finished=time.time())
                self._trim(state["caller"])
        return self.view(job_id, caller)

    def purge(self, caller: Optional[str] = None) -> int:
        """Cancel every queued job of ``caller`` (RunPod's /purge-queue; None: of every caller);
        running ones go on. How many."""
        with self.lock:
            queued = [k for k, s in self.jobs.items() if s["status"] == "IN_QUEUE" and caller in (None, s["caller"])]
        return sum((self.cancel(k) or {}).get("status") == "CANCELLED" for k in queued)

    def view(self, job_id: str, caller: Optional[str] = None) -> Optional[dict[str, Any]]:
        """RunPod's status body for a job (None: unknown id, or another caller's job)."""
        state = self.jobs.get(job_id)
        if state is None or caller not in (None, state["caller"]):
            return None
        out = {"id": job_id, "status": state["status"]}
        if "started" in state:
            out["delayTime"] = int(1000 * (state["started"] - state["submitted"]))
        if "finished" in state and "started" in state:
            out["executionTime"] = int(1000 * (state["finished"] - state["started"]))
        for key in ("output", "error"):
            if key in state:
                out[key] = state[key]
        return out

    def counts(self) -> dict[str, int]:
        statuses = [s["status"] for s in list(self.jobs.values())]
        return {name: statuses.count(status) for status, name in HEALTH_KEYS.items()}

    def _trim(self, caller: str) -> None:
        """(Lock held.) Forget ``caller``'s oldest finished jobs beyond ``keep``: another caller's
        traffic never pushes out a result this caller has not read yet."""
        finished = [k for k, s in self.jobs.items() if s["caller"] == caller and s["status"] in FINAL]
        for k in finished[: max(0, len(finished) - self.keep)]:
            self.jobs.pop(k, None)


# Prefect state type -> RunPod status
RUNPOD_STATUS = {"SCHEDULED": "IN_QUEUE", "PENDING": "IN_QUEUE", "PAUSED": "IN_QUEUE", "RUNNING": "IN_PROGRESS",
                 "COMPLETED": "COMPLETED", "FAILED": "FAILED", "CRASHED": "FAILED", "CANCELLED": "CANCELLED",
                 "CANCELLING": "CANCELLED"}
TAG = "runpod-api"


class _RunJobs:
    """What the job tables over Prefect runs share (:class:`DeploymentJobs`, :class:`TaskJobs`):
    a job is a run read back from the API (``_run``: None when it is not one of this endpoint's),
    its RunPod status from the run's state, its output from the run's result (``_output``)."""

    refused: "OrderedDict[str, dict[str, Any]]"
    outputs: "OrderedDict[str, dict[str, Any]]"
    reads_api = True  # a view reads the Prefect API
    poll = 1.0  # seconds between looks while a caller waits

    def _run(self, job_id: str) -> Any:
        raise NotImplementedError

    @staticmethod
    def _read(job_id: str, read: Callable[[Any, uuid.UUID], Any]) -> Any:
        """``read(client, id)`` for a job id; None for a malformed id or a run that does not exist."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            run_id = uuid.UUID(job_id)
        except ValueError:
            return None
        with get_client(sync_client=True) as client:
            try:
                return read(client, run_id)
            except ObjectNotFound:
                return None

    def _output(self, run: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _status(self, state: Any) -> str:
        return RUNPOD_STATUS.get(state.type.value if state else "SCHEDULED", "IN_QUEUE")

    def _mine(self, job_id: str, caller: Optional[str]) -> Any:
        """The run of job ``job_id`` when it is ``caller``'s (None: anyone's), else None."""
        run = self._run(job_id)
        return run if run is not None and caller in (None, owner(run.tags)) else None

    def view(self, job_id: str, caller: Optional[str] = None) -> Optional[dict[str, Any]]:
        """RunPod's status body for a job (None: unknown id, or another caller's job)."""
        if job_id in self.refused:
            entry = self.refused[job_id]
            return None if caller not in (None, entry["caller"]) else {
                k: v for k, v in entry.items() if k not in ("submitted", "caller")}
        if job_id in self.outputs:
            entry = self.outputs[job_id]
            return entry["view"] if caller in (None, entry["caller"]) else None
        run = self._mine(job_id, caller)
        if run is None:
            return None
        state = run.state
        out: dict[str, Any] = {"id": job_id, "status": self._status(state)}
        if run.start_time is not None:
            out["delayTime"] = int(1000 * max(0.0, (run.start_time - run.created).total_seconds()))
            if run.end_time is not None:
                out["executionTime"] = int(1000 * max(0.0, (run.end_time - run.start_time).total_seconds()))
        if out["status"] == "COMPLETED":
            out.update(self._output(run))
        elif out["status"] == "FAILED":
            from flows.runtime import failure_message

            out["error"] = failure_message(state)
        if out["status"] in FINAL and state.type.value != "CANCELLING":
            _remember(self, job_id, out, owner(run.tags))
        return out


class DeploymentJobs(_RunJobs):
    """Jobs as runs of a Prefect deployment (``run_deployment``), executed by its work pool's
    workers: the job id is the flow run id, the status is the flow run's state read from the
    Prefect API (so it outlives a restart of this service), ``output`` is the flow run's
    persisted result plus the bucket keys, and cancelling a running job cancels the flow run
    (its worker stops the process or container). With several ``callers`` and ``ahead`` > 0,
    the callers take turns on the pool (:mod:`deployments.turns`): ``ahead`` runs wait for the
    workers, the rest are held until their caller's turn."""

    def __init__(self, deployment: str, keep: int = 1000, max_queued: int = MAX_QUEUED,
                 per_caller: Optional[int] = None, callers: Iterable[str] = (), ahead: int = 0):
        from deployments.turns import Turns

        self.deployment, self.keep, self.max_queued, self.per_caller = deployment, keep, max_queued, per_caller
        self.refused: "OrderedDict[str, dict[str, Any]]" = OrderedDict()  # jobs no flow run was made for
        self.outputs: "OrderedDict[str, dict[str, Any]]" = OrderedDict()  # finished views, read once
        self.lock = threading.Lock()
        callers = list(callers)
        self.turns = Turns(deployment, callers, job_tags(None), ahead) if len(callers) > 1 and ahead > 0 else None

    def submit(self, body: dict[str, Any], caller: str = DEFAULT) -> str:
        from prefect.deployments import run_deployment

        from speech.errors import SpeechError
        from speech.policy import admit

        try:  # the run checks it again on its worker (its own ALLOW_LOCAL_PATHS and models)
            req = admit({"input": body["input"]}, stored=True, serving=False)
        except SpeechError as exc:
            return _refuse(self, str(exc), caller)
        with self.lock:  # count and create together: concurrent submits cannot all see room for one
            _check_queue(self._queued(), self.max_queued)
            _check_queue(self._queued(caller), self.per_caller or self.max_queued, caller)
            if self.turns is None:
                run = run_deployment(self.deployment, parameters=deployment_parameters(req), timeout=0,
                                     tags=job_tags(caller))
            else:
                run = self._held(deployment_parameters(req), caller)
        if self.turns is not None:
            self.turns.start()
            self.turns.release_soon()  # an idle pool starts it now
        return str(run.id)

    def _held(self, parameters: dict[str, Any], caller: str) -> Any:
        """A flow run of the deployment held for its caller's turn (:mod:`deployments.turns`)."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.create_flow_run_from_deployment(self.turns.deployment_id(client), parameters=parameters,
                                                          state=self.turns.held_state(), tags=job_tags(caller))

    def _queued(self, caller: Optional[str] = None) -> int:
        """This endpoint's flow runs (``caller``'s, when given) no worker has started yet."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.count_flow_runs(flow_run_filter=_flow_runs(caller, QUEUED))

    def _run(self, job_id: str) -> Any:
        run = self._read(job_id, lambda client, run_id: client.read_flow_run(run_id))
        # only the runs this endpoint started: a key holder must not read or cancel other flow runs
        return run if run is not None and TAG in (run.tags or []) else None

    def _output(self, run: Any) -> dict[str, Any]:
        """The flow run's persisted result (the worker's JSON) and its bucket keys."""
        from deployments.runpod_handler import stored_bucket_keys
        from speech.redact import one_line
        from speech.schema import TranscriptionRequest

        try:
            result = run.state.result(raise_on_failure=False)
        except Exception as exc:  # noqa: BLE001 - result storage the service cannot read
            return {"status": "FAILED", "error": one_line(
                f"the run completed but its result cannot be read here ({type(exc).__name__}: {exc}); give the "
                "deployment's workers a shared RESULTS_STORAGE_BLOCK / RESULTS_STORAGE and this service S3 access to it")}
        if not isinstance(result, dict):
            return {"status": "FAILED", "error": f"the run completed without the worker's result ({type(result).__name__})"}
        try:
            keys = stored_bucket_keys(TranscriptionRequest.parse(run.parameters), str(run.id))
        except Exception:  # noqa: BLE001 - the transcript is there; keys are an extra
            keys = {}
        return {"output": {**result, **keys}}

    def cancel(self, job_id: str, caller: Optional[str] = None) -> Optional[dict[str, Any]]:
        """A queued run is cancelled at once; a running one is set CANCELLING, which its worker
        (or runner) acts on by stopping the process or container. Only ``caller``'s (None: anyone's)."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled, Cancelling

        with self._turn_lock():
            run = self._mine(job_id, caller)
            if run is not None and run.state is not None and not run.state.is_final():
                queued = run.state.type.value in ("SCHEDULED", "PENDING", "PAUSED")
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(run.id, Cancelled(message="cancelled through the RunPod API") if queued
                                              else Cancelling(message="cancelled through the RunPod API"), force=True)
        return self.view(job_id, caller)

    def _turn_lock(self) -> Any:
        """Held while a queued run is cancelled: a release of it waits (:mod:`deployments.turns`)."""
        return self.turns.lock if self.turns is not None else contextlib.nullcontext()

    def purge(self, caller: Optional[str] = None) -> int:
        """Cancel every queued flow run this endpoint started for ``caller`` (None: for anyone;
        RunPod's /purge-queue)."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        queued = _flow_runs(caller, QUEUED)
        with self._turn_lock(), get_client(sync_client=True) as client:
            return cancel_pages(lambda: client.read_flow_runs(flow_run_filter=queued, limit=PAGE),
                                lambda run_id: client.set_flow_run_state(
                                    run_id, Cancelled(message="purged through the RunPod API"), force=True))

    def counts(self) -> dict[str, int]:
        """Jobs by status: the flow runs this endpoint started (tag ``runpod-api``), counted by the
        Prefect API, and the jobs refused before a run was made."""
        from prefect.client.orchestration import get_client

        out = {}
        with get_client(sync_client=True) as client:
            for status, name in HEALTH_KEYS.items():
                types = tuple(t for t, s in RUNPOD_STATUS.items() if s == status)
                out[name] = client.count_flow_runs(flow_run_filter=_flow_runs(None, types))
        out["failed"] += len(self.refused)
        return out


PAGE = 200  # the most runs the Prefect API returns at once
QUEUED = ("SCHEDULED", "PENDING")  # Prefect states of a job no worker has started


def job_tags(caller: Optional[str]) -> list[str]:
    """The tags of this endpoint's runs: all of them (None), or ``caller``'s."""
    return [TAG, tag(caller)] if caller else [TAG]


def _flow_runs(caller: Optional[str], states: tuple[str, ...]) -> Any:
    """A filter for this endpoint's flow runs (``caller``'s, when given) in these state types."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                FlowRunFilterTags)

    return FlowRunFilter(tags=FlowRunFilterTags(all_=job_tags(caller)),
                         state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states))))


def cancel_pages(read_page: Callable[[], list[Any]], cancel: Callable[[Any], Any]) -> int:
    """``cancel(id)`` every run ``read_page()`` lists, page after page (a cancelled run leaves the
    filter) until no new one comes: how many."""
    done: set[Any] = set()
    while True:
        page = [run for run in read_page() if run.id not in done]
        if not page:
            return len(done)
        for run in page:
            cancel(run.id)
            done.add(run.id)


def _refuse(jobs: Any, error: str, caller: str) -> str:
    """A job no run was made for (invalid, a token, outside the policy): FAILED at once. Each
    caller keeps its last ``keep`` of them (they live only here)."""
    job_id, now = f"{uuid.uuid4()}-u1", time.time()
    with jobs.lock:
        jobs.refused[job_id] = {"id": job_id, "status": "FAILED", "error": error, "delayTime": 0,
                                "executionTime": 0, "submitted": now, "caller": caller}
        mine = [k for k, v in jobs.refused.items() if v["caller"] == caller]
        for k in mine[: max(0, len(mine) - jobs.keep)]:
            del jobs.refused[k]
    return job_id


def _remember(jobs: Any, job_id: str, view: dict[str, Any], caller: str) -> None:
    """A finished job's view, read from the API once (a cache: a view pushed out is read again)."""
    with jobs.lock:
        jobs.outputs[job_id] = {"caller": caller, "view": view}
        while len(jobs.outputs) > jobs.keep:
            jobs.outputs.popitem(last=False)


def deployment_parameters(req: Any) -> dict[str, Any]:
    """The fields the job set (the deployment's own defaults stand for the rest), as JSON;
    ``prefect-secret:`` references stay readable so the run can resolve them."""
    from speech.schema import SECRET_FIELDS

    params = req.model_dump(mode="json", include=set(req.model_fields_set) - set(SECRET_FIELDS))
    for name in set(SECRET_FIELDS) & req.model_fields_set:
        value = getattr(req, name)
        if value is not None:
            params[name] = value.get_secret_value()
    return params
