"""Per-word confidence from Deepgram's pre-recorded API, merged onto Whisper's words.

The request goes through the official ``deepgram-sdk`` (imported lazily):
``DeepgramClient(api_key=..., environment=DeepgramClientEnvironment(base=<base url>, ...),
max_retries=..., timeout=...)`` then ``client.listen.v1.media.with_raw_response.transcribe_url(url=...)``
(body ``{"url": ...}``) or ``.transcribe_file(request=<bytes>)`` (raw audio bytes), i.e.
``POST {base}/v1/listen``. ``model`` and ``version`` are the SDK's own keyword arguments and go
in the query string; ``tier`` has no SDK argument in 7.x, so it rides in
``request_options["additional_query_parameters"]`` — also the query string, never the body.

Retries are the SDK's own (``deepgram.core.http_client.HttpClient.request``): on a response of
429, 408, 409 or >= 500, and on connection errors, it retries up to ``max_retries`` times with
exponential backoff (1 s, 2 s, 4 s ... capped at 60 s, ±10 % jitter; a ``Retry-After`` header
wins). 401/403/400 are not retried. Timeouts are not retried by the SDK; they surface as a
``retryable`` ``ConfidenceError`` for the orchestrator.

The base URL is the ``base_url`` argument, else ``DEEPGRAM_BASE_URL`` (self-hosted Deepgram,
proxies), else ``https://api.deepgram.com``. The key is never logged, never put in an
exception message and scrubbed from the response handed back (saved by the caller as
``<stem>.deepgram.json``). SDK exceptions are translated outside their ``except`` block so
nothing holding request objects rides along as ``__context__``.

The merge onto Whisper's words is :mod:`speech.confidence.match`.
"""
from __future__ import annotations

import logging
import math
import mimetypes
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlsplit

import numpy as np
from pydantic import SecretStr

from speech.errors import ConfidenceError, InvalidRequest
from speech.io.decode import write_wav
from speech.output.formats import load_saved_json
from speech.redact import check_base_url, one_line, redact_url, scrub, secret_value
from speech.contracts import DeepgramOptions

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.deepgram.com"


def resolve_base_url(base_url: Optional[str] = None) -> str:
    """Parameter, else ``DEEPGRAM_BASE_URL``, else the public API. A trailing ``/v1`` is dropped
    (the SDK appends ``/v1/listen``)."""
    url = check_base_url(base_url or os.environ.get("DEEPGRAM_BASE_URL") or DEFAULT_BASE_URL,
                         "Deepgram base", "DEEPGRAM_BASE_URL", "DEEPGRAM_API_KEY")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def load_response_json(path: Union[str, Path]) -> dict:
    """A saved ``<stem>.deepgram.json``."""
    return load_saved_json(path, "Deepgram JSON")


def _error_reason(body: Any) -> str:
    """Deepgram's error body: {err_code, err_msg, request_id} (or {message}/{error})."""
    if isinstance(body, dict):
        msg = body.get("err_msg") or body.get("message") or body.get("error") or body.get("reason")
        code = body.get("err_code")
        text = " ".join(str(x) for x in (code, msg) if x)
        return f": {one_line(text, 200)}" if text else ""
    if isinstance(body, str) and body.strip():
        return f": {one_line(body, 200)}"
    return ""


def _translate(exc: BaseException, base_url: str, key: str, max_retries: int) -> ConfidenceError:
    import httpx
    from deepgram.core.api_error import ApiError

    if isinstance(exc, ApiError):
        code = exc.status_code
        body = exc.body
        if code is not None and 200 <= code < 300:
            # the SDK raises ApiError(status 2xx, body=text) when the body is not JSON
            return ConfidenceError(
                f"Deepgram returned malformed JSON (HTTP {code}) from {base_url}/v1/listen: "
                + scrub(one_line(body if isinstance(body, str) else str(body), 120), key)
            )
        reason = scrub(_error_reason(body), key)
        if code in (401, 403):
            what = "rejected the API key" if code == 401 else "refused the request (key lacks permission?)"
            return ConfidenceError(
                f"Deepgram {what} (HTTP {code}){reason}: check DEEPGRAM_API_KEY / --deepgram-api-key"
            )
        if code == 402:
            return ConfidenceError(f"Deepgram refused the request (HTTP 402, account out of credit?){reason}")
        retryable = code is not None and (code in (408, 429) or code >= 500)
        after = f" after {max_retries} retr{'y' if max_retries == 1 else 'ies'}" if retryable else ""
        return ConfidenceError(
            f"Deepgram request failed{after}: HTTP {code} from {base_url}/v1/listen{reason}", retryable=retryable
        )
    if isinstance(exc, httpx.TimeoutException):
        return ConfidenceError(f"Deepgram request to {base_url} timed out ({exc.__class__.__name__})", retryable=True)
    if isinstance(exc, httpx.TransportError):
        return ConfidenceError(f"cannot reach Deepgram at {base_url} ({exc.__class__.__name__})", retryable=True)
    if isinstance(exc, (ValueError, TypeError)):
        return ConfidenceError(f"unexpected response from Deepgram at {base_url} ({exc.__class__.__name__})")
    return ConfidenceError(scrub(f"Deepgram request failed: {exc.__class__.__name__}: {one_line(str(exc), 200)}", key))


