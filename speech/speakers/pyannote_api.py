"""Hosted diarization through pyannoteAI, using the official ``pyannoteai-sdk``.

The SDK does the work: ``Client(token)`` checks the key (``GET /v1/test``), ``upload`` puts the
local file in pyannoteAI's temporary storage (``POST /v1/media/input`` for a presigned URL,
then ``PUT`` of the bytes) and returns a ``media://`` URL, ``diarize`` submits the job
(``POST /v1/diarize``) and ``retrieve`` polls ``GET /v1/jobs/{id}`` until the job is
succeeded, failed or canceled.

Three things the SDK (0.4.0) does not offer are added by a thin subclass (and a pass-through
for the SDK module's ``requests``), not by re-implementing its HTTP calls:

* a configurable base URL: ``Client.API_URL`` is a class constant that ``__init__`` already
  uses (the key check), so the subclass sets it on the instance before ``Client.__init__``;
* per-request timeouts: the SDK calls ``requests.get/post/put`` with no ``timeout``, so a server
  (the API, or the storage behind the presigned upload URL) that accepts the connection and
  never answers would hang the run forever. The SDK module's ``requests`` is replaced by a
  pass-through (:class:`_TimedRequests`) that, while one of our client's calls runs in this
  thread (a context variable), adds ``timeout=(HTTP_CONNECT_TIMEOUT, HTTP_READ_TIMEOUT)``, each
  clipped to what is left of the overall deadline; calls outside our client are unchanged;
* one overall deadline, ``timeout``, from the key check on: upload, submit and polling included.
  ``retrieve`` loops forever while the job is pending/running; the subclass hooks
  ``_authenticated_get`` (the one call the SDK's loop makes per poll) and raises once the
  deadline has passed and the job is still not finished. The SDK sleeps ``every_seconds``
  between polls, so the wait can exceed ``timeout`` by at most one poll interval (plus one
  request). A request never waits past the deadline for a connection or for the server's next
  bytes; a server that keeps trickling bytes is bounded per read only.

The API key is never logged, never put in an exception message, and scrubbed from the job
JSON handed back (which the caller saves as ``<stem>.pyannote.job.json``). SDK and
``requests`` exceptions are translated outside their ``except`` block, so the originals (whose
request objects carry the ``Authorization`` header) are not chained onto ours.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Optional, Union, get_args
from urllib.parse import urlsplit

import numpy as np
from pydantic import SecretStr

from speech.errors import DiarizationError, InvalidRequest
from speech.io.decode import write_wav
from speech.output.formats import load_saved_json
from speech.redact import check_base_url, one_line, scrub, secret_value
from speech.contracts import DiarizationOutcome, DiarizeParams, Turn
from speech.schema import PyannoteModel, check_speaker_counts
from speech.settings import get_settings

log = logging.getLogger(__name__)

MODELS = get_args(PyannoteModel)
DEFAULT_API_URL = "https://api.pyannote.ai/v1"
_TERMINAL = ("succeeded", "failed", "canceled")


def resolve_api_url(base_url: Optional[str] = None) -> str:
    """Parameter, else ``PYANNOTE_API_URL``, else the public API; a bare host gets ``/v1``."""
    url = check_base_url(base_url or get_settings().pyannote_api_url or DEFAULT_API_URL,
                         "pyannoteAI API", "PYANNOTE_API_URL", "PYANNOTE_API_KEY")
    return url if urlsplit(url).path else url + "/v1"


def _validate(model, num_speakers, min_speakers, max_speakers, poll_interval, timeout) -> None:
    if model not in MODELS:
        raise InvalidRequest(f"pyannote model must be one of {', '.join(MODELS)} (got {model!r})")
    try:
        check_speaker_counts(num_speakers, min_speakers, max_speakers)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    for name, value in (("pyannote poll interval", poll_interval), ("pyannote timeout", timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidRequest(f"{name} must be a positive number of seconds (got {value!r})")


# ----------------------------------------------------------------------------------
# job output -> turns


def turns_from_job(job: dict, *, exclusive: bool = False) -> list[Turn]:
    """Speaker turns of a succeeded diarization job (full job JSON, or just its ``output``)."""
    if not isinstance(job, dict):
        raise DiarizationError("pyannoteAI job JSON is not an object")
    job_id = job.get("jobId", "?")
    status = job.get("status")
    if status is not None and status != "succeeded":
        error = (job.get("output") or {}).get("error") if isinstance(job.get("output"), dict) else None
        reason = f": {one_line(error)}" if error else ""
        raise DiarizationError(f"pyannoteAI job {job_id} is {status}, not succeeded{reason}")
    output = job.get("output") if ("output" in job or "status" in job) else job
    if not isinstance(output, dict):
        raise DiarizationError(f"pyannoteAI job {job_id} has no output")
    field = "diarization"
    if exclusive:
        if isinstance(output.get("exclusiveDiarization"), list):
            field = "exclusiveDiarization"
        else:
            log.warning("pyannoteAI job %s has no exclusiveDiarization output; using diarization", job_id)
    items = output.get(field)
    if not isinstance(items, list):
        raise DiarizationError(f"pyannoteAI job {job_id} output has no '{field}' list")
    turns: list[Turn] = []
    dropped = 0
    for i, item in enumerate(items):
        try:
            start, end, speaker = float(item["start"]), float(item["end"]), item["speaker"]
        except (KeyError, TypeError, ValueError):
            raise DiarizationError(
                f"pyannoteAI job {job_id}: {field}[{i}] is malformed (expected start, end, speaker)"
            ) from None
        if speaker is None or str(speaker) == "":
            raise DiarizationError(f"pyannoteAI job {job_id}: {field}[{i}] has no speaker label")
        if not (math.isfinite(start) and math.isfinite(end)) or end <= start or end <= 0:
            dropped += 1
            continue
        turns.append(Turn(start=max(0.0, start), end=end, speaker=str(speaker)))
    if dropped:
        log.debug("pyannoteAI job %s: dropped %d empty or invalid turns", job_id, dropped)
    turns.sort(key=lambda t: (t.start, t.end, t.speaker))
    return turns


def load_job_json(path: Union[str, Path]) -> dict:
    """A saved ``<stem>.pyannote.job.json``."""
    return load_saved_json(path, "pyannote job JSON")


# ----------------------------------------------------------------------------------
# the SDK client


class _JobTimeout(Exception):
    def __init__(self, status: Optional[str]):
        super().__init__(status)
        self.status = status


class _OutOfTime(Exception):
    """The overall deadline passed before a request could be sent."""


class _Budget:
    """One call's time limits: the overall deadline (``timeout``, from before the key check) and
    the settings' per-request (connect, read) timeouts, clipped to what is left of it."""

    def __init__(self, timeout: float):
        settings = get_settings()
        self.total = timeout
        self.deadline = time.monotonic() + timeout
        self.connect = settings.http_connect_timeout
        self.read = settings.http_read_timeout
        self.clipped = (False, False)  # whether the last request's (connect, read) was cut short

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def request_timeout(self) -> tuple[float, float]:
        left = self.left()
        if left <= 0:
            raise _OutOfTime()
        self.clipped = (left < self.connect, left < self.read)
        return min(self.connect, left), min(self.read, left)


