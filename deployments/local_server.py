"""A throw-away ``prefect server start`` (SQLite) on 127.0.0.1, as a context manager.

For benchmarks and tests that need what production has, a long-running API server that
workers, deployments and CLI runs talk to, rather than Prefect's per-process ephemeral one::

    with local_prefect_server(Path("/tmp/prefect-home")) as server:
        subprocess.run([...], env=server.env)      # PREFECT_API_URL / PREFECT_HOME point at it

The server runs in its own session (process group) and is stopped with it on exit.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional

from flows.local_api import die_with_parent

ROOT = Path(__file__).resolve().parent.parent

# what a child process must not inherit when it is pointed at this server
_PREFECT_CLIENT_VARS = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE")


@dataclass
class LocalServer:
    url: str  # the API URL, http://127.0.0.1:PORT/api
    env: dict[str, str]  # environment for processes that should use this server
    home: Path
    log_path: Path
    startup_seconds: float = 0.0
    process: Optional[subprocess.Popen] = field(default=None, repr=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGINT the process group (the server and its uvicorn child), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=grace)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def server_env(home: Path, base: Optional[Mapping[str, str]] = None,
               database_url: Optional[str] = None) -> dict[str, str]:
    """``base`` (default os.environ) with its own PREFECT_HOME and database (SQLite in the home
    unless ``database_url`` names another, e.g. :func:`local_postgres`'s), no client settings of
    the caller's, analytics off, and this checkout on PYTHONPATH."""
    env = {k: v for k, v in (base if base is not None else os.environ).items() if k not in _PREFECT_CLIENT_VARS}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url or f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PYTHONPATH=os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
    )
    return env


@contextmanager
def local_prefect_server(home: Path, *, base_env: Optional[Mapping[str, str]] = None,
                         timeout: float = 180, ui: bool = False,
                         database_url: Optional[str] = None, port: Optional[int] = None) -> Iterator[LocalServer]:
    """Start ``prefect server start`` on ``port`` (default a free one) of 127.0.0.1 with ``home``
    as PREFECT_HOME (and ``database_url`` as its database: SQLite in the home by default); yield
    once /api/health answers; raise RuntimeError (with the log tail) if it does not. The same
    home and port again: the same server restarted."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = server_env(home, base_env, database_url)
    env["PREFECT_UI_ENABLED"] = "true" if ui else "false"
    log_path = home / "server.log"
    t0 = time.perf_counter()
    with log_path.open("ab") as log:  # a restart of the same home appends
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent,
        )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not become healthy at {url}; log tail:\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield LocalServer(url=url, env={**env, "PREFECT_API_URL": url}, home=home, log_path=log_path,
                          startup_seconds=round(time.perf_counter() - t0, 3), process=proc)
    finally:
        _flush_logs_to_api()  # this process's queued run logs reach the server before it stops
        stop(proc)


def _flush_logs_to_api() -> None:
    if "prefect.logging.handlers" not in sys.modules:
        return
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception:  # noqa: BLE001 - logs only
        pass


def deploy_to_process_pool(server: LocalServer, pool: str, *flows: object, name: str = "bench",
                           tags: Optional[list[str]] = None, env: Optional[Mapping[str, str]] = None) -> None:
    """Create the process work pool ``pool`` on ``server`` and deploy each flow to it as ``name``,
    its runs working in this checkout (benchmarks that measure what a worker host does), with
    ``tags`` and the extra ``env`` of their processes."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with SyncPrefectClient(server.url) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    job_variables: dict = {"working_dir": str(ROOT), **({"env": dict(env)} if env else {})}
    with temporary_settings({PREFECT_API_URL: server.url}):
        for flow in flows:
            flow.to_deployment(name=name, work_pool_name=pool, job_variables=job_variables, tags=tags).apply()


def start_process_worker(pool: str, env: Mapping[str, str], log_path: Path, limit: int = 1) -> subprocess.Popen:
    """``prefect worker start`` for a process pool, polling every second, in its own session."""
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--limit",
             str(limit)],
            cwd=ROOT, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)


def kill_host(proc: subprocess.Popen) -> int:
    """What a lost machine does to a worker: SIGKILL to it and every process it started, at once,
    none left to report anything. How many processes died."""
    import psutil

    root = psutil.Process(proc.pid)
    procs = [root, *root.children(recursive=True)]
    for child in procs:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    proc.wait(10)
    return len(procs)


def start_task_worker(env: Mapping[str, str], log_path: Path, limit: int = 1,
                      preload: bool = False) -> subprocess.Popen:
    """``python -m deployments.task_worker`` in its own session, logging to ``log_path``."""
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "deployments.task_worker", "--limit", str(limit)] + (["--preload"] if preload else []),
            cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent)


