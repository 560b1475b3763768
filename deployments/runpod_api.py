"""A RunPod-compatible serverless endpoint backed by Prefect flow runs, so clients of the original
RunPod worker switch by changing one base URL:

    ENDPOINT_API_KEY=... python -m deployments.runpod_api [--host 127.0.0.1] [--port 8000] [--workers 1]
    ENDPOINT_API_KEY=... python -m deployments.runpod_api --deployment transcribe-audio/transcribe-gpu
    ENDPOINT_API_KEY=... python -m deployments.runpod_api --task-workers      # the throughput path

Routes (RunPod's serverless API; ``{endpoint_id}`` is accepted as given):

* ``POST /v2/{endpoint_id}/run`` with ``{"input": {...}}`` -> ``{"id", "status": "IN_QUEUE"}``;
* ``POST /v2/{endpoint_id}/runsync[?wait=MS]`` -> waits up to ``wait`` ms (default 90 000), then
  answers like RunPod: the finished job, or ``{"id", "status": "IN_PROGRESS" | "IN_QUEUE"}``;
* ``GET /v2/{endpoint_id}/status/{id}`` -> ``{"id", "status", "output" | "error", "delayTime",
  "executionTime"}`` (IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED);
* ``POST /v2/{endpoint_id}/cancel/{id}`` -> cancels a queued job, and with ``--deployment`` or
  ``--task-workers`` a running one too;
* ``GET /v2/{endpoint_id}/stream/{id}`` -> ``{"id", "status", "stream": [...]}``: the handler is
  not a generator, so no chunk until the job ends, then its output as one chunk, once;
* ``POST /v2/{endpoint_id}/purge-queue`` -> cancels every queued job of the caller's: ``{"removed", "status"}``;
* ``GET /v2/{endpoint_id}/health`` -> job counts (no key needed).

A request's ``webhook`` (an http(s) URL) receives a POST of the job's final status body when it
completes, fails or is cancelled, through the SSRF guard, retried with backoff, and kept on this
machine's disk until then (``--state-dir``), so an endpoint killed and started again on the same
port still delivers it (:mod:`deployments.webhooks`).

At most ``--max-queued`` jobs (default 1000) wait for a worker: beyond, ``/run`` and
``/runsync`` answer 429 with ``Retry-After`` and submit nothing, so a caller who outruns the
workers cannot exhaust this process's (or the Prefect server's) memory for everyone else.

Every route but ``/health`` wants ``Authorization: Bearer <key>`` (401 otherwise): the one
``ENDPOINT_API_KEY``, or one of ``ENDPOINT_API_KEYS`` (``name:key,...``: callers who do not trust
each other, each seeing, cancelling and purging only its own jobs, each with its share of the
queue, ``--max-queued-per-caller``; :mod:`deployments.callers`); without a key the service only
starts on a loopback host. ``output`` is exactly what the
original worker returned, a failure is ``FAILED`` with its one-line ``error``.

Without ``--deployment`` (:class:`Jobs`) each job is one ``transcribe-audio`` flow run in this
process (named after the job id, so the Prefect UI lists it), through
:func:`deployments.runpod_handler.handler`; jobs are kept in memory (``--keep`` finished jobs,
default 1000): a restart forgets them, as RunPod forgets results. With ``--deployment``
(:class:`DeploymentJobs`) each job is a run of that deployment on its work pool: the job id is
the flow run id and everything is read back from the Prefect API; several callers take turns on
the pool (``--turns-ahead``, :mod:`deployments.turns`). With ``--task-workers``
(:class:`TaskJobs`) each job is one background task run on warm task workers, no process per
job (the throughput path); the job id is the task run id. See :mod:`deployments.runpod_jobs` and
:mod:`deployments.runpod_task_jobs`.
"""
# no "from __future__ import annotations": FastAPI reads the route functions' annotations at runtime