# the budget of the _Client call running in this thread (None: the SDK used by anything else)
_active_budget: contextvars.ContextVar[Optional[_Budget]] = contextvars.ContextVar("pyannote_budget", default=None)


class _TimedRequests:
    """Stands in for ``requests`` inside ``pyannoteai.sdk.client``: ``get``/``post``/``put`` made
    during one of our client's calls get ``timeout=``; everything else is ``requests`` itself."""

    def __init__(self, real: types.ModuleType):
        self._real = real

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def _timed(self, method: str, *args, **kwargs):
        budget = _active_budget.get()
        if budget is not None and kwargs.get("timeout") is None:
            kwargs["timeout"] = budget.request_timeout()
        return getattr(self._real, method)(*args, **kwargs)

    def get(self, *args, **kwargs):
        return self._timed("get", *args, **kwargs)

    def post(self, *args, **kwargs):
        return self._timed("post", *args, **kwargs)

    def put(self, *args, **kwargs):
        return self._timed("put", *args, **kwargs)


_client_cls = None


def _client_class():
    """``pyannoteai.sdk.Client`` with an instance base URL and a poll deadline (imported lazily)."""
    global _client_cls
    # The SDK warns on every upload (temporary storage) and every retrieve (polling instead of
    # webhooks); we log those facts ourselves. Re-added per call (idempotent) in case something
    # reset the filters since.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pyannoteai\.sdk")
    if _client_cls is not None:
        return _client_cls
    try:
        from pyannoteai.sdk import Client
        from pyannoteai.sdk import client as sdk_module
    except ImportError:
        raise DiarizationError(
            "pyannoteai-sdk is not installed (pip install pyannoteai-sdk); needed for diarization_backend=pyannote-api"
        ) from None
    sdk_requests = getattr(sdk_module, "requests", None)
    if isinstance(sdk_requests, types.ModuleType):
        sdk_module.requests = _TimedRequests(sdk_requests)
    elif not isinstance(sdk_requests, _TimedRequests):  # an SDK whose requests we cannot time out
        raise DiarizationError("this pyannoteai-sdk version is not supported (pip install pyannoteai-sdk==0.4.0)")

    class _Client(Client):
        def __init__(self, token: str, api_url: str, budget: _Budget):
            self.API_URL = api_url  # Client.__init__ already calls GET {API_URL}/test
            self.budget = budget
            self.stage = "key check"
            self.job_id: Optional[str] = None
            self.last_status: Optional[str] = None
            super().__init__(token=token)

        @contextlib.contextmanager
        def _timed(self):
            token = _active_budget.set(self.budget)
            try:
                yield
            finally:
                _active_budget.reset(token)

        def _overdue(self, polling: bool) -> bool:
            """A poll of a job known to be going, past the deadline."""
            return polling and self.last_status not in (None, *_TERMINAL) and self.budget.left() <= 0

        def _authenticated_get(self, route: str):
            polling = route.startswith("/jobs/")
            if self._overdue(polling):
                raise _JobTimeout(self.last_status)  # the deadline passed while the SDK slept
            try:
                with self._timed():
                    response = super()._authenticated_get(route)
            except Exception:
                if self._overdue(polling):  # the deadline ran out during the poll (cut to what was
                    raise _JobTimeout(self.last_status) from None  # left): the job was still going
                raise
            if polling:
                status = response.json().get("status")
                if status != self.last_status:
                    log.info("pyannoteAI job %s: %s", self.job_id, status)
                    self.last_status = status
                if status not in _TERMINAL and self.budget.left() <= 0:
                    raise _JobTimeout(status)
            return response

        def _authenticated_post(self, route: str, json: Optional[dict] = None):
            with self._timed():
                return super()._authenticated_post(route, json=json)

        def upload(self, audio, media_url=None, callback=None):  # its presigned PUT is plain requests.put
            with self._timed():
                return super().upload(audio, media_url=media_url, callback=callback)

    _client_cls = _Client
    return _client_cls