def wait_for_task_workers(url: str, count: int, timeout: float = 180,
                          procs: tuple[subprocess.Popen, ...] = ()) -> set[str]:
    """Until ``count`` task workers are connected to the server at ``url`` (Prefect's registry);
    their client ids. Raises RuntimeError if one of ``procs`` exits or time runs out."""
    import json

    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(f"{url}/task_workers/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            workers = {w["identifier"] for w in json.loads(reply.read())}
        if len(workers) >= count:
            return workers
        dead = [p.pid for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"{len(workers)} of {count} task workers connected" +
                               (f"; exited: {dead}" if dead else " in time"))
        time.sleep(0.5)


def start_endpoint(env: Mapping[str, str], log: Path, key: "str | Mapping[str, str]", *args: str,
                   endpoint_id: str = "bench", port: Optional[int] = None) -> tuple[subprocess.Popen, str]:
    """``python -m deployments.runpod_api [args]`` with ``ENDPOINT_API_KEY=key`` (a mapping: the
    callers' ``ENDPOINT_API_KEYS``, name -> key) on ``port`` of 127.0.0.1 (default a free one),
    dying with this process; returns it and its base URL (``http://127.0.0.1:PORT/v2/<endpoint_id>``)
    once ``/health`` answers."""
    port = port or free_port()
    keys = {"ENDPOINT_API_KEY": key} if isinstance(key, str) else {
        "ENDPOINT_API_KEYS": ",".join(f"{name}:{k}" for name, k in key.items())}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deployments.runpod_api", "--port", str(port), *args],
                                env={**env, **keys}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)
    base = f"http://127.0.0.1:{port}/v2/{endpoint_id}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=5)
            return proc, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the endpoint did not start:\n{log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.5)


def _postgres_bin() -> Optional[Path]:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def ensure_postgres() -> Path:
    """PostgreSQL's binaries: Debian's ``postgresql`` package, installed with apt-get when
    missing (as root; otherwise say what to install)."""
    found = _postgres_bin()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("PostgreSQL is not installed: sudo apt-get install -y postgresql")
    subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, capture_output=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = _postgres_bin()
    if found is None:
        raise RuntimeError("apt-get installed postgresql but no initdb was found under /usr/lib/postgresql")
    return found


class PostgresURL(str):
    """The SQLAlchemy URL of a :func:`local_postgres` server, with where it keeps its files."""

    data_dir: Path
    bindir: Path
    port: int


@contextmanager
def local_postgres(log_statements: bool = False) -> Iterator[PostgresURL]:
    """A PostgreSQL server of its own (as ``infra/docker-compose.yml`` runs one for Prefect): a new
    cluster in a temporary folder, on a free 127.0.0.1 port, trust auth on loopback only, run in
    the foreground as a child that dies with this process (even if it is killed), stopped and
    deleted on exit. Yields the SQLAlchemy URL Prefect takes (asyncpg), with ``data_dir``.
    ``log_statements``: every statement and its bound values go to ``<data_dir>/../server.log``
    (what the database was sent, even what it later overwrote or compressed)."""
    import pwd
    import shutil
    import tempfile

    bindir = ensure_postgres()
    _remove_abandoned_clusters(Path(tempfile.gettempdir()))
    base = Path(tempfile.mkdtemp(prefix="prefect-postgres-"))
    data = base / "data"
    as_db_user: list[str] = []
    account = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: its own user, as Debian's package makes it
        account = pwd.getpwnam("postgres")
        shutil.chown(base, "postgres")
        as_db_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_db_user, *cmd], capture_output=True, text=True, cwd=base)
        if done.returncode:
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")

    def become_db_user() -> None:  # then the parent-death signal, which a change of user would clear
        if account is not None:
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
        die_with_parent(signal.SIGINT)  # PostgreSQL's fast shutdown

    server = None
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "prefect", "--auth=trust", "-E", "UTF8")
        with (base / "server.log").open("wb") as log:
            server = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(base),
                 "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
                 *(["-c", "log_statement=all", "-c", "log_parameter_max_length=-1"] if log_statements else [])],
                cwd=base, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=become_db_user)
        deadline = time.monotonic() + 60
        while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {(base / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
        url = PostgresURL(f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect")
        url.data_dir, url.bindir, url.port = data, bindir, port
        yield url
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(base, ignore_errors=True)


def _remove_abandoned_clusters(tmp: Path) -> None:
    """Clusters :func:`local_postgres` left behind when its process was killed (its server died
    with it, the folder stayed): no server runs on them any more."""
    import shutil

    for base in tmp.glob("prefect-postgres-*"):
        pid_file = base / "data" / "postmaster.pid"
        try:
            if not pid_file.exists() and time.time() - base.stat().st_mtime < 600:
                continue  # being set up right now
            os.kill(int(pid_file.read_text().split()[0]), 0)
            continue  # still serving someone
        except (OSError, ValueError, IndexError):
            shutil.rmtree(base, ignore_errors=True)
