"""A RunPod-compatible serverless endpoint backed by Prefect flow runs, so clients of the original
RunPod worker switch by changing one base URL:

    ENDPOINT_API_KEY=... python -m deployments.runpod_api [--host 127.0.0.1] [--port 8000] [--workers 1]

Routes (RunPod's serverless API; ``{endpoint_id}`` is accepted as given):

* ``POST /v2/{endpoint_id}/run`` with ``{"input": {...}}`` -> ``{"id", "status": "IN_QUEUE"}``;
* ``POST /v2/{endpoint_id}/runsync[?wait=MS]`` -> waits up to ``wait`` ms (default 90 000), then
  answers like RunPod: the finished job, or ``{"id", "status": "IN_PROGRESS" | "IN_QUEUE"}``;
* ``GET /v2/{endpoint_id}/status/{id}`` -> ``{"id", "status", "output" | "error", "delayTime",
  "executionTime"}`` (IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED);
* ``POST /v2/{endpoint_id}/cancel/{id}`` -> cancels a queued job (a running one runs on);
* ``GET /v2/{endpoint_id}/health`` -> job counts (no key needed).

Every route but ``/health`` wants ``Authorization: Bearer <ENDPOINT_API_KEY>`` (401 otherwise);
without a key the service only starts on a loopback host. Each job is one ``transcribe-audio``
flow run in this process (named after the job id, so the Prefect UI lists it), through
:func:`deployments.runpod_handler.handler`: ``output`` is exactly what the original worker
returned, a failure is ``FAILED`` with its one-line ``error``. Jobs are kept in memory
(``--keep`` finished jobs, default 1000): a restart forgets them, as RunPod forgets results.
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
        return {"completed": statuses.count("COMPLETED"), "failed": statuses.count("FAILED"),
                "inProgress": statuses.count("IN_PROGRESS"), "inQueue": statuses.count("IN_QUEUE"),
                "cancelled": statuses.count("CANCELLED")}

    def _trim(self) -> None:
        finished = [k for k, s in self.jobs.items() if s["status"] in ("COMPLETED", "FAILED", "CANCELLED")]
        for k in finished[: max(0, len(finished) - self.keep)]:
            self.jobs.pop(k, None)
            self.futures.pop(k, None)


def create_app(api_key: Optional[str], jobs: Jobs) -> Any:
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
        job_id = jobs.submit(await body_of(request))
        return {"id": job_id, "status": "IN_QUEUE"}

    @app.post("/v2/{endpoint_id}/runsync", dependencies=[Depends(authorized)])
    async def runsync(endpoint_id: str, request: Request, wait: int = DEFAULT_WAIT_MS) -> dict[str, Any]:
        import anyio

        job_id = jobs.submit(await body_of(request))
        await anyio.to_thread.run_sync(jobs.wait, job_id, min(max(wait, 0), 300_000) / 1000)
        return found(job_id)

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
    args = p.parse_args(argv)
    key = os.environ.get("ENDPOINT_API_KEY") or None
    if key is None and not _loopback(args.host):
        p.error(f"refusing to serve on {args.host} without ENDPOINT_API_KEY (anyone could start jobs)")
    import uvicorn

    from deployments.runpod_handler import handler

    jobs = Jobs(lambda job, job_id: handler(job, flow_run_name=job_id), workers=args.workers, keep=args.keep)
    uvicorn.run(create_app(key, jobs), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