def _http_reason(response) -> str:
    """A short server-side reason from an error response body (ApiError {message})."""
    try:
        body = response.json()
        message = (body.get("message") or body.get("error")) if isinstance(body, dict) else None
    except ValueError:
        message = None
    return f": {one_line(message, 200)}" if message else ""


def _timeout_in(exc: BaseException) -> Optional[str]:
    """Which of the request's timeouts ran out behind ``exc``: ``"connect"``, ``"read"`` or None.

    The SDK re-raises a connect timeout as a bare ``ConnectionError`` (the original is its
    context). urllib3 sends the request under the connect timeout and reports a stalled send as
    "Connection aborted" around a bare socket ``TimeoutError``; the read timeout, for the answer,
    comes as ``ReadTimeout``."""
    import requests

    seen: set[int] = set()
    todo: list = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, requests.ConnectTimeout):
            return "connect"
        if isinstance(e, requests.Timeout):
            return "read"
        if isinstance(e, TimeoutError):  # not under a requests.Timeout: the send stalled
            return "connect"
        todo.extend((e.__cause__, e.__context__, *e.args))
    return None


def _translate(exc: BaseException, client, api_url: str, budget: _Budget, key: str) -> DiarizationError:
    import requests

    from pyannoteai.sdk.client import PyannoteAICanceledJob, PyannoteAIFailedJob

    stage = getattr(client, "stage", "key check")
    job_id = getattr(client, "job_id", None)
    where = f"pyannoteAI {stage}"
    timeout = budget.total
    target = "pyannoteAI storage" if stage == "upload" else api_url

    if isinstance(exc, _JobTimeout):
        return DiarizationError(
            f"pyannoteAI job {job_id} did not finish within {timeout:g} s (still {exc.status}); "
            "raise the pyannote timeout or try again later"
        )
    if isinstance(exc, PyannoteAIFailedJob):
        reason = one_line(exc.args[0]) if exc.args else "no reason given"
        return DiarizationError(scrub(f"pyannoteAI job {job_id} failed: {reason}", key))
    if isinstance(exc, PyannoteAICanceledJob):
        reason = one_line(exc.args[0]) if exc.args else "no reason given"
        return DiarizationError(scrub(f"pyannoteAI job {job_id} was canceled: {reason}", key))
    if isinstance(exc, requests.HTTPError):
        response = exc.response
        code = response.status_code if response is not None else None
        # Client._raise_for_status raises a bare HTTPError (no response) for 401
        if (code == 401 and stage != "upload") or (response is None and "authenticate" in str(exc)):
            return DiarizationError(
                "pyannoteAI API rejected the API key (401 Unauthorized): check PYANNOTE_API_KEY"
            )
        if code is None:
            return DiarizationError(f"{where} failed: HTTP error", retryable=True)
        reason = scrub(_http_reason(response), key) if stage != "upload" else ""
        target = "pyannoteAI storage" if stage == "upload" else urlsplit(response.url or "").path
        text = f"{where} failed: HTTP {code} {response.reason or ''} from {target}{reason}".replace("  ", " ")
        if code == 402:
            text += " (account out of credit?)"
        return DiarizationError(text, retryable=code in (408, 425, 429) or code >= 500)
    kind = _timeout_in(exc) if isinstance(exc, (requests.ConnectionError, requests.Timeout)) else None
    if isinstance(exc, _OutOfTime) or (kind and budget.clipped[kind == "read"]):
        # the overall deadline: the time the request gave pyannoteAI is spent (not retried)
        return DiarizationError(f"{where} failed: {target} did not answer within {timeout:g} s (pyannote timeout)")
    if kind:
        seconds, setting = (budget.connect, "HTTP_CONNECT_TIMEOUT") if kind == "connect" else (
            budget.read, "HTTP_READ_TIMEOUT")
        return DiarizationError(f"{where} failed: {target} did not answer within {seconds:g} s ({setting})",
                                retryable=True)
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return DiarizationError(f"{where} failed: cannot reach {target} ({exc.__class__.__name__})", retryable=True)
    if isinstance(exc, (ValueError, KeyError, TypeError)):  # non-JSON body, missing jobId/url/status
        return DiarizationError(f"{where} failed: unexpected response from {api_url} ({exc.__class__.__name__})")
    return DiarizationError(scrub(f"{where} failed: {exc.__class__.__name__}: {one_line(str(exc), 200)}", key))