def _check_response(data: Any, where: str) -> dict:
    if not isinstance(data, dict):
        raise ConfidenceError(f"Deepgram response from {where} is not a JSON object")
    results = data.get("results")
    if not isinstance(results, dict) or not isinstance(results.get("channels"), list):
        hint = " (a callback request_id only?)" if "request_id" in data and "results" not in data else ""
        raise ConfidenceError(f"Deepgram response from {where} has no results.channels{hint}")
    return data


# ----------------------------------------------------------------------------------
# the request


def deepgram_transcribe(
    *,
    api_key: Union[str, SecretStr, None],
    audio_path: str | None = None,
    url: str | None = None,
    options: DeepgramOptions,
    base_url: str | None = None,
    json_in: str | None = None,
    max_retries: int = 3,
    timeout: float = 600.0,
) -> dict:
    """Deepgram's pre-recorded response for ``url`` (e.g. a presigned GET URL) or the bytes of
    ``audio_path``; or the saved response ``json_in`` (no request made).

    The key falls back to ``DEEPGRAM_API_KEY``. Raises ``InvalidRequest`` for bad parameters
    and ``ConfidenceError`` for a rejected key (401/403), a bad request, a malformed response,
    or network trouble that outlived the SDK's retries (only the last is ``retryable``).
    """
    key = secret_value(api_key)
    if not key:
        from speech.settings import get_settings

        key = secret_value(get_settings().deepgram_api_key)

    if json_in:
        data = _check_response(scrub(load_response_json(json_in), key), Path(json_in).name)
        log.info("Deepgram: using saved response %s (no request made)", Path(json_in).name)
        return data

    if not key:
        raise InvalidRequest("Deepgram API key missing: set DEEPGRAM_API_KEY (or pass --deepgram-api-key)")
    if (url is None) == (audio_path is None):
        raise InvalidRequest("Deepgram needs exactly one of an audio URL or a local audio file")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise InvalidRequest(f"Deepgram max_retries must be a non-negative integer (got {max_retries!r})")
    if url is not None and urlsplit(url).scheme not in ("http", "https"):
        raise InvalidRequest("Deepgram fetches http(s) URLs only; pass a local file or a presigned URL")
    body, content_type = _read_body(audio_path) if audio_path is not None else (None, "")
    base = resolve_base_url(base_url)
    environment, request_options, kwargs = _sdk_options(base, options, max_retries)
    source = redact_url(url) if url is not None else f"{Path(audio_path).name} ({len(body or b'') / 1e6:.1f} MB)"
    log.info("Deepgram: transcribing %s with %s%s%s%s at %s", source, options.model,
             f" tier={options.tier}" if options.tier else "", f" version={options.version}" if options.version else "",
             f" language={options.language}" if options.language else "", base)

    error: Optional[ConfidenceError] = None
    data: Any = None
    try:
        from deepgram import DeepgramClient

        client = DeepgramClient(api_key=key, environment=environment, timeout=timeout, max_retries=max_retries)
        media = client.listen.v1.media.with_raw_response
        if url is not None:
            response = media.transcribe_url(url=url, request_options=request_options, **kwargs)
        else:
            request_options["additional_headers"] = {"content-type": content_type}
            response = media.transcribe_file(request=body, request_options=request_options, **kwargs)
        # the raw JSON as Deepgram sent it (the SDK has parsed it once already, so it is valid)
        raw = getattr(response, "_response", None)
        data = raw.json() if raw is not None else response.data.model_dump(mode="json", by_alias=True, exclude_none=True)
    except Exception as exc:  # noqa: BLE001 - translated below, outside this block
        error = _translate(exc, base, key, max_retries)
    if error is not None:
        raise error

    data = _check_response(scrub(data, key), base)
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    log.info(
        "Deepgram: request %s done, %d words",
        meta.get("request_id", "?"),
        len(deepgram_words(data)),
    )
    return data


