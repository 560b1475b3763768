"""The CLI's own Prefect API when none is configured, and what a killed CLI run leaves behind.

Prefect's ephemeral mode starts a throw-away API server (uvicorn) and stops it at exit; a CLI
killed with SIGKILL never reaches its exit handlers, so the server lived on (~320 MB, under
PID 1) and the run stayed Running in the database for ever. Here the CLI starts the same server
itself, as a child that the kernel stops when the CLI dies (``PR_SET_PDEATHSIG``), and every run
records its process (``infrastructure_pid``, as Prefect's workers do): the next CLI run against
that database marks runs whose process is gone Crashed.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child between fork and exec (``preexec_fn``): the kernel sends it ``sig`` when the
    process that started it dies, however it dies (SIGKILL included). Set after any change of
    user: a credential change clears it. Not Linux: nothing (the child outlives a killed parent)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


@dataclass
class ThrowawayApi:
    url: str
    process: subprocess.Popen

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the temporary Prefect server did not start within {timeout:.0f} s "
                                   f"(log: {_log_path()})")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _log_path() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home) / "cli-server.log"


def start_throwaway_api() -> ThrowawayApi:
    """Start the server Prefect's ephemeral mode would (same app, database and settings) on a
    free loopback port; it dies with this process. Call :meth:`ThrowawayApi.wait_ready` before use."""
    import prefect
    from prefect.settings import get_current_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    log_path = _log_path()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:  # its shutdown noise goes here, not to the user's terminal
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    return ThrowawayApi(url=f"http://127.0.0.1:{port}/api", process=process)


def process_marker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def record_run_process() -> None:
    """Inside a local flow run (CLI, Python): note this process on the run, as a worker would, so
    a later CLI run can tell the run was abandoned if this process dies without finishing it.
    Inside a deployment run (its worker records its process): end the run if that worker dies
    (:func:`flows.runguard.end_with_starter`)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    if ctx.flow_run.deployment_id is not None:
        from flows.runguard import end_with_starter

        end_with_starter(ctx.flow_run.id)
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(ctx.flow_run.id, infrastructure_pid=process_marker())
    except Exception:  # noqa: BLE001 - bookkeeping must not fail a transcription
        log.debug("could not record the run's process", exc_info=True)


PAGE = 200  # flow runs read per request


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_abandoned_runs(client: Any) -> list[str]:
    """Runs of this machine still Running / Pending whose recorded process is gone: set Crashed.
    Returns their names."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.states import Crashed

    host = socket.gethostname() + ":"
    unfinished = FlowRunFilter(  # runs of no deployment (a worker watches those), every page of them
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["RUNNING", "PENDING", "CANCELLING"])),
        deployment_id=FlowRunFilterDeploymentId(is_null_=True))
    runs: list[Any] = []
    while True:
        page = client.read_flow_runs(flow_run_filter=unfinished, sort=FlowRunSort.ID_DESC, limit=PAGE,
                                     offset=len(runs))
        runs.extend(page)
        if len(page) < PAGE:
            break
    marked = []
    for run in runs:
        marker = run.infrastructure_pid or ""
        if not marker.startswith(host) or run.deployment_id is not None:
            continue
        pid = marker[len(host):]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        client.set_flow_run_state(run.id, Crashed(message=f"its process ({marker}) ended without finishing the "
                                                  "run (killed?); marked by a later CLI, endpoint or handler "
                                                  "process on this machine"), force=True)
        marked.append(run.name)
    return marked


def mark_abandoned_runs_quietly(url: Optional[str] = None) -> None:
    """:func:`mark_abandoned_runs` against the API at ``url`` (default: the configured one), logging
    what it did and never failing."""
    from prefect.client.orchestration import SyncPrefectClient, get_client

    try:
        with (SyncPrefectClient(url) if url else get_client(sync_client=True)) as client:
            marked = mark_abandoned_runs(client)
        if marked:
            log.warning("marked %d abandoned run(s) Crashed: %s", len(marked), ", ".join(marked))
    except Exception:  # noqa: BLE001 - housekeeping only
        log.debug("could not look for abandoned runs", exc_info=True)