import argparse
import contextlib
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from deployments.callers import DEFAULT, Callers, s3_sources_closed, share
from deployments.runpod_jobs import FINAL, MAX_QUEUED, DeploymentJobs, Jobs, QueueFull  # noqa: F401 - job tables
from deployments.turns import AHEAD
from deployments.runpod_task_jobs import TaskJobs  # noqa: F401 - the throughput path's job table

DEFAULT_WAIT_MS = 90_000


MAX_DEPTH = 32  # JSON nesting a request may have (a job's input is 3 levels deep)
BODY_SECONDS = 30.0  # a request body must arrive within this (a body dripped byte by byte holds a connection)
HEAD_SECONDS = 10.0  # a connection's request line and headers must arrive within this (uvicorn sets no limit)
RETRY_AFTER_S = 5  # what a 429 (queue full) tells the caller to wait
MAX_CONNECTIONS = 1000  # open connections served at once (--max-connections); 503 beyond
MAX_WAITS = MAX_CONNECTIONS // 2  # runsync calls of one caller parked at once (a caller's share: main)


def head_deadline_protocol() -> type:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with a deadline on each
    request's head: a connection that sends nothing, or drips its headers, is closed after
    :data:`HEAD_SECONDS` (uvicorn times only idle keep-alive connections, so idle sockets would
    hold ``--max-connections`` slots and everyone else would get 503)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # no httptools
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeadDeadline(base):  # type: ignore[misc, valid-type]
        _head_timer = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not None and not self.cycle.response_complete:
                self._head_timer.cancel()  # a request's head arrived: its body has BODY_SECONDS
                self._head_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets the same time

        def connection_lost(self, exc: Optional[Exception]) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(HEAD_SECONDS, self._late)

        def _late(self) -> None:
            self._head_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline


def json_depth(raw: bytes) -> int:
    """How deeply ``raw`` JSON nests arrays and objects (strings skipped), without parsing it:
    a deep body is refused before a recursive parser sees it."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _loopback_name(host: str) -> bool:
    """A Host header value (``name[:port]``) that names this machine's loopback."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    return name == "localhost" or _loopback(name)


