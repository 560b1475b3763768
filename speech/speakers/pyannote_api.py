"""Hosted diarization through pyannoteAI, using the official ``pyannoteai-sdk``.

The SDK does the work: ``Client(token)`` checks the key (``GET /v1/test``), ``upload`` puts the
local file in pyannoteAI's temporary storage (``POST /v1/media/input`` for a presigned URL,
then ``PUT`` of the bytes) and returns a ``media://`` URL, ``diarize`` submits the job
(``POST /v1/diarize``) and ``retrieve`` polls ``GET /v1/jobs/{id}`` until the job is
succeeded, failed or canceled.

Two things the SDK (0.4.0) does not offer are added by a thin subclass, not by re-implementing
its HTTP calls:

* a configurable base URL: ``Client.API_URL`` is a class constant that ``__init__`` already
  uses (the key check), so the subclass sets it on the instance before ``Client.__init__``;
* a timeout: ``retrieve`` loops forever while the job is pending/running. The subclass hooks
  ``_authenticated_get`` (the one call the SDK's loop makes per poll) and raises once the
  deadline has passed and the job is still not finished. The SDK sleeps ``every_seconds``
  between polls, so the wait can exceed ``timeout`` by at most one poll interval (plus one
  request). The SDK sets no per-request socket timeout either; a server that accepts the
  connection and never answers is not covered by ``timeout``.

The API key is never logged, never put in an exception message, and scrubbed from the job
JSON handed back (which the caller saves as ``<stem>.pyannote.job.json``). SDK and
``requests`` exceptions are translated outside their ``except`` block, so the originals (whose
request objects carry the ``Authorization`` header) are not chained onto ours.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
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
from speech.schema import DiarizationOutcome, DiarizeParams, PyannoteModel, Turn, check_speaker_counts
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
    except ImportError:
        raise DiarizationError(
            "pyannoteai-sdk is not installed (pip install pyannoteai-sdk); needed for diarization_backend=pyannote-api"
        ) from None

    class _Client(Client):
        def __init__(self, token: str, api_url: str):
            self.API_URL = api_url  # Client.__init__ already calls GET {API_URL}/test
            self.deadline: Optional[float] = None
            self.stage = "key check"
            self.job_id: Optional[str] = None
            self.last_status: Optional[str] = None
            super().__init__(token=token)

        def _authenticated_get(self, route: str):
            response = super()._authenticated_get(route)
            if route.startswith("/jobs/"):
                status = response.json().get("status")
                if status != self.last_status:
                    log.info("pyannoteAI job %s: %s", self.job_id, status)
                    self.last_status = status
                if status not in _TERMINAL and self.deadline is not None and time.monotonic() >= self.deadline:
                    raise _JobTimeout(status)
            return response

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


def _translate(exc: BaseException, client, api_url: str, timeout: float, key: str) -> DiarizationError:
    import requests

    from pyannoteai.sdk.client import PyannoteAICanceledJob, PyannoteAIFailedJob

    stage = getattr(client, "stage", "key check")
    job_id = getattr(client, "job_id", None)
    where = f"pyannoteAI {stage}"

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
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        target = "pyannoteAI storage" if stage == "upload" else api_url
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
    one speaker at a time. Raises ``InvalidRequest`` for bad parameters and ``DiarizationError``
    for a rejected key, a failed/canceled job, a timeout or network trouble (only the last is
    ``retryable``).
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
    try:
        client = cls(key, api_url)
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
        client.deadline = time.monotonic() + timeout
        job = client.retrieve(client.job_id, every_seconds=min(poll_interval, timeout))
    except Exception as exc:  # noqa: BLE001 - translated below, outside this block
        error = _translate(exc, client, api_url, timeout, key)
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
