"""The RunPod-compatible endpoint's throughput path (``--task-workers``): each job a background
task run of ``transcribe-job`` on warm task workers (:mod:`flows.jobs`): no process per job,
~0.3 s to dispatch; job id = task run id; status, output and cancel from Prefect's task-run API,
so they survive a restart of the endpoint, and every job shows in the Prefect UI. The endpoint
watches its jobs (:mod:`flows.dispatch`): a worker that dies mid-job has it scheduled again
elsewhere. The other job tables are in :mod:`deployments.runpod_jobs`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Optional

from deployments.callers import DEFAULT
from deployments.runpod_jobs import (
    HEALTH_KEYS,
    MAX_QUEUED,
    PAGE,
    QUEUED,
    RUNPOD_STATUS,
    TAG,
    _check_queue,
    _refuse,
    _RunJobs,
    cancel_pages,
    deployment_parameters,
    job_tags,
)

class TaskJobs(_RunJobs):
    """Jobs as background task runs of ``transcribe-job`` (:func:`flows.jobs.transcribe_job`) on
    warm task workers: the job id is the task run id, the status its state, ``output`` its
    persisted result (the worker's JSON, plus bucket keys and presigned URLs made when asked),
    and cancelling sets it Cancelled (a queued job is skipped, a running one stops at its next
    checkpoint). A watcher thread applies :class:`flows.dispatch.Watch` to every unfinished job
    this endpoint started: a job whose worker died is scheduled again, one no worker serves fails."""

    def __init__(self, keep: int = 1000, watch_every: float = 2.0, max_queued: int = MAX_QUEUED,
                 per_caller: Optional[int] = None):
        from speech.errors import InvalidRequest
        from tasks.storage import task_result_storage

        self.storage = task_result_storage()
        if self.storage is None:
            raise InvalidRequest("--task-workers needs the result storage the task workers use: set RESULTS_STORAGE "
                                 "(s3://bucket/prefix or a shared folder) or RESULTS_STORAGE_BLOCK")
        self.keep, self.poll, self.max_queued, self.per_caller = keep, 0.5, max_queued, per_caller
        self.refused: "OrderedDict[str, dict[str, Any]]" = OrderedDict()
        self.outputs: "OrderedDict[str, dict[str, Any]]" = OrderedDict()
        self.watches: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self._watch_loop, args=(watch_every,), name="job-watcher", daemon=True)
        self.watcher.start()

    def submit(self, body: dict[str, Any], caller: str = DEFAULT) -> str:
        from flows.dispatch import delay
        from flows.jobs import JOB_TAG, check_job_request, transcribe_job
        from speech.errors import SpeechError

        try:
            req = check_job_request(body["input"])
        except SpeechError as exc:
            return _refuse(self, str(exc), caller)
        with self.lock:  # count and hand over together (queued tasks live in the Prefect server's memory)
            _check_queue(self._count(QUEUED), self.max_queued)
            _check_queue(self._count(QUEUED, caller=caller), self.per_caller or self.max_queued, caller)
            future = delay(transcribe_job.with_options(result_storage=self.storage), deployment_parameters(req),
                           tags=(*job_tags(caller), JOB_TAG))
        return str(future.task_run_id)

    def _count(self, states: tuple[str, ...], client: Any = None, caller: Optional[str] = None) -> int:
        """This endpoint's jobs (``caller``'s, when given) in these Prefect state types."""
        from prefect.client.orchestration import get_client

        from flows.jobs import job_filter

        if client is None:
            with get_client(sync_client=True) as client:
                return self._count(states, client, caller)
        wanted = job_filter(*job_tags(caller), states=states)
        reply = client.request("POST", "/task_runs/count", json={"task_runs": wanted.model_dump(mode="json")})
        reply.raise_for_status()
        return int(reply.json())

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
        from speech.contracts import OutputRef
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

    def cancel(self, job_id: str, caller: Optional[str] = None) -> Optional[dict[str, Any]]:
        """Cancel ``caller``'s job (None: anyone's): a queued one is skipped, a running one stops."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        run = self._mine(job_id, caller)
        if run is not None and run.state is not None and not run.state.is_final():
            with get_client(sync_client=True) as client:
                client.set_task_run_state(run.id, Cancelled(message="cancelled through the RunPod API"), force=True)
        return self.view(job_id, caller)

    def purge(self, caller: Optional[str] = None) -> int:
        """Cancel every queued job of ``caller`` (None: of anyone; RunPod's /purge-queue): the
        workers skip them."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        from flows.jobs import job_filter

        wanted = job_filter(*job_tags(caller), states=QUEUED)
        with get_client(sync_client=True) as client:
            return cancel_pages(lambda: client.read_task_runs(task_run_filter=wanted, limit=PAGE),
                                lambda run_id: client.set_task_run_state(
                                    run_id, Cancelled(message="purged through the RunPod API"), force=True))

    def counts(self) -> dict[str, int]:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            out = {name: self._count(tuple(t for t, s in RUNPOD_STATUS.items() if s == status), client)
                   for status, name in HEALTH_KEYS.items()}
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
                page = client.read_task_runs(task_run_filter=wanted, limit=PAGE, offset=len(runs))
                runs.extend(page)
                if len(page) < PAGE:
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
