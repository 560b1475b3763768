"""A RunPod-compatible serverless endpoint backed by Prefect flow runs, so clients of the original
RunPod worker switch by changing one base URL:

    ENDPOINT_API_KEY=... python -m deployments.runpod_api [--host 127.0.0.1] [--port 8000] [--workers 1]
    ENDPOINT_API_KEY=... python -m deployments.runpod_api --deployment transcribe-audio/transcribe-gpu

Routes (RunPod's serverless API; ``{endpoint_id}`` is accepted as given):

* ``POST /v2/{endpoint_id}/run`` with ``{"input": {...}}`` -> ``{"id", "status": "IN_QUEUE"}``;
* ``POST /v2/{endpoint_id}/runsync[?wait=MS]`` -> waits up to ``wait`` ms (default 90 000), then
  answers like RunPod: the finished job, or ``{"id", "status": "IN_PROGRESS" | "IN_QUEUE"}``;
* ``GET /v2/{endpoint_id}/status/{id}`` -> ``{"id", "status", "output" | "error", "delayTime",
  "executionTime"}`` (IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED);
* ``POST /v2/{endpoint_id}/cancel/{id}`` -> cancels a queued job, and with ``--deployment`` a
  running one too;
* ``GET /v2/{endpoint_id}/health`` -> job counts (no key needed).

Every route but ``/health`` wants ``Authorization: Bearer <ENDPOINT_API_KEY>`` (401 otherwise);
without a key the service only starts on a loopback host. ``output`` is exactly what the
original worker returned, a failure is ``FAILED`` with its one-line ``error``.

Without ``--deployment`` (:class:`Jobs`) each job is one ``transcribe-audio`` flow run in this
process (named after the job id, so the Prefect UI lists it), through
:func:`deployments.runpod_handler.handler`; jobs are kept in memory (``--keep`` finished jobs,
default 1000): a restart forgets them, as RunPod forgets results. With ``--deployment``
(:class:`DeploymentJobs`) each job is a run of that deployment on its work pool: the job id is
the flow run id and everything is read back from the Prefect API.
"""
# no "from __future__ import annotations": FastAPI reads the route functions' annotations at runtime

import argparse
import hmac
import ipaddress
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_WAIT_MS = 90_000
# RunPod status -> its key in /health's job counts
HEALTH_KEYS = {"COMPLETED": "completed", "FAILED": "failed", "IN_PROGRESS": "inProgress", "IN_QUEUE": "inQueue",
               "CANCELLED": "cancelled"}


class Jobs:
    """The job table: id -> state, with a thread pool running ``run(job, id)``."""

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

    def wait(self, job_id: str, seconds: float) -> None:
        future = self.futures.get(job_id)
        if future is not None:
            try:
                future.result(timeout=max(0.0, seconds))
            except Exception:  # noqa: BLE001 - timeouts and cancellations: the status says it
                pass

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


