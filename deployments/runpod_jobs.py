"""The job tables behind the RunPod-compatible endpoint (:mod:`deployments.runpod_api`): where a
job runs and where its status comes from.

* :class:`Jobs` (default): a ``transcribe-audio`` flow run in the endpoint's own process; jobs
  are kept in memory, as RunPod keeps them for a while.
* :class:`DeploymentJobs` (``--deployment``): a run of a Prefect deployment on its work pool; job
  id = flow run id, everything read back from the Prefect API.
* :class:`TaskJobs` (``--task-workers``): the throughput path, a background task run of
  ``transcribe-job`` on warm task workers (:mod:`flows.jobs`): no process per job, ~0.3 s to
  dispatch; job id = task run id, status, output and cancel from Prefect's task-run API, so they
  survive a restart of the endpoint, and every job shows in the Prefect UI. The endpoint watches
  its jobs (:mod:`flows.dispatch`): a worker that dies mid-job has it scheduled again elsewhere.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

# RunPod status -> its key in /health's job counts
HEALTH_KEYS = {"COMPLETED": "completed", "FAILED": "failed", "IN_PROGRESS": "inProgress", "IN_QUEUE": "inQueue",
               "CANCELLED": "cancelled"}


class Jobs:
    """The job table: id -> state, with a thread pool running ``run(job, id)``."""

    reads_api = False  # a view is a dict lookup: no thread needed to read it
    poll = 0.25  # seconds between looks while a caller waits

    def __init__(self, run: Callable[[dict, str], dict], workers: int = 1, keep: int = 1000):
        self.run, self.keep = run, keep
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self.jobs: "OrderedDict[str, dict[str, Any]]" = OrderedDict()
        self.futures: dict[str, Future] = {}
        self.lock = threading.Lock()

    def submit(self, body: dict[str, Any]) -> str:
        job_id = f"{uuid.uuid4()}-u1"
        with self.lock:
            self.jobs[job_id] = {"id": job_id, "status": "IN_QUEUE", "submitted": time.time()}
            self.futures[job_id] = self.pool.submit(self._execute, job_id, {"id": job_id, **body})
            self._trim()
        return job_id

    def _execute(self, job_id: str, job: dict[str, Any]) -> None:
        state = self.jobs[job_id]
        state.update(status="IN_PROGRESS", started=time.time())
        try:
            out = self.run(job, job_id)
        except Exception as exc:  # noqa: BLE001 - the handler answers errors itself; this is a bug net
            out = {"error": f"{type(exc).__name__}: {exc}"}
        done = time.time()
        if set(out) == {"error"}:
            state.update(status="FAILED", error=out["error"], finished=done)
        else:
            state.update(status="COMPLETED", output=out, finished=done)

    def cancel(self, job_id: str) -> Optional[dict[str, Any]]:
        with self.lock:
            state = self.jobs.get(job_id)
            if state is not None and state["status"] == "IN_QUEUE" and self.futures[job_id].cancel():
                state.update(status="CANCELLED", finished=time.time())
        return self.view(job_id)

    def purge(self) -> int:
        """Cancel every queued job (RunPod's /purge-queue); running ones go on. How many."""
        with self.lock:
            queued = [k for k, s in self.jobs.items() if s["status"] == "IN_QUEUE"]
        return sum(self.cancel(k)["status"] == "CANCELLED" for k in queued)

    def view(self, job_id: str) -> Optional[dict[str, Any]]:
        """RunPod's status body for a job (None: unknown id)."""
        state = self.jobs.get(job_id)
        if state is None:
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
        statuses = [s["status"] for s in self.jobs.values()]
        return {name: statuses.count(status) for status, name in HEALTH_KEYS.items()}

    def _trim(self) -> None:
        finished = [k for k, s in self.jobs.items() if s["status"] in ("COMPLETED", "FAILED", "CANCELLED")]
        for k in finished[: max(0, len(finished) - self.keep)]:
            self.jobs.pop(k, None)
            self.futures.pop(k, None)


# Prefect state type -> RunPod status
RUNPOD_STATUS = {"SCHEDULED": "IN_QUEUE", "PENDING": "IN_QUEUE", "PAUSED": "IN_QUEUE", "RUNNING": "IN_PROGRESS",
                 "COMPLETED": "COMPLETED", "FAILED": "FAILED", "CRASHED": "FAILED", "CANCELLED": "CANCELLED",
                 "CANCELLING": "CANCELLED"}
FINAL = ("COMPLETED", "FAILED", "CANCELLED")
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

    def view(self, job_id: str) -> Optional[dict[str, Any]]:
        if job_id in self.refused:
            return {k: v for k, v in self.refused[job_id].items() if k != "submitted"}
        if job_id in self.outputs:
            return self.outputs[job_id]
        run = self._run(job_id)
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
            _remember(self, job_id, out)
        return out


class DeploymentJobs(_RunJobs):
    """Jobs as runs of a Prefect deployment (``run_deployment``), executed by its work pool's
    workers: the job id is the flow run id, the status is the flow run's state read from the
    Prefect API (so it outlives a restart of this service), ``output`` is the flow run's
    persisted result plus the bucket keys, and cancelling a running job cancels the flow run
    (its worker stops the process or container)."""

    def __init__(self, deployment: str, keep: int = 1000):
        self.deployment, self.keep = deployment, keep
        self.refused: "OrderedDict[str, dict[str, Any]]" = OrderedDict()  # jobs no flow run was made for
        self.outputs: "OrderedDict[str, dict[str, Any]]" = OrderedDict()  # finished views, read once
        self.lock = threading.Lock()

    def submit(self, body: dict[str, Any]) -> str:
        from prefect.deployments import run_deployment

        from speech.errors import SpeechError
        from speech.policy import admit

        try:  # the run checks it again on its worker (its own ALLOW_LOCAL_PATHS and models)
            req = admit({"input": body["input"]}, stored=True, serving=False)
        except SpeechError as exc:
            return _refuse(self, str(exc))
        run = run_deployment(self.deployment, parameters=deployment_parameters(req), timeout=0, tags=[TAG])
        return str(run.id)

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

    def cancel(self, job_id: str) -> Optional[dict[str, Any]]:
        """A queued run is cancelled at once; a running one is set CANCELLING, which its worker
        (or runner) acts on by stopping the process or container."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled, Cancelling

        run = self._run(job_id)
        if run is not None and run.state is not None and not run.state.is_final():
            queued = run.state.type.value in ("SCHEDULED", "PENDING", "PAUSED")
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(run.id, Cancelled(message="cancelled through the RunPod API") if queued
                                          else Cancelling(message="cancelled through the RunPod API"), force=True)
        return self.view(job_id)

    def purge(self) -> int:
        """Cancel every queued flow run this endpoint started (RunPod's /purge-queue)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                    FlowRunFilterTags)
        from prefect.states import Cancelled

        with get_client(sync_client=True) as client:
            queued = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[TAG]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED", "PENDING"]))), limit=10_000)
            for run in queued:
                client.set_flow_run_state(run.id, Cancelled(message="purged through the RunPod API"), force=True)
        return len(queued)

    def counts(self) -> dict[str, int]:
        """Jobs by status: the flow runs this endpoint started (tag ``runpod-api``), counted by the
        Prefect API, and the jobs refused before a run was made."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                    FlowRunFilterTags)

        out = {}
        with get_client(sync_client=True) as client:
            for status, name in HEALTH_KEYS.items():
                types = [t for t, s in RUNPOD_STATUS.items() if s == status]
                out[name] = client.count_flow_runs(flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[TAG]), state=FlowRunFilterState(type=FlowRunFilterStateType(any_=types))))
        out["failed"] += len(self.refused)
        return out


def _refuse(jobs: Any, error: str) -> str:
    """A job no run was made for (invalid, a token, outside the policy): FAILED at once."""
    job_id, now = f"{uuid.uuid4()}-u1", time.time()
    with jobs.lock:
        jobs.refused[job_id] = {"id": job_id, "status": "FAILED", "error": error, "delayTime": 0,
                                "executionTime": 0, "submitted": now}
        while len(jobs.refused) > jobs.keep:
            jobs.refused.popitem(last=False)
    return job_id


def _remember(jobs: Any, job_id: str, view: dict[str, Any]) -> None:
    """A finished job's view, read from the API once."""
    with jobs.lock:
        jobs.outputs[job_id] = view
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


class TaskJobs(_RunJobs):
    """Jobs as background task runs of ``transcribe-job`` (:func:`flows.jobs.transcribe_job`) on
    warm task workers: the job id is the task run id, the status its state, ``output`` its
    persisted result (the worker's JSON, plus bucket keys and presigned URLs made when asked),
    and cancelling sets it Cancelled (a queued job is skipped, a running one stops at its next
    checkpoint). A watcher thread applies :class:`flows.dispatch.Watch` to every unfinished job
    this endpoint started: a job whose worker died is scheduled again, one no worker serves fails."""

    def __init__(self, keep: int = 1000, watch_every: float = 2.0):
        from speech.errors import InvalidRequest
        from tasks.storage import task_result_storage

        self.storage = task_result_storage()
        if self.storage is None:
            raise InvalidRequest("--task-workers needs the result storage the task workers use: set RESULTS_STORAGE "
                                 "(s3://bucket/prefix or a shared folder) or RESULTS_STORAGE_BLOCK")
        self.keep, self.poll = keep, 0.5
        self.refused: "OrderedDict[str, dict[str, Any]]" = OrderedDict()
        self.outputs: "OrderedDict[str, dict[str, Any]]" = OrderedDict()
        self.watches: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self._watch_loop, args=(watch_every,), name="job-watcher", daemon=True)
        self.watcher.start()

    def submit(self, body: dict[str, Any]) -> str:
        from flows.dispatch import delay
        from flows.jobs import JOB_TAG, check_job_request, transcribe_job
        from speech.errors import SpeechError

        try:
            req = check_job_request(body["input"])
        except SpeechError as exc:
            return _refuse(self, str(exc))
        future = delay(transcribe_job.with_options(result_storage=self.storage), deployment_parameters(req),
                       tags=(TAG, JOB_TAG))
        return str(future.task_run_id)

    def _run(self, job_id: str) -> Any:
        run = self._read(job_id, lambda client, run_id: client.read_task_run(run_id))
        # only this endpoint's jobs (not their stage runs, which carry the tag too)
        return run if run is not None and TAG in (run.tags or []) and run.task_key.startswith("transcribe_job") else None

    def _status(self, state: Any) -> str:
        status = super()._status(state)
        if status == "FAILED" and "its run is Cancel" in (state.message or ""):
            status = "CANCELLED"  # stopped at a checkpoint because it was cancelled
        return status

    def _output(self, run: Any) -> dict[str, Any]:
        from speech.io.store import OutputTarget
        from speech.redact import one_line
        from speech.schema import OutputRef
        from tasks.outputs import bucket_keys
        from tasks.storage import results_store

        try:
            job = run.state.result(raise_on_failure=False)
            refs = [OutputRef(**r) for r in job["outputs"]]
            result = job["result"]
        except Exception as exc:  # noqa: BLE001 - result storage this service cannot read
            return {"status": "FAILED", "error": one_line(
                f"the job completed but its result cannot be read here ({type(exc).__name__}: {exc}); give the "
                "endpoint the task workers' RESULTS_STORAGE_BLOCK / RESULTS_STORAGE and S3 access to it")}
        buckets = {r.uri[len("s3://"):].split("/", 1)[0] for r in refs if r.uri.startswith("s3://")}
        store = results_store(OutputTarget(bucket=next(iter(buckets)))) if buckets else None
        return {"output": {**result, **bucket_keys(refs, store)}}

    def cancel(self, job_id: str) -> Optional[dict[str, Any]]:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        run = self._run(job_id)
        if run is not None and run.state is not None and not run.state.is_final():
            with get_client(sync_client=True) as client:
                client.set_task_run_state(run.id, Cancelled(message="cancelled through the RunPod API"), force=True)
        return self.view(job_id)

    def purge(self) -> int:
        """Cancel every queued job of this endpoint (RunPod's /purge-queue): the workers skip them."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        from flows.jobs import job_filter

        with get_client(sync_client=True) as client:
            queued = client.read_task_runs(task_run_filter=job_filter(TAG, states=("SCHEDULED", "PENDING")), limit=200)
            for run in queued:
                client.set_task_run_state(run.id, Cancelled(message="purged through the RunPod API"), force=True)
        return len(queued)

    def counts(self) -> dict[str, int]:
        from prefect.client.orchestration import get_client

        from flows.jobs import job_filter

        out = {}
        with get_client(sync_client=True) as client:
            for status, name in HEALTH_KEYS.items():
                wanted = job_filter(TAG, states=tuple(t for t, s in RUNPOD_STATUS.items() if s == status))
                reply = client.request("POST", "/task_runs/count", json={"task_runs": wanted.model_dump(mode="json")})
                reply.raise_for_status()
                out[name] = int(reply.json())
        out["failed"] += len(self.refused)
        return out

    def _watch_loop(self, every: float) -> None:
        import logging

        while not self.stopping.wait(every):
            try:
                self.watch_once()
            except Exception:  # noqa: BLE001 - the API may be restarting: look again later
                logging.getLogger(__name__).warning("watching jobs failed", exc_info=True)

    def watch_once(self) -> None:
        """One look at every unfinished job: :meth:`flows.dispatch.Watch.check` each."""
        from prefect.client.orchestration import get_client

        from flows.dispatch import Watch, pool_busy_once, run_deadline, serving_workers
        from flows.jobs import job_filter, transcribe_job
        from speech.settings import get_settings

        with get_client(sync_client=True) as client:
            wanted = job_filter(TAG, states=("SCHEDULED", "PENDING", "RUNNING"))
            runs: list[Any] = []
            while True:  # every page: the API answers 200 at most
                page = client.read_task_runs(task_run_filter=wanted, limit=200, offset=len(runs))
                runs.extend(page)
                if len(page) < 200:
                    break
            workers = serving_workers(client, transcribe_job.task_key) if runs else set()
            busy = pool_busy_once(client)
            for run in runs:
                key = str(run.id)
                if key not in self.watches:  # the worker enforces the deadline scaled to the audio; this is the backstop
                    self.watches[key] = Watch(run.id, transcribe_job.task_key, f"transcribe-job {run.name}",
                                              run_deadline(get_settings().max_audio_seconds), self.storage)
                self.watches[key].check(client, run, workers, busy)
            live = {str(r.id) for r in runs}
            for key in [k for k in self.watches if k not in live]:
                del self.watches[key]
