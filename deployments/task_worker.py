"""A warm GPU task worker: serves one file's GPU unit (and whole-file jobs) as Prefect background tasks.

    GPU_TASK_WORKERS=1 on the flow side; here:
    PREFECT_API_URL=http://<server>:4200/api RESULTS_STORAGE_BLOCK=whisperx-task-results \\
        WORKER_MODELS=large-v3:float16 python -m deployments.task_worker [--limit 2] [--preload]

One long-lived process that holds its models (``WORKER_MODELS``, loaded before it takes work
with ``--preload``; the process-wide model cache, bounded by ``MODEL_CACHE_MAX``), so a file
that arrives on its own (UI, API, sweep) pays no import and no model load. It serves:

* ``gpu-stages`` (:func:`flows.gpu.gpu_stages`): one file's transcribe -> align -> diarize ->
  speaker names, for flow runs with ``GPU_TASK_WORKERS=1`` (they only orchestrate);
* ``transcribe-job`` (:func:`flows.jobs.transcribe_job`): a whole file, for the throughput path
  (the RunPod-compatible endpoint's ``--task-workers`` mode, sweeps with ``via: task-workers``).

Requests for a model, compute type, device or thread count it does not serve are refused.
Parameters, results and cache records travel through the shared result storage
(RESULTS_STORAGE or RESULTS_STORAGE_BLOCK, the same for the flows and every worker); the audio
too, once per content. Tokens are the worker's own (HF_TOKEN, Secret blocks): they never travel
as task parameters.

Differences from ``prefect.task_worker.serve`` (which this builds on): the worker takes a run
from the server only when it has a free slot (a run it never acknowledged goes back to the
queue when the worker dies; Prefect's own worker takes one more than it can run), leaves a
claim for each run it takes (``claims/<task run id>``, so whoever waits can tell when the worker
holding it is gone: :mod:`flows.dispatch`), skips runs cancelled or failed while they queued,
and exits when a run is stuck past its deadline where no checkpoint is reached (native code),
so its slot and GPU come back (run it under a supervisor that restarts it: compose, k8s).

Run one per GPU. ``--limit 2`` (the default) takes two files at once: their GPU units take turns,
so one file's download, bookkeeping and uploads overlap the other's GPU work (bench/load.py:
workers busy 0.95 of the time against 0.86 with ``--limit 1``, which works one file at a time in
arrival order).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("deployments.task_worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deployments.task_worker",
                                description="Serve one file's GPU work (and whole-file jobs) to flow runs, the "
                                "RunPod-compatible endpoint and sweeps, as Prefect background tasks.")
    p.add_argument("--limit", type=int, default=2, metavar="N",
                   help="files worked on at once in this process (default 2: their GPU units take turns, one "
                   "file's I/O overlaps the other's GPU work; 1: one file at a time, in arrival order)")
    p.add_argument("--preload", action="store_true",
                   help="load the served Whisper models (WORKER_MODELS) and the VAD before taking work")
    return p


def served_tasks() -> list[Any]:
    """The tasks this worker runs, with the shared result storage the flows use."""
    from flows.gpu import gpu_stages
    from flows.jobs import transcribe_job
    from speech.errors import InvalidRequest
    from tasks.storage import task_result_storage

    storage = task_result_storage()
    if storage is None:
        raise InvalidRequest("a task worker needs the result storage its flows use: set RESULTS_STORAGE "
                             "(s3://bucket/prefix or a shared folder) or RESULTS_STORAGE_BLOCK")
    return [t.with_options(result_storage=storage) for t in (gpu_stages, transcribe_job)]


def preload() -> list[str]:
    """Load every served Whisper model and the VAD; what was loaded, for the start-up line."""
    from speech.asr.serving import served_models
    from speech.asr.vad import get_vad
    from speech.asr.whisper import get_whisper, resolve_model
    from speech.settings import get_settings

    settings = get_settings()
    loaded = []
    for served in served_models(settings):
        get_whisper(resolve_model(served.model, settings), served.device, served.compute_type, settings)
        get_vad(served.device, settings)
        loaded.append(str(served))
    return loaded


def make_worker(tasks: list[Any], limit: int) -> Any:
    """A :class:`prefect.task_worker.TaskWorker` that takes runs only into free slots and claims them."""
    import orjson
    import websockets
    from prefect.client.schemas.objects import TaskRun
    from prefect.client.subscriptions import Subscription
    from prefect.settings import get_current_settings
    from prefect.task_worker import TaskWorker

    from flows.dispatch import CLAIM_BEAT, drop_claim, write_claim
    from tasks.storage import task_result_storage

    storage = task_result_storage()
    held: dict[Any, float] = {}  # task run id -> when this worker claimed it
    held_lock = threading.Lock()  # a beat never rewrites a claim already dropped

    def claim(task_run_id: Any, worker_id: str) -> None:
        with held_lock:  # held first: a claim that could not be written now is written by the next beat
            held[task_run_id] = time.time()
            write_claim(storage, task_run_id, worker_id, held[task_run_id])

    def release(task_run_id: Any) -> None:
        with held_lock:
            held.pop(task_run_id, None)
            drop_claim(storage, task_run_id)

    def beat(worker_id: str) -> None:  # the claims of the runs held here, rewritten while they run
        while True:
            time.sleep(CLAIM_BEAT)
            with held_lock:
                for task_run_id, at in list(held.items()):
                    try:
                        write_claim(storage, task_run_id, worker_id, at)
                    except Exception:  # noqa: BLE001 - the next beat tries again
                        log.warning("could not renew the claim of task run %s", task_run_id, exc_info=True)

    class ClaimingSubscription(Subscription[TaskRun]):
        """Prefect's subscription, acknowledging a run only once it is claimed."""

        def __init__(self, *args: Any, on_receive: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.on_receive = on_receive

        async def __anext__(self) -> TaskRun:
            while True:
                try:
                    await self._ensure_connected()
                    message = await self.websocket.recv()
                    task_run = self.model.model_validate_json(message)
                    await self.on_receive(task_run)
                    await self.websocket.send(orjson.dumps({"type": "ack"}).decode())
                    return task_run
                except (ConnectionRefusedError, websockets.exceptions.ConnectionClosedError):
                    self._websocket = None
                    if hasattr(self._connect, "protocol"):
                        await self._connect.__aexit__(None, None, None)
                    await _sleep(0.5)

    class GpuTaskWorker(TaskWorker):
        async def _subscribe_to_task_scheduling(self) -> None:
            base_url = get_current_settings().api.url
            if base_url is None:
                raise ValueError("PREFECT_API_URL must be set: task workers need a Prefect server")
            subscription = ClaimingSubscription(model=TaskRun, path="/task_runs/subscriptions/scheduled",
                                                keys=self.task_keys, client_id=self.client_id, base_url=base_url,
                                                on_receive=self._claim)
            while True:
                slot = object()
                await self._limiter.acquire_on_behalf_of(slot)  # a free slot before taking a run
                try:
                    task_run = await subscription.__anext__()
                finally:
                    self._limiter.release_on_behalf_of(slot)
                log.info("took task run %s (%s)", task_run.id, task_run.name)
                if await self._acquire_token(task_run.id):
                    self._runs_task_group.start_soon(self._safe_submit_scheduled_task_run, task_run)

        async def _claim(self, task_run: TaskRun) -> None:
            import anyio

            try:
                await anyio.to_thread.run_sync(claim, task_run.id, self.client_id)
            except Exception:  # noqa: BLE001 - the run still runs; only its loss would go unnoticed
                log.warning("could not claim task run %s in the result storage", task_run.id, exc_info=True)

        async def _submit_scheduled_task_run(self, task_run: TaskRun) -> None:
            import anyio

            try:
                current = await self._current_state(task_run.id)
                if current is not None and (current.is_final() or current.type.value == "CANCELLING"):
                    log.info("skipped task run %s: it is %s already", task_run.id, current.name)
                    return
                await super()._submit_scheduled_task_run(task_run)
            finally:
                await anyio.to_thread.run_sync(release, task_run.id)

        async def _current_state(self, task_run_id: Any) -> Any:
            """The run's state now (None if it cannot be read). The server pushes a new run to
            workers before the request that created it has committed: a read at once can answer
            404, so a missing run is read again for ~13 s before it is run anyway (Prefect's engine decides)."""
            from prefect.exceptions import ObjectNotFound

            delay = 0.05
            for _ in range(8):  # 0.05 s doubling: ~13 s in all
                try:
                    return (await self._client.read_task_run(task_run_id)).state
                except ObjectNotFound:
                    await _sleep(delay)
                    delay *= 2
                except Exception:  # noqa: BLE001 - an API hiccup: run it (Prefect's engine reads it too)
                    log.warning("could not read task run %s before running it", task_run_id, exc_info=True)
                    return None
            log.warning("task run %s is not in the API %.0f s after it was sent here: running it anyway",
                        task_run_id, 0.05 * (2 ** 8 - 1))
            return None

    async def _sleep(seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)

    worker = GpuTaskWorker(*tasks, limit=limit)
    threading.Thread(target=beat, args=(worker.client_id,), name="claim-beat", daemon=True).start()
    return worker


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit < 1:
        build_parser().error("--limit must be at least 1")
    # background tasks started outside a flow run (the endpoint's jobs) log to this console
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from prefect.utilities.asyncutils import run_coro_as_sync

    from speech.asr.serving import served_models
    from speech.errors import SpeechError

    try:
        tasks = served_tasks()
        models = preload() if args.preload else [str(s) for s in served_models()]
    except SpeechError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    worker = None

    async def serve() -> None:
        nonlocal worker
        worker = make_worker(tasks, args.limit)
        print(f"serving {', '.join(t.name for t in tasks)} (limit {args.limit}) as {worker.client_id}; "
              f"models: {', '.join(models)}{' (loaded)' if args.preload else ''}", flush=True)
        ready = os.environ.get("WORKER_READY_FILE", "").strip()
        if ready:  # the readiness probe's answer (deployments/health.py): models loaded, serving
            Path(ready).write_text(worker.client_id)
        await worker.astart()

    from flows.runguard import start_watchdog

    start_watchdog()  # a run stuck past its deadline where no check is reached ends this process
    try:
        run_coro_as_sync(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