# ----------------------------------------------------------------------------------
# entry point

_DEFAULTS = DiarizeParams()  # the request's defaults, not copies


def diarize_pyannote_api(
    audio_path: str,
    api_key: Union[str, SecretStr, None],
    *,
    model: str = _DEFAULTS.pyannote_model,
    exclusive: bool = _DEFAULTS.pyannote_exclusive,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    poll_interval: float = _DEFAULTS.pyannote_poll_interval,
    timeout: float = _DEFAULTS.pyannote_timeout,
    base_url: str | None = None,
    json_in: str | None = None,
) -> DiarizationOutcome:
    """Diarize ``audio_path`` with the hosted pyannoteAI API, or parse a saved job (``json_in``).

    The key falls back to ``PYANNOTE_API_KEY``; the base URL to ``PYANNOTE_API_URL``, then
    ``https://api.pyannote.ai/v1``. ``exclusive`` asks for (and uses) the exclusive diarization,
    one speaker at a time. ``timeout`` bounds the whole call (key check, upload, submit, polling);
    each request also gives up after ``HTTP_CONNECT_TIMEOUT``/``HTTP_READ_TIMEOUT``. Raises
    ``InvalidRequest`` for bad parameters and ``DiarizationError`` for a rejected key, a
    failed/canceled job, ``timeout`` running out, or network trouble, a request unanswered within
    the HTTP timeouts included (only the last is ``retryable``).
    """
    _validate(model, num_speakers, min_speakers, max_speakers, poll_interval, timeout)
    key = secret_value(api_key) or secret_value(get_settings().pyannote_api_key)

    if json_in:
        job = scrub(load_job_json(json_in), key)
        turns = turns_from_job(job, exclusive=exclusive)
        log.info("pyannoteAI: %d turns from saved job %s (no request made)", len(turns), Path(json_in).name)
        return DiarizationOutcome(turns=turns, backend="pyannote-api", job=job)

    if not key:
        raise InvalidRequest("pyannoteAI API key missing: set PYANNOTE_API_KEY (or pass --pyannote-api-key)")
    path = Path(audio_path).expanduser()
    if not path.is_file():
        raise InvalidRequest(f"audio file for pyannoteAI not found: {path}")
    api_url = resolve_api_url(base_url)
    cls = _client_class()

    client = None
    job = None
    error: Optional[DiarizationError] = None
    budget = _Budget(timeout)  # upload, submit and polling, all within ``timeout``
    try:
        client = cls(key, api_url, budget)
        client.stage = "upload"
        size_mb = os.path.getsize(path) / 1e6
        log.info("pyannoteAI: uploading %s (%.1f MB) to temporary storage at %s", path.name, size_mb, api_url)
        media_url = client.upload(str(path))
        client.stage = "submit"
        client.job_id = client.diarize(
            media_url,
            num_speakers=num_speakers,
            min_speakers=min_speakers,
            max_speakers=max_speakers,
            exclusive=exclusive,
            model=model,
        )
        log.info("pyannoteAI: submitted job %s (model=%s, exclusive=%s)", client.job_id, model, exclusive)
        client.stage = "poll"
        job = client.retrieve(client.job_id, every_seconds=min(poll_interval, timeout))
    except Exception as exc:  # noqa: BLE001 - translated below, outside this block
        error = _translate(exc, client, api_url, budget, key)
    if error is not None:
        # raised here, not in the except block: the SDK's exception (whose request holds the
        # Authorization header) must not ride along as __context__
        raise error

    job = scrub(job, key)
    turns = turns_from_job(job, exclusive=exclusive)
    log.info(
        "pyannoteAI job %s succeeded: %d turns, %d speakers",
        job.get("jobId", client.job_id),
        len(turns),
        len({t.speaker for t in turns}),
    )
    return DiarizationOutcome(turns=turns, backend="pyannote-api", job=job)


def diarize_hosted(audio: Optional[np.ndarray], params: DiarizeParams, api_key: Union[str, SecretStr, None],
                   stem: str = "audio") -> DiarizationOutcome:
    """The stage's hosted backend: the decoded samples go up as a compact 16 kHz PCM WAV,
    whatever the source format (no samples and no upload when a saved job is reused)."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / f"{stem}.wav"
        if not params.pyannote_json_in:
            write_wav(audio, wav)
        return diarize_pyannote_api(
            str(wav), api_key, model=params.pyannote_model, exclusive=params.pyannote_exclusive,
            num_speakers=params.num_speakers, min_speakers=params.min_speakers, max_speakers=params.max_speakers,
            poll_interval=params.pyannote_poll_interval, timeout=params.pyannote_timeout,
            json_in=params.pyannote_json_in,
        )
