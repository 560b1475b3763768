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

The merge (``annotate``) is pure Python: each Whisper word gets one Deepgram word (one-to-one)
by time, its ``confidence`` set; segments get the average and a ``low``/``high`` flag; runs of
low-confidence words become ``unclear_intervals``.
"""
from __future__ import annotations

import json
import logging
import math
import mimetypes
import os
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr

from speech.formats import load_saved_json
from speech.errors import ConfidenceError, InvalidRequest
from speech.schema import Segment

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.deepgram.com"
MATCH_TOLERANCE = 0.12  # s: a Deepgram word overlapping the Whisper word widened by this much is a candidate
MIDPOINT_MAX_DIST = 1.0  # s: the nearest-midpoint fallback never reaches further than this
_REDACTED = "***"


class DeepgramOptions(BaseModel):
    """Deepgram model options, sent as query parameters (and part of the stage's cache key)."""

    model: str = Field("nova-3", min_length=1, description="Deepgram model, e.g. nova-3, nova-2.")
    tier: Optional[str] = Field(None, description="Model tier (older models, e.g. enhanced/base).")
    version: Optional[str] = Field(None, description="Model version, e.g. latest.")
    language: Optional[str] = Field(
        None, description="Spoken language (BCP-47, e.g. en, de); the pipeline sends the transcript's language, "
        "since Deepgram otherwise assumes English and its word confidences would be for the wrong language.")


# ----------------------------------------------------------------------------------
# helpers


def _one_line(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scrub(value: Any, key: str) -> Any:
    """A copy of a JSON value with every occurrence of the key replaced."""
    if not key:
        return value
    if isinstance(value, str):
        return value.replace(key, _REDACTED)
    if isinstance(value, dict):
        return {_scrub(k, key): _scrub(v, key) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, key) for v in value]
    return value


def _secret(value: Union[str, SecretStr, None]) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return (value or "").strip()


def _shown_url(url: str) -> str:
    """A URL safe to log: no query string (presigned signatures), no credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def resolve_base_url(base_url: Optional[str] = None) -> str:
    """Parameter, else ``DEEPGRAM_BASE_URL``, else the public API. A trailing ``/v1`` is dropped
    (the SDK appends ``/v1/listen``)."""
    url = (base_url or os.environ.get("DEEPGRAM_BASE_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        shown = _shown_url(url) if parts.scheme else "<not a URL>"
        raise InvalidRequest(
            f"invalid Deepgram base URL {shown!r}: expected http(s)://host[:port][/path] (DEEPGRAM_BASE_URL)"
        )
    if parts.username or parts.password:
        raise InvalidRequest("Deepgram base URL must not carry credentials; the key goes in DEEPGRAM_API_KEY")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def load_response_json(path: Union[str, Path]) -> dict:
    """A saved ``<stem>.deepgram.json``."""
    return load_saved_json(path, "Deepgram JSON")


def _error_reason(body: Any) -> str:
    """Deepgram's error body: {err_code, err_msg, request_id} (or {message}/{error})."""
    if isinstance(body, dict):
        msg = body.get("err_msg") or body.get("message") or body.get("error") or body.get("reason")
        code = body.get("err_code")
        text = " ".join(str(x) for x in (code, msg) if x)
        return f": {_one_line(text, 200)}" if text else ""
    if isinstance(body, str) and body.strip():
        return f": {_one_line(body, 200)}"
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
                + _scrub(_one_line(body if isinstance(body, str) else str(body), 120), key)
            )
        reason = _scrub(_error_reason(body), key)
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
    return ConfidenceError(_scrub(f"Deepgram request failed: {exc.__class__.__name__}: {_one_line(str(exc), 200)}", key))


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
    key = _secret(api_key)
    if not key:
        from speech.settings import get_settings

        key = _secret(get_settings().deepgram_api_key)

    if json_in:
        data = _check_response(_scrub(load_response_json(json_in), key), Path(json_in).name)
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
    body: Optional[bytes] = None
    content_type = "application/octet-stream"
    if audio_path is not None:
        path = Path(audio_path).expanduser()
        if not path.is_file():
            raise InvalidRequest(f"audio file for Deepgram not found: {path}")
        body = path.read_bytes()
        if not body:
            raise InvalidRequest(f"audio file for Deepgram is empty: {path}")
        content_type = mimetypes.guess_type(path.name)[0] or content_type
        if content_type == "audio/x-wav":
            content_type = "audio/wav"
    base = resolve_base_url(base_url)

    try:
        from deepgram import DeepgramClient
        from deepgram.environment import DeepgramClientEnvironment
    except ImportError:
        raise ConfidenceError("deepgram-sdk is not installed (pip install deepgram-sdk); needed for word confidence") from None

    ws = "wss" + base[len("https"):] if base.startswith("https") else "ws" + base[len("http"):]
    environment = DeepgramClientEnvironment(base=base, production=ws, agent=ws, agent_rest=base)
    query: dict[str, Any] = {}
    if options.tier:
        query["tier"] = options.tier  # no SDK keyword for tier: still a query option
    request_options: dict[str, Any] = {"max_retries": max_retries}
    if query:
        request_options["additional_query_parameters"] = query
    kwargs: dict[str, Any] = {"model": options.model}
    if options.version:
        kwargs["version"] = options.version
    if options.language:
        kwargs["language"] = options.language

    source = _shown_url(url) if url is not None else f"{Path(audio_path).name} ({len(body or b'') / 1e6:.1f} MB)"
    log.info(
        "Deepgram: transcribing %s with %s%s%s%s at %s",
        source,
        options.model,
        f" tier={options.tier}" if options.tier else "",
        f" version={options.version}" if options.version else "",
        f" language={options.language}" if options.language else "",
        base,
    )

    error: Optional[ConfidenceError] = None
    data: Any = None
    try:
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

    data = _check_response(_scrub(data, key), base)
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    log.info(
        "Deepgram: request %s done, %d words",
        meta.get("request_id", "?"),
        len(deepgram_words(data)),
    )
    return data


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


