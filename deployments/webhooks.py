"""RunPod's ``webhook``: when a job ends (COMPLETED, FAILED, CANCELLED), its status body - what
``GET /status/{id}`` answers - is POSTed to the URL the request gave.

The POST goes through the same guard as every fetch a caller chooses
(:func:`speech.io.netguard.session`: public addresses only unless ``ALLOW_PRIVATE_URLS`` /
``FETCH_ALLOW_HOSTS``, each connection pinned to the address checked, no redirects followed),
and is retried by urllib3 on connection errors, 429 and 5xx (3 retries, backoff 1, 2, 4 s) as
RunPod retries a failed delivery. A watcher thread looks at the jobs that have a webhook every
``every`` seconds; the list lives in the endpoint's memory (a restart forgets undelivered
webhooks, as it forgets the in-process jobs).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
FINAL = ("COMPLETED", "FAILED", "CANCELLED")


def check_webhook(url: Any) -> str:
    """The webhook URL, or :class:`speech.errors.InvalidRequest` when it is not http(s)://host."""
    from speech.errors import InvalidRequest
    from speech.redact import redact_url

    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"webhook must be an http(s) URL, got {redact_url(str(url))[:200]!r}")
    return url


def deliver(url: str, body: dict[str, Any], timeout: float = 30.0) -> bool:
    """POST ``body`` to ``url`` through the SSRF guard, retried by urllib3; True on a 2xx."""
    from urllib3.util.retry import Retry

    from speech.io import netguard
    from speech.redact import redact_url
    from speech.settings import get_settings

    settings = get_settings()
    retry = Retry(total=3, connect=3, read=3, status=3, backoff_factor=1.0, allowed_methods=None, redirect=0,
                  status_forcelist=(429, 500, 502, 503, 504), raise_on_status=False)
    try:
        with netguard.session(settings, retries=retry) as http:
            reply = http.post(url, json=body, timeout=(settings.http_connect_timeout, timeout), allow_redirects=False)
    except Exception as exc:  # noqa: BLE001 - refused, unreachable: logged, the job is unaffected
        log.warning("webhook %s for job %s not delivered: %s", redact_url(url), body.get("id"), type(exc).__name__
                    if not str(exc) else str(exc).splitlines()[0][:200])
        return False
    if not 200 <= reply.status_code < 300:
        log.warning("webhook %s for job %s answered HTTP %d", redact_url(url), body.get("id"), reply.status_code)
        return False
    return True


class Webhooks:
    """Jobs waiting to have their webhook called: ``add(job_id, url)``; a thread watches them
    through ``view(job_id)`` (the job table's status body) and delivers each once it is final."""

    def __init__(self, view: Callable[[str], Optional[dict[str, Any]]], every: float = 1.0):
        self.view, self.every = view, every
        self.pending: dict[str, str] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook")
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self.thread.start()

    def add(self, job_id: str, url: str) -> None:
        with self.lock:
            self.pending[job_id] = url

    def _loop(self) -> None:
        while not self.stopping.wait(self.every):
            try:
                self.check_once()
            except Exception:  # noqa: BLE001 - the API may be restarting: look again
                log.warning("checking webhook jobs failed", exc_info=True)

    def check_once(self) -> None:
        with self.lock:
            pending = dict(self.pending)
        for job_id, url in pending.items():
            view = self.view(job_id)
            if view is None or view.get("status") in FINAL:
                with self.lock:
                    self.pending.pop(job_id, None)
                if view is not None:
                    self.pool.submit(deliver, url, view)