def _read_body(audio_path: str) -> tuple[bytes, str]:
    """A local file's bytes and content type for ``transcribe_file``."""
    path = Path(audio_path).expanduser()
    if not path.is_file():
        raise InvalidRequest(f"audio file for Deepgram not found: {path}")
    body = path.read_bytes()
    if not body:
        raise InvalidRequest(f"audio file for Deepgram is empty: {path}")
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return body, "audio/wav" if content_type == "audio/x-wav" else content_type


def _sdk_options(base: str, options: DeepgramOptions, max_retries: int) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The SDK's environment for ``base``, its request options and the model keywords."""
    try:
        from deepgram.environment import DeepgramClientEnvironment
    except ImportError:
        raise ConfidenceError("deepgram-sdk is not installed (pip install deepgram-sdk); needed for word confidence") from None

    ws = "wss" + base[len("https"):] if base.startswith("https") else "ws" + base[len("http"):]
    environment = DeepgramClientEnvironment(base=base, production=ws, agent=ws, agent_rest=base)
    request_options: dict[str, Any] = {"max_retries": max_retries}
    if options.tier:  # no SDK keyword for tier: still a query option
        request_options["additional_query_parameters"] = {"tier": options.tier}
    kwargs: dict[str, Any] = {"model": options.model}
    if options.version:
        kwargs["version"] = options.version
    if options.language:
        kwargs["language"] = options.language
    return environment, request_options, kwargs


# ----------------------------------------------------------------------------------
# the response


def _finite(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def deepgram_words(response: dict) -> list[dict]:
    """``results.channels[0].alternatives[0].words`` as ``[{word, start, end, confidence,
    punctuated_word?}]``, sorted by start. Words without valid times/confidence are dropped."""
    data = _check_response(response, "response")
    channels = data["results"]["channels"]
    if not channels:
        return []
    alternatives = channels[0].get("alternatives") if isinstance(channels[0], dict) else None
    if not isinstance(alternatives, list):
        raise ConfidenceError("Deepgram response: results.channels[0] has no alternatives list")
    if not alternatives:
        return []
    words = alternatives[0].get("words") if isinstance(alternatives[0], dict) else None
    if words is None:
        return []
    if not isinstance(words, list):
        raise ConfidenceError("Deepgram response: results.channels[0].alternatives[0].words is not a list")
    out: list[dict] = []
    dropped = 0
    for w in words:
        if not isinstance(w, dict):
            dropped += 1
            continue
        start, end, conf = _finite(w.get("start")), _finite(w.get("end")), _finite(w.get("confidence"))
        if start is None or end is None or conf is None or end < start:
            dropped += 1
            continue
        item = {"word": str(w.get("word", "")), "start": start, "end": end, "confidence": min(1.0, max(0.0, conf))}
        if w.get("punctuated_word") is not None:
            item["punctuated_word"] = str(w["punctuated_word"])
        if w.get("speaker") is not None:
            item["speaker"] = w["speaker"]
        out.append(item)
    if dropped:
        log.debug("Deepgram: dropped %d malformed words", dropped)
    out.sort(key=lambda d: (d["start"], d["end"]))
    return out


def deepgram_for(audio: Optional[np.ndarray], stem: str, options: DeepgramOptions,
                 api_key: Union[str, SecretStr, None], url: Optional[str] = None, json_in: Optional[str] = None) -> dict:
    """The stage's request: a saved response, else Deepgram fetching ``url`` (a presigned or
    public URL), else the decoded samples sent as a compact 16 kHz PCM WAV."""
    if json_in or url or audio is None:
        return deepgram_transcribe(api_key=api_key, url=None if json_in else url, options=options, json_in=json_in)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / f"{stem}.wav"
        write_wav(np.asarray(audio), wav)
        return deepgram_transcribe(api_key=api_key, audio_path=str(wav), options=options)