# ----------------------------------------------------------------------------------
# the merge


def match_words(
    whisper: list[tuple[float, float]],
    dg: list[tuple[float, float]],
    *,
    tolerance: float = MATCH_TOLERANCE,
    max_mid_dist: float = MIDPOINT_MAX_DIST,
) -> list[Optional[int]]:
    """One-to-one matching of Whisper word intervals to Deepgram word intervals.

    Pass 1: pairs whose intervals overlap once the Whisper word is widened by ``tolerance`` on
    each side, best first (largest real overlap, then nearest midpoints). Pass 2 (the
    fallback, for Whisper words still unmatched): the nearest midpoint among the Deepgram words
    still free, up to ``max_mid_dist`` seconds away. Greedy over all pairs, so each Deepgram
    word is used at most once. Returns, per Whisper word, the Deepgram index or None.
    """
    result: list[Optional[int]] = [None] * len(whisper)
    used: set[int] = set()
    mids = [(s + e) / 2 for s, e in dg]
    pairs = []
    for i, (ws, we) in enumerate(whisper):
        wm = (ws + we) / 2
        for j, (ds, de) in enumerate(dg):
            if ds < we + tolerance and de > ws - tolerance:
                overlap = min(we, de) - max(ws, ds)  # negative: a gap within the tolerance
                pairs.append((-overlap, abs(wm - mids[j]), i, j))
    for _, _, i, j in sorted(pairs):
        if result[i] is None and j not in used:
            result[i] = j
            used.add(j)
    pairs = []
    for i, (ws, we) in enumerate(whisper):
        if result[i] is not None:
            continue
        wm = (ws + we) / 2
        for j in range(len(dg)):
            if j not in used and abs(wm - mids[j]) <= max_mid_dist:
                pairs.append((abs(wm - mids[j]), i, j))
    for _, i, j in sorted(pairs):
        if result[i] is None and j not in used:
            result[i] = j
            used.add(j)
    return result


def _runs(items: list[tuple[float, float, bool, Any]], join_gap: float) -> list[list[int]]:
    """Indices of runs of low items (flag True) of one key, consecutive gaps <= join_gap.

    ``items`` are (start, end, is_low, key) in time order, matched words only: a matched
    word that is not low ends a run.
    """
    runs: list[list[int]] = []
    cur: list[int] = []
    for k, (start, end, low, key) in enumerate(items):
        if not low:
            if cur:
                runs.append(cur)
            cur = []
            continue
        if cur:
            prev = items[cur[-1]]
            if key != prev[3] or start - prev[1] > join_gap + 1e-9:
                runs.append(cur)
                cur = []
        cur.append(k)
    if cur:
        runs.append(cur)
    return runs


