"""RunPod's ``webhook``: when a job ends (COMPLETED, FAILED, CANCELLED), its status body - what
``GET /status/{id}`` answers - is POSTed to the URL the request gave.

The POST goes through the same guard as every fetch a caller chooses
(:func:`speech.io.netguard.session`: public addresses only unless ``ALLOW_PRIVATE_URLS`` /
``FETCH_ALLOW_HOSTS``, each connection pinned to the address checked, no redirects followed),
and is retried by urllib3 on connection errors, 429 and 5xx (3 retries, backoff 1, 2, 4 s) as
RunPod retries a failed delivery; a delivery has :data:`MAX_SECONDS` in all, every attempt
together (a timer shuts its sockets), so a receiver that answers slowly or never cannot hold a
delivery thread. Each caller's deliveries have threads of their own (``LANE`` at once), so one
caller's slow receiver delays only that caller's webhooks. A watcher thread looks at the jobs that
have a webhook every ``every`` seconds. Those not yet delivered are also kept in a
:class:`Journal` on the endpoint's disk, so an endpoint killed (SIGKILL, OOM) and started again
delivers them: the final status of a job that outlived it (``--deployment``, ``--task-workers``:
read back from Prefect), ``FAILED`` for one that died with it (in-process jobs). Delivery is at
least once: a webhook delivered just before a kill may come again.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
FINAL = ("COMPLETED", "FAILED", "CANCELLED")
MAX_SECONDS = 60.0  # one delivery, every attempt together
LANE = 4  # deliveries of one caller at once
LOST = ("the endpoint was restarted before this job finished and no longer knows it (its in-process jobs end with "
        "it): send it again")


def check_webhook(url: Any) -> str:
    """The webhook URL, or :class:`speech.errors.InvalidRequest` when it is not http(s)://host."""
    from speech.errors import InvalidRequest
    from speech.redact import redact_url

    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"webhook must be an http(s) URL, got {redact_url(str(url))[:200]!r}")
    return url


def deliver(url: str, body: dict[str, Any], timeout: float = 30.0, max_seconds: Optional[float] = None) -> bool:
    """POST ``body`` to ``url`` through the SSRF guard, retried by urllib3, within ``max_seconds``
    (default :data:`MAX_SECONDS`) in all; True on a 2xx."""
    from urllib3.util.retry import Retry

    from speech.io import netguard
    from speech.settings import get_settings

    settings = get_settings()
    shown = _origin(url)
    deadline = netguard.Deadline(f"webhook {shown}", settings, max_seconds=max_seconds or MAX_SECONDS)

    class WithinDeadline(Retry):
        def sleep(self, response: Any = None) -> None:  # before each retry: none once the time is spent
            deadline.check()
            super().sleep(response)

    retry = WithinDeadline(total=3, connect=3, read=3, status=3, backoff_factor=1.0, allowed_methods=None,
                           redirect=0, status_forcelist=(429, 500, 502, 503, 504), raise_on_status=False)
    try:
        with deadline, netguard.session(settings, on_socket=deadline.watch, retries=retry) as http:
            reply = http.post(url, json=body, timeout=(settings.http_connect_timeout, timeout), allow_redirects=False)
            deadline.check()  # an answer read after the timer shut the socket is not one
    except Exception as exc:  # noqa: BLE001 - refused, unreachable: logged, the job is unaffected
        why = (f"no answer within {deadline.max_seconds:.0f} s" if deadline.expired else
               type(exc).__name__ if not str(exc) else _without_url(str(exc).splitlines()[0], url)[:200])
        log.warning("webhook %s for job %s not delivered: %s", shown, body.get("id"), why)
        return False
    if not 200 <= reply.status_code < 300:
        log.warning("webhook %s for job %s answered HTTP %d", shown, body.get("id"), reply.status_code)
        return False
    return True