def create_app(keys: "Callers | str | None", jobs: Any, loopback: bool = True,
               max_bytes: Optional[int] = None, max_waits: int = MAX_WAITS, journal: Any = None,
               lifespan: Any = None) -> Any:
    """The FastAPI application (RunPod's routes over ``jobs``). Every request meets the edge
    rules: ``Authorization`` naming one of the callers' ``keys`` (a string: the one caller
    ``default``; None: no key, one caller), each job seen only by the caller who sent it; a JSON
    body (``Content-Type: application/json``, at most ``MAX_REQUEST_BYTES``, nested at most
    :data:`MAX_DEPTH` deep), and on a ``loopback`` bind a
    loopback ``Host`` and no foreign ``Origin`` (so no web page the operator opens can drive it:
    CSRF, DNS rebinding). Bad input is a 4xx with one line, never a 500. At most ``max_waits``
    ``runsync`` calls of one caller wait at once (each holds a connection); beyond, ``runsync``
    answers at once with the job's status, as after its wait, and the caller polls ``/status``.
    Webhooks not yet delivered are kept in ``journal`` (:class:`deployments.webhooks.Journal`) when
    one is given."""
    import asyncio

    import anyio
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    from speech.settings import get_settings

    from deployments.webhooks import Webhooks, check_webhook
    from speech.errors import SpeechError

    callers = (Callers({DEFAULT: keys}) if isinstance(keys, str) else keys) if keys else None  # "": no key
    shared_names_refused = callers is not None and len(callers) > 1  # one caller's output_name, another's file
    limit = max_bytes or get_settings().max_request_bytes
    app = FastAPI(title="whisperx-prefect (RunPod-compatible)", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.jobs, app.state.max_waits = jobs, max_waits
    webhooks = Webhooks(jobs.view, journal=journal)
    streamed: set[str] = set()  # jobs whose one stream chunk (the output) was handed out

    def same_machine(request: Request) -> None:
        if not loopback:
            return
        if not _loopback_name(request.headers.get("host", "")):
            raise HTTPException(status_code=403, detail="this endpoint serves loopback only: the Host header must "
                                "name 127.0.0.1, [::1] or localhost")
        origin = request.headers.get("origin")
        if origin is not None and not _loopback_name(origin.split("://", 1)[-1]):
            raise HTTPException(status_code=403, detail=f"requests from web pages ({origin}) are not served")

    def authorized(request: Request) -> str:
        """The caller the request's key belongs to (401 for none)."""
        same_machine(request)
        if callers is None:
            return DEFAULT
        given = request.headers.get("authorization", "")
        caller = callers.who(given[7:] if given.lower().startswith("bearer ") else given)
        if caller is None:
            raise HTTPException(status_code=401, detail="Unauthorized")
        return caller

    async def body_of(request: Request) -> dict[str, Any]:
        import json

        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise HTTPException(status_code=415, detail="the body must be JSON (Content-Type: application/json)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPException(status_code=413, detail=f"the body is larger than {limit} bytes (MAX_REQUEST_BYTES)")
        raw = bytearray()
        try:
            with anyio.fail_after(BODY_SECONDS):
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > limit:
                        raise HTTPException(status_code=413,
                                            detail=f"the body is larger than {limit} bytes (MAX_REQUEST_BYTES)")
        except TimeoutError:
            raise HTTPException(status_code=408, detail=f"the body did not arrive within {BODY_SECONDS:.0f} s") from None
        if json_depth(bytes(raw)) > MAX_DEPTH:
            raise HTTPException(status_code=400, detail=f"the body nests deeper than {MAX_DEPTH} levels")
        try:
            body = json.loads(bytes(raw))
        except ValueError:  # not JSON, not UTF-8
            raise HTTPException(status_code=400, detail="the body must be JSON: {\"input\": {...}}") from None
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            raise HTTPException(status_code=400, detail="the body must be {\"input\": {...}}")
        if shared_names_refused and body["input"].get("output_name"):
            raise HTTPException(status_code=400, detail="output_name asks for outputs every caller of this endpoint "
                                "could replace; with a key per caller (ENDPOINT_API_KEYS) each job's outputs are its "
                                "own: leave output_name out and read the keys the job returns")
        if body.get("webhook") is not None:
            try:
                check_webhook(body["webhook"])
            except SpeechError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from None
        return {k: body[k] for k in ("input", "webhook", "policy") if k in body}

    async def submit(body: dict[str, Any], caller: str) -> str:
        try:
            job_id = await anyio.to_thread.run_sync(jobs.submit, body, caller)
        except QueueFull as exc:  # RunPod's answer to a caller that outruns the workers
            raise HTTPException(status_code=429, detail=str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        if body.get("webhook"):
            await anyio.to_thread.run_sync(webhooks.add, job_id, body["webhook"], caller)  # journaled: a disk write
        return job_id

    async def view_of(job_id: str, caller: str) -> dict[str, Any]:
        if getattr(jobs, "reads_api", True):  # a look at the Prefect API: briefly on a thread
            return await anyio.to_thread.run_sync(found, job_id, caller)
        return found(job_id, caller)

    waiting: dict[str, int] = {}  # caller -> its runsync calls parked now

    async def parked(job_id: str, caller: str, seconds: float) -> dict[str, Any]:
        """The job's view once it is final or ``seconds`` have passed, looking every 0.05 s growing
        to the table's poll interval: a parked wait holds no thread, so /health and other calls
        answer whatever the number of waiting callers."""
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + seconds, 0.05
        while True:
            view = await view_of(job_id, caller)
            left = deadline - loop.time()
            if view["status"] in FINAL or left <= 0:
                return view
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, getattr(jobs, "poll", 0.5))

    def found(job_id: str, caller: str) -> dict[str, Any]:
        """The job's view; 404 for an unknown id and for another caller's job alike."""
        view = jobs.view(job_id, caller)
        if view is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id}")
        return view

    @app.post("/v2/{endpoint_id}/run")
    async def run(endpoint_id: str, request: Request, caller: str = Depends(authorized)) -> dict[str, Any]:
        job_id = await submit(await body_of(request), caller)
        return {"id": job_id, "status": "IN_QUEUE"}

    @app.post("/v2/{endpoint_id}/runsync")
    async def runsync(endpoint_id: str, request: Request, wait: int = DEFAULT_WAIT_MS,
                      caller: str = Depends(authorized)) -> dict[str, Any]:
        job_id = await submit(await body_of(request), caller)
        if waiting.get(caller, 0) >= max_waits:  # its share of the connections is taken: no wait
            return await view_of(job_id, caller)
        waiting[caller] = waiting.get(caller, 0) + 1
        try:
            return await parked(job_id, caller, min(max(wait, 0), 300_000) / 1000)
        finally:
            waiting[caller] -= 1

    @app.get("/v2/{endpoint_id}/status/{job_id}")
    def status(endpoint_id: str, job_id: str, caller: str = Depends(authorized)) -> dict[str, Any]:
        return found(job_id, caller)

    @app.post("/v2/{endpoint_id}/cancel/{job_id}")
    def cancel(endpoint_id: str, job_id: str, caller: str = Depends(authorized)) -> dict[str, Any]:
        found(job_id, caller)
        return jobs.cancel(job_id, caller) or {}

    @app.get("/v2/{endpoint_id}/stream/{job_id}")
    def stream(endpoint_id: str, job_id: str, caller: str = Depends(authorized)) -> dict[str, Any]:
        """RunPod's /stream for a handler that is not a generator: no chunk until the job ends,
        then its output as the one chunk, once."""
        view = found(job_id, caller)
        out = {"id": job_id, "status": view["status"], "stream": []}
        if view["status"] == "COMPLETED" and job_id not in streamed:
            streamed.add(job_id)
            out["stream"] = [{"output": view.get("output")}]
        if "error" in view:
            out["error"] = view["error"]
        return out

    @app.post("/v2/{endpoint_id}/purge-queue")
    def purge_queue(endpoint_id: str, caller: str = Depends(authorized)) -> dict[str, Any]:
        """Cancels the caller's own queued jobs, not anyone else's."""
        return {"removed": jobs.purge(caller), "status": "completed"}

    @app.get("/v2/{endpoint_id}/health", dependencies=[Depends(same_machine)])
    def health(endpoint_id: str) -> dict[str, Any]:
        return {"jobs": jobs.counts(), "workers": {"idle": 0, "running": 1}}

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()) or "request"
        return JSONResponse({"error": f"invalid {where}"}, status_code=400)

    return app


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextlib.asynccontextmanager
async def _watched(app: Any) -> AsyncIterator[None]:
    """The in-process endpoint, once serving: a job stuck past its deadline in a stage that never
    returns would hold its slot for ever, so the process ends instead (``WATCHDOG_EXIT``, the job
    Failed, the others in flight Crashed) and its supervisor starts it again."""
    from flows.runguard import fail_stuck_flow_runs, start_watchdog

    start_watchdog(before_exit=fail_stuck_flow_runs)
    yield


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.runpod_api", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="jobs run at once in this process (default 1)")
    p.add_argument("--keep", type=int, default=1000, help="finished jobs kept for /status (default 1000)")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help="open connections served at once; more get 503 (default 1000)")
    p.add_argument("--max-queued", type=int, default=MAX_QUEUED,
                   help=f"jobs waiting for a worker; /run and /runsync answer 429 beyond (default {MAX_QUEUED})")
    p.add_argument("--max-queued-per-caller", type=int, default=None,
                   help="jobs of one caller (one key of ENDPOINT_API_KEYS) waiting for a worker; 429 beyond "
                        "(default: --max-queued divided by the number of callers)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--deployment", default=os.environ.get("RUNPOD_API_DEPLOYMENT") or None,
                       help="run jobs as runs of this deployment ('transcribe-audio/transcribe-gpu'; env "
                            "RUNPOD_API_DEPLOYMENT) on its work pool, instead of in this process")
    where.add_argument("--task-workers", action="store_true",
                       help="hand each job to warm task workers (python -m deployments.task_worker) as a background "
                            "task: no process per job; needs PREFECT_API_URL and the workers' RESULTS_STORAGE")
    p.add_argument("--turns-ahead", type=int, default=AHEAD,
                   help="--deployment with several callers: jobs released to the work pool ahead of its workers, the "
                        "rest held for their caller's turn (default 2; the pool's worker slots leave none idle; 0: "
                        "first come, first served)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where webhooks not yet delivered are kept (webhooks-<port>.jsonl), so a restarted endpoint "
                        "delivers them (default <SPEECH_CACHE_DIR>/endpoint)")
    args = p.parse_args(argv)
    if args.max_queued < 1 or (args.max_queued_per_caller is not None and args.max_queued_per_caller < 1):
        p.error("--max-queued and --max-queued-per-caller must be at least 1")
    if args.turns_ahead < 0:
        p.error("--turns-ahead must be 0 or more")
    try:
        callers = Callers.from_env()
    except ValueError as exc:
        p.error(str(exc))
    if callers is None and not _loopback(args.host):
        p.error(f"refusing to serve on {args.host} without ENDPOINT_API_KEY, ENDPOINT_API_KEYS or "
                "ENDPOINT_API_KEYS_FILE (anyone could start jobs)")
    per_caller = args.max_queued_per_caller or share(args.max_queued, len(callers) if callers else 1)
    if s3_sources_closed(callers):
        print("several callers and no ALLOW_S3_SOURCES: s3:// sources are refused (set ALLOW_S3_SOURCES to the "
              "bucket/prefix roots callers may read with the workers' credentials)", file=sys.stderr)
    import uvicorn

    from deployments.runpod_handler import handler

    from deployments.webhooks import Journal
    from speech.settings import get_settings

    state_dir = args.state_dir or get_settings().cache_dir / "endpoint"
    try:
        journal = Journal(state_dir / f"webhooks-{args.port}.jsonl")
    except (OSError, RuntimeError) as exc:
        p.error(f"webhook journal: {exc}")
    if journal.pending:
        print(f"{len(journal.pending)} webhook(s) an earlier endpoint left undelivered: delivering them as their jobs "
              "end", file=sys.stderr)
    bounds = dict(keep=args.keep, max_queued=args.max_queued, per_caller=per_caller)
    if args.task_workers:
        jobs: Any = TaskJobs(**bounds)
    elif args.deployment:
        jobs = DeploymentJobs(args.deployment, **bounds, callers=callers.keys if callers else (),
                              ahead=args.turns_ahead)
        if jobs.turns is not None:
            jobs.turns.start()  # also releases the held runs an earlier endpoint left
    else:
        from flows.local_api import mark_abandoned_runs_quietly

        mark_abandoned_runs_quietly()  # runs a killed endpoint on this machine left Running: Crashed
        jobs = Jobs(lambda job, job_id: handler(job, flow_run_name=job_id), workers=args.workers, **bounds)
    # each caller may park runsync calls on at most half its share of the connections: the rest
    # stay free for its other calls, and no caller's waits take the connections of another
    max_waits = max(1, args.max_connections // (2 * (len(callers) if callers else 1)))
    app = create_app(callers, jobs, loopback=_loopback(args.host), max_waits=max_waits, journal=journal,
                     lifespan=None if args.task_workers or args.deployment else _watched)
    try:
        uvicorn.run(app, host=args.host, port=args.port, http=head_deadline_protocol(), log_level="info",
                    limit_concurrency=args.max_connections)
    finally:
        journal.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