def annotate(
    segments: list[Segment],
    dg_words: list[dict],
    low: float = 0.6,
    high: float = 0.85,
    min_low_dur: float = 0.5,
    join_gap: float = 0.3,
    *,
    model: Optional[str] = None,
) -> tuple[list[Segment], dict, list[dict]]:
    """Set each Whisper word's ``confidence`` from its Deepgram match, each segment's
    ``confidence`` (average of its matched words) and ``confidence_flag``:

    * ``"low"`` if the average < ``low``, or a run of contiguous low-confidence (< ``low``)
      words of at least ``min_low_dur`` seconds (first start to last end; consecutive low words
      at most ``join_gap`` apart; a matched word at or above ``low`` ends the run, an unmatched
      word does not);
    * ``"high"`` if the average >= ``high``;
    * ``None`` otherwise (between the thresholds), and for a segment with no matched word.

    Returns copies of the segments, a summary ``{mean, low_words, matched, unmatched,
    whisper_words, deepgram_words, low_segments, high_segments, thresholds, model?}`` and
    ``unclear_intervals`` ``[{start, end, speaker?, text}]``: runs of low-confidence words of
    one speaker (the word's, else its segment's) with gaps <= ``join_gap``, across segments.
    """
    segs = [s.model_copy(deep=True) for s in segments]
    refs: list[tuple[int, int]] = []  # (segment index, word index) of timed Whisper words
    intervals: list[tuple[float, float]] = []
    n_words = 0
    for si, seg in enumerate(segs):
        for wi, w in enumerate(seg.words or []):
            n_words += 1
            w.confidence = None
            if w.start is not None and w.end is not None and math.isfinite(w.start) and math.isfinite(w.end):
                refs.append((si, wi))
                intervals.append((w.start, max(w.end, w.start)))
    dg = [(float(d["start"]), float(d["end"])) for d in dg_words]
    match = match_words(intervals, dg)
    for (si, wi), j in zip(refs, match):
        if j is not None:
            segs[si].words[wi].confidence = round(float(dg_words[j]["confidence"]), 4)

    low_segments = high_segments = 0
    for seg in segs:
        items = [(w.start, w.end, w.confidence < low, None) for w in seg.words or [] if w.confidence is not None]
        if not items:
            seg.confidence = None
            seg.confidence_flag = None
            continue
        items.sort(key=lambda t: (t[0], t[1]))
        avg = sum(w.confidence for w in seg.words if w.confidence is not None) / len(items)
        seg.confidence = round(avg, 4)
        longest = max((items[r[-1]][1] - items[r[0]][0] for r in _runs(items, join_gap)), default=0.0)
        if avg < low or longest >= min_low_dur - 1e-9:
            seg.confidence_flag = "low"
            low_segments += 1
        elif avg >= high:
            seg.confidence_flag = "high"
            high_segments += 1
        else:
            seg.confidence_flag = None

    # unclear intervals, across segments, in time order
    words = []
    for seg in segs:
        for w in seg.words or []:
            if w.confidence is not None:
                words.append((w.start, w.end, w.confidence < low, w.speaker or seg.speaker, w.word))
    words.sort(key=lambda t: (t[0], t[1]))
    unclear: list[dict] = []
    for run in _runs([t[:4] for t in words], join_gap):
        first, last = words[run[0]], words[run[-1]]
        item: dict[str, Any] = {"start": round(first[0], 3), "end": round(last[1], 3)}
        if first[3] is not None:
            item["speaker"] = first[3]
        item["text"] = " ".join(words[k][4].strip() for k in run).strip()
        unclear.append(item)

    confs = [w.confidence for s in segs for w in s.words or [] if w.confidence is not None]
    matched = len(confs)
    summary: dict[str, Any] = {
        "mean": round(sum(confs) / matched, 4) if matched else None,
        "low_words": sum(1 for c in confs if c < low),
        "matched": matched,
        "unmatched": n_words - matched,
        "whisper_words": n_words,
        "deepgram_words": len(dg_words),
        "low_segments": low_segments,
        "high_segments": high_segments,
        "thresholds": {"low": low, "high": high, "min_low_dur": min_low_dur, "join_gap": join_gap},
    }
    if model:
        summary["model"] = model
    return segs, summary, unclear