def _origin(url: str) -> str:
    """How a webhook is named in logs: its scheme, host and port only (a webhook's path, like
    Slack's, is often its secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/..."


def _without_url(text: str, url: str) -> str:
    """An error message with the webhook URL's path and query taken out (urllib3 quotes them,
    and a webhook's query or path often carries the receiver's token)."""
    parts = urlsplit(url)
    for leak in (url, parts.path + (f"?{parts.query}" if parts.query else ""), parts.query, parts.path):
        if leak and leak != "/":
            text = text.replace(leak, "...")
    return text


class Journal:
    """The webhooks not yet delivered, on the endpoint's disk (JSON lines, readable by its user
    only; a webhook URL often carries its receiver's token, so it never goes to the Prefect
    database): a line when a job with a webhook is accepted, one when its delivery is made or
    given up; compacted when an endpoint opens it. One endpoint per journal (a lock file)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            import fcntl  # POSIX; elsewhere the journal is not locked

            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"another endpoint is using the webhook journal {path}: give each endpoint on this "
                               "machine its own --state-dir (or port)") from None
        self.pending = self._read()
        fresh = path.with_name(path.name + ".new")
        with os.fdopen(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
            for job_id, (url, caller) in self.pending.items():
                f.write(json.dumps({"job": job_id, "url": url, "caller": caller}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(fresh, path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._write = threading.Lock()

    def _read(self) -> dict[str, tuple[str, str]]:
        pending: dict[str, tuple[str, str]] = {}
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return pending
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if not isinstance(entry, dict) or not isinstance(entry.get("job"), str):
                continue
            if isinstance(entry.get("url"), str):
                pending[entry["job"]] = (entry["url"], str(entry.get("caller") or "default"))
            else:
                pending.pop(entry["job"], None)
        return pending

    def _append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry) + "\n").encode()
        with self._write:
            if self._fd < 0:
                return  # closed
            os.write(self._fd, line)
            getattr(os, "fdatasync", os.fsync)(self._fd)

    def added(self, job_id: str, url: str, caller: str) -> None:
        self._append({"job": job_id, "url": url, "caller": caller})

    def done(self, job_id: str) -> None:
        self._append({"job": job_id})

    def close(self) -> None:
        """Stop writing and let another endpoint open the journal."""
        with self._write:
            if self._fd >= 0:
                os.close(self._fd)
                os.close(self._lock_fd)
                self._fd = self._lock_fd = -1


class Webhooks:
    """Jobs waiting to have their webhook called: ``add(job_id, url, caller)``; a thread watches
    them through ``view(job_id)`` (the job table's status body) and delivers each once it is
    final, on its caller's own delivery threads. With a ``journal`` the webhooks an earlier
    endpoint left undelivered are watched too (a job it no longer knows is delivered ``FAILED``)."""

    def __init__(self, view: Callable[[str], Optional[dict[str, Any]]], every: float = 1.0,
                 journal: Optional[Journal] = None):
        self.view, self.every, self.journal = view, every, journal
        self.pending: dict[str, tuple[str, str]] = dict(journal.pending) if journal else {}  # job -> (url, caller)
        self.restored = set(self.pending)  # left by an earlier endpoint
        self.lock = threading.Lock()
        self.lanes: dict[str, ThreadPoolExecutor] = {}  # caller -> its delivery threads
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self.thread.start()

    def add(self, job_id: str, url: str, caller: str = "default") -> None:
        if self.journal is not None:
            try:
                self.journal.added(job_id, url, caller)
            except OSError:  # a full disk: delivered all the same, unless the endpoint restarts first
                log.warning("could not journal the webhook of job %s", job_id, exc_info=True)
        with self.lock:
            self.pending[job_id] = (url, caller)

    def _loop(self) -> None:
        while not self.stopping.wait(self.every):
            try:
                self.check_once()
            except Exception:  # noqa: BLE001 - the API may be restarting: look again
                log.warning("checking webhook jobs failed", exc_info=True)

    def check_once(self) -> None:
        with self.lock:
            pending = dict(self.pending)
        for job_id, (url, caller) in pending.items():
            view = self.view(job_id)
            if view is None and job_id in self.restored:
                view = {"id": job_id, "status": "FAILED", "error": LOST}
            if view is None or view.get("status") in FINAL:
                with self.lock:
                    self.pending.pop(job_id, None)
                    self.restored.discard(job_id)
                if view is None:
                    self._done(job_id)
                else:
                    self.lane(caller).submit(self._deliver, job_id, url, view)

    def _deliver(self, job_id: str, url: str, view: dict[str, Any]) -> None:
        try:
            deliver(url, view)
        finally:  # delivered or given up: an endpoint started later does not try again
            self._done(job_id)

    def _done(self, job_id: str) -> None:
        if self.journal is not None:
            try:
                self.journal.done(job_id)
            except OSError:  # a full disk: the webhook may come twice, never not at all
                log.warning("could not journal the webhook of job %s as delivered", job_id, exc_info=True)

    def lane(self, caller: str) -> ThreadPoolExecutor:
        """``caller``'s delivery threads (made when first needed; one set per caller key)."""
        with self.lock:
            if caller not in self.lanes:
                self.lanes[caller] = ThreadPoolExecutor(max_workers=LANE, thread_name_prefix=f"webhook-{caller}")
            return self.lanes[caller]