class DeploymentJobs:
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
        from speech.schema import TranscriptionRequest, plain_secrets

        try:
            req = TranscriptionRequest.parse({"input": body["input"]})
            given = plain_secrets(body["input"])
            if given:
                raise SpeechError(
                    f"{', '.join(given)}: a token would be stored in the queued run's parameters; the workers read "
                    "tokens from their env vars or Secret blocks, or pass 'prefect-secret:<block name>'")
        except SpeechError as exc:
            return self._refuse(str(exc))
        run = run_deployment(self.deployment, parameters=deployment_parameters(req), timeout=0, tags=[TAG])
        return str(run.id)

    def _refuse(self, error: str) -> str:
        job_id, now = f"{uuid.uuid4()}-u1", time.time()
        with self.lock:
            self.refused[job_id] = {"id": job_id, "status": "FAILED", "error": error, "delayTime": 0,
                                    "executionTime": 0, "submitted": now}
            while len(self.refused) > self.keep:
                self.refused.popitem(last=False)
        return job_id

    def _flow_run(self, job_id: str) -> Any:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            run_id = uuid.UUID(job_id)
        except ValueError:
            return None
        with get_client(sync_client=True) as client:
            try:
                run = client.read_flow_run(run_id)
            except ObjectNotFound:
                return None
        # only the runs this endpoint started: a key holder must not read or cancel other flow runs
        return run if TAG in (run.tags or []) else None

    def view(self, job_id: str) -> Optional[dict[str, Any]]:
        if job_id in self.refused:
            return {k: v for k, v in self.refused[job_id].items() if k != "submitted"}
        if job_id in self.outputs:
            return self.outputs[job_id]
        run = self._flow_run(job_id)
        if run is None:
            return None
        state = run.state
        status = RUNPOD_STATUS.get(state.type.value if state else "SCHEDULED", "IN_QUEUE")
        out: dict[str, Any] = {"id": job_id, "status": status}
        if run.start_time is not None:
            out["delayTime"] = int(1000 * max(0.0, (run.start_time - run.created).total_seconds()))
            if run.end_time is not None:
                out["executionTime"] = int(1000 * max(0.0, (run.end_time - run.start_time).total_seconds()))
        if status == "COMPLETED":
            out.update(self._output(run))
        elif status == "FAILED":
            out["error"] = failure_message(state)
        if out["status"] in FINAL and state.type.value != "CANCELLING":
            with self.lock:
                self.outputs[job_id] = out
                while len(self.outputs) > self.keep:
                    self.outputs.popitem(last=False)
        return out

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
            keys = stored_bucket_keys(TranscriptionRequest.parse(run.parameters))
        except Exception:  # noqa: BLE001 - the transcript is there; keys are an extra
            keys = {}
        return {"output": {**result, **keys}}

    def cancel(self, job_id: str) -> Optional[dict[str, Any]]:
        """A queued run is cancelled at once; a running one is set CANCELLING, which its worker
        (or runner) acts on by stopping the process or container."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled, Cancelling

        run = self._flow_run(job_id)
        if run is not None and run.state is not None and not run.state.is_final():
            queued = run.state.type.value in ("SCHEDULED", "PENDING", "PAUSED")
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(run.id, Cancelled(message="cancelled through the RunPod API") if queued
                                          else Cancelling(message="cancelled through the RunPod API"), force=True)
        return self.view(job_id)

    def wait(self, job_id: str, seconds: float) -> None:
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            view = self.view(job_id)
            if view is None or view["status"] in FINAL or time.monotonic() >= deadline:
                return
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

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


def failure_message(state: Any) -> str:
    """A failed or crashed flow run's state message as the handler's one-line error."""
    from speech import errors
    from speech.redact import one_line, scrub_configured

    message = (state.message or state.name or "failed").strip()
    message = message.removeprefix("Flow run encountered an exception: ")
    name, sep, rest = message.partition(": ")
    if sep and isinstance(getattr(errors, name, None), type) and issubclass(getattr(errors, name), errors.SpeechError):
        message = rest  # the handler answers a pipeline error with its message alone
    return one_line(scrub_configured(message))


def create_app(api_key: Optional[str], jobs: Any) -> Any:
    """The FastAPI application (RunPod's routes over ``jobs``)."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="whisperx-prefect (RunPod-compatible)", docs_url=None, redoc_url=None)

    def authorized(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else given
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise HTTPException(status_code=401, detail="Unauthorized")

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(status_code=400, detail="the body must be JSON: {\"input\": {...}}") from None
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            raise HTTPException(status_code=400, detail="the body must be {\"input\": {...}}")
        return {k: body[k] for k in ("input", "webhook", "policy") if k in body}

    def found(job_id: str) -> dict[str, Any]:
        view = jobs.view(job_id)
        if view is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id}")
        return view

    @app.post("/v2/{endpoint_id}/run", dependencies=[Depends(authorized)])
    async def run(endpoint_id: str, request: Request) -> dict[str, Any]:
        import anyio

        job_id = await anyio.to_thread.run_sync(jobs.submit, await body_of(request))
        return {"id": job_id, "status": "IN_QUEUE"}

    @app.post("/v2/{endpoint_id}/runsync", dependencies=[Depends(authorized)])
    async def runsync(endpoint_id: str, request: Request, wait: int = DEFAULT_WAIT_MS) -> dict[str, Any]:
        import anyio

        job_id = await anyio.to_thread.run_sync(jobs.submit, await body_of(request))
        await anyio.to_thread.run_sync(jobs.wait, job_id, min(max(wait, 0), 300_000) / 1000)
        return await anyio.to_thread.run_sync(found, job_id)

    @app.get("/v2/{endpoint_id}/status/{job_id}", dependencies=[Depends(authorized)])
    def status(endpoint_id: str, job_id: str) -> dict[str, Any]:
        return found(job_id)

    @app.post("/v2/{endpoint_id}/cancel/{job_id}", dependencies=[Depends(authorized)])
    def cancel(endpoint_id: str, job_id: str) -> dict[str, Any]:
        found(job_id)
        return jobs.cancel(job_id) or {}

    @app.get("/v2/{endpoint_id}/health")
    def health(endpoint_id: str) -> dict[str, Any]:
        return {"jobs": jobs.counts(), "workers": {"idle": 0, "running": 1}}

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    return app


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.runpod_api", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="jobs run at once in this process (default 1)")
    p.add_argument("--keep", type=int, default=1000, help="finished jobs kept for /status (default 1000)")
    p.add_argument("--deployment", default=os.environ.get("RUNPOD_API_DEPLOYMENT") or None,
                   help="run jobs as runs of this deployment ('transcribe-audio/transcribe-gpu'; env "
                        "RUNPOD_API_DEPLOYMENT) on its work pool, instead of in this process")
    args = p.parse_args(argv)
    key = os.environ.get("ENDPOINT_API_KEY") or None
    if key is None and not _loopback(args.host):
        p.error(f"refusing to serve on {args.host} without ENDPOINT_API_KEY (anyone could start jobs)")
    import uvicorn

    from deployments.runpod_handler import handler

    if args.deployment:
        jobs: Any = DeploymentJobs(args.deployment, keep=args.keep)
    else:
        jobs = Jobs(lambda job, job_id: handler(job, flow_run_name=job_id), workers=args.workers, keep=args.keep)
    uvicorn.run(create_app(key, jobs), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
