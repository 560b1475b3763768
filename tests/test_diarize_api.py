"""Hosted pyannoteAI diarization: the real pyannoteai-sdk against a loopback server.

The server speaks the endpoints pyannoteai-sdk 0.4.0 calls (see pyannoteai/sdk/client.py):
  GET  /v1/test                 key check, run by ``Client.__init__`` (api_key setter)
  POST /v1/media/input          {"url": "media://..."} -> {"url": presigned}  (``upload``)
  PUT  <presigned>              the audio bytes, no Authorization            (``upload``)
  POST /v1/diarize              {"url", "model", "numSpeakers", ..., "exclusive"} -> {"jobId"}
  GET  /v1/jobs/{id}            pending -> running -> succeeded|failed       (``retrieve``)
Every /v1 route answers 401 unless ``Authorization: Bearer <key>`` matches.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import pytest

from conftest import DATA
from pyannote_stub import EXCLUSIVE, KEY, OVERLAPPED, PyannoteServer, _State
from speech.errors import DiarizationError, InvalidRequest
from speech.contracts import DiarizationOutcome, Turn
from speech.speakers.pyannote_api import diarize_pyannote_api, resolve_api_url

AUDIO = DATA / "heldout_3spk.wav"
FAST = dict(poll_interval=0.01, timeout=5.0)


@pytest.fixture(scope="module")
def _server():
    with PyannoteServer() as server:
        yield server


@pytest.fixture
def api(_server) -> _State:
    """The server's state, reset for each test."""
    return _server.reset()


def _call(api: _State, **kw) -> DiarizationOutcome:
    kw = {**FAST, **kw}
    return diarize_pyannote_api(str(AUDIO), kw.pop("api_key", KEY), base_url=api.base, **kw)


@pytest.fixture
def http_timeouts(monkeypatch):
    """Set the project's HTTP (connect, read) timeouts (HTTP_CONNECT_TIMEOUT, HTTP_READ_TIMEOUT)."""
    from speech.settings import get_settings

    def set_(connect: float, read: float) -> None:
        monkeypatch.setenv("HTTP_CONNECT_TIMEOUT", str(connect))
        monkeypatch.setenv("HTTP_READ_TIMEOUT", str(read))
        get_settings.cache_clear()

    yield set_
    get_settings.cache_clear()


def _within(seconds: float, fn) -> tuple[BaseException | None, float]:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) when it is still running after
    ``seconds``. Returns what it raised (None when it returned) and how long it took."""
    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call was still waiting after {seconds} s"
    return box.get("error"), time.monotonic() - t0


def _no_key_in(exc: BaseException) -> None:
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # ours and anything chained onto it
        seen.add(id(e))
        assert KEY not in str(e) and KEY not in repr(e) and KEY not in repr(e.args)
        e = e.__cause__ or e.__context__


def test_success_parses_turns_and_returns_job(api, caplog):
    caplog.set_level(logging.DEBUG)
    result = _call(api, num_speakers=3)
    assert [t.model_dump() for t in result.turns] == OVERLAPPED
    assert len({t.speaker for t in result.turns}) == 3
    assert result.job["status"] == "succeeded"
    assert result.job["output"]["diarization"] == OVERLAPPED
    assert KEY not in json.dumps(result.job)
    assert KEY not in caplog.text
    # the SDK's documented sequence, every API call authenticated
    methods = [m + " " + p.split("?")[0].rsplit("/", 1)[0] for m, p in api.requests]
    assert methods == [
        "GET /v1", "POST /v1/media", "PUT /presigned", "POST /v1",
        "GET /v1/jobs", "GET /v1/jobs", "GET /v1/jobs",
    ]
    assert all(api.auth_ok)
    (uploaded,) = api.uploads.values()
    assert uploaded == AUDIO.read_bytes()
    (job,) = api.jobs.values()
    assert job["request"]["model"] == "precision-2"
    assert job["request"]["numSpeakers"] == 3 and job["request"]["exclusive"] is False
    assert job["polls"] == 3  # pending -> running -> succeeded


def test_exclusive_uses_exclusive_output(api):
    result = _call(api, exclusive=True, model="community-1", min_speakers=2, max_speakers=4)
    assert [t.model_dump() for t in result.turns] == EXCLUSIVE
    assert all(a.end <= b.start for a, b in zip(result.turns, result.turns[1:]))
    (job,) = api.jobs.values()
    assert job["request"]["exclusive"] is True and job["request"]["model"] == "community-1"
    assert (job["request"]["minSpeakers"], job["request"]["maxSpeakers"]) == (2, 4)


def test_failed_job_is_a_clear_error(api):
    api.scenario = "fail"
    with pytest.raises(DiarizationError) as info:
        _call(api)
    msg = str(info.value)
    (job_id,) = api.jobs
    assert msg == f"pyannoteAI job {job_id} failed: audio file could not be decoded"
    assert not info.value.retryable
    _no_key_in(info.value)


def test_timeout_when_job_stays_running(api):
    api.scenario = "hang"
    t0 = time.monotonic()
    with pytest.raises(DiarizationError) as info:
        _call(api, poll_interval=0.02, timeout=0.3)
    elapsed = time.monotonic() - t0
    assert "did not finish within 0.3 s (still running)" in str(info.value)
    assert not info.value.retryable
    assert 0.3 <= elapsed < 3.0
    (job,) = api.jobs.values()
    assert job["polls"] >= 3  # it really polled until the deadline


def test_timeout_during_a_slow_poll_of_a_running_job(api):
    """The deadline runs out while a poll waits for its answer (a slow API, or a busy machine):
    the job was known to be running, and the error says so, as when the deadline passes between
    polls (it was "did not answer", and which one came depended on the machine's load)."""
    api.scenario, api.poll_delay = "hang", 2.0
    t0 = time.monotonic()
    with pytest.raises(DiarizationError) as info:
        _call(api, poll_interval=0.02, timeout=0.5)
    assert "did not finish within 0.5 s (still pending)" in str(info.value)
    assert not info.value.retryable
    assert 0.5 <= time.monotonic() - t0 < 1.9  # the poll was cut at the deadline, not waited for
    (job,) = api.jobs.values()
    assert job["polls"] == 2  # pending, then the poll the deadline cut


@pytest.mark.parametrize("stage, target", [("submit", "API"), ("upload", "storage")])
@pytest.mark.parametrize("connect, read, timeout, limit, retryable", [
    (30, 30, 1.0, "1 s (pyannote timeout)", False),  # the whole call gives up, well before the read timeout
    (5, 0.4, 60.0, "0.4 s (HTTP_READ_TIMEOUT)", True),  # that request gives up, as network trouble
])
def test_api_that_never_answers(api, http_timeouts, stage, target, connect, read, timeout, limit, retryable):
    """A server that accepts the connection and never answers (the submit, or the presigned
    upload): the call gives up at the earlier of the pyannote timeout (not retryable: the time
    the request gave it is spent) and the read timeout (retryable)."""
    http_timeouts(connect=connect, read=read)
    api.stall = stage
    error, elapsed = _within(10, lambda: _call(api, timeout=timeout))
    assert isinstance(error, DiarizationError), error
    where = f"{api.base}/v1" if target == "API" else "pyannoteAI storage"
    assert str(error) == f"pyannoteAI {stage} failed: {where} did not answer within {limit}"
    assert error.retryable == retryable
    assert error.__cause__ is None and error.__context__ is None
    _no_key_in(error)
    assert api.stalled == 1
    assert min(read, timeout) <= elapsed < 3.0
    if not retryable:
        assert api.jobs == {}


@pytest.mark.parametrize("connect, timeout, limit", [(30, 1.0, "1 s (pyannote timeout)"),
                                                     (0.4, 60.0, "0.4 s (HTTP_CONNECT_TIMEOUT)")])
def test_storage_that_stops_reading_the_upload(api, http_timeouts, tmp_path, connect, timeout, limit):
    """Storage that takes the PUT's headers and never reads the body: the send stalls (urllib3
    sends under the connect timeout) and gives up at the earlier of that and the pyannote timeout."""
    http_timeouts(connect=connect, read=30)
    api.stall = "upload-unread"
    big = tmp_path / "long.wav"
    big.write_bytes(AUDIO.read_bytes() * 40)  # ~14 MB: more than the loopback socket buffers hold
    error, elapsed = _within(
        10, lambda: diarize_pyannote_api(str(big), KEY, base_url=api.base, poll_interval=0.01, timeout=timeout))
    assert isinstance(error, DiarizationError), error
    assert str(error) == f"pyannoteAI upload failed: pyannoteAI storage did not answer within {limit}"
    assert error.retryable == (timeout > connect)
    _no_key_in(error)
    assert api.stalled == 1 and api.uploads == {}
    assert min(connect, timeout) <= elapsed < 3.0


def test_bad_key_is_401_without_the_key(api, caplog):
    caplog.set_level(logging.DEBUG)
    bad = "sk-wrong-" + uuid.uuid4().hex
    with pytest.raises(DiarizationError) as info:
        _call(api, api_key=bad)
    assert str(info.value) == "pyannoteAI API rejected the API key (401 Unauthorized): check PYANNOTE_API_KEY"
    assert bad not in str(info.value) and bad not in caplog.text
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert not info.value.retryable
    assert api.requests == [("GET", "/v1/test")] and api.auth_ok == [False]


def test_json_in_makes_no_request(api, tmp_path):
    saved = _call(api, exclusive=True).job
    path = tmp_path / "talk.pyannote.job.json"
    path.write_text(json.dumps(saved))
    api.requests.clear()
    plain = diarize_pyannote_api(str(AUDIO), "", json_in=str(path), base_url=api.base)
    exclusive = diarize_pyannote_api("/nonexistent.wav", KEY, json_in=str(path), exclusive=True)
    assert api.requests == []
    assert [t.model_dump() for t in plain.turns] == OVERLAPPED
    assert [t.model_dump() for t in exclusive.turns] == EXCLUSIVE
    assert plain.job == saved


def test_json_in_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        diarize_pyannote_api("x.wav", "", json_in=str(bad))
    with pytest.raises(InvalidRequest, match="not found"):
        diarize_pyannote_api("x.wav", "", json_in=str(tmp_path / "missing.json"))
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps({"jobId": "j1", "status": "failed", "output": {"error": "boom"}}))
    with pytest.raises(DiarizationError, match="job j1 is failed, not succeeded: boom"):
        diarize_pyannote_api("x.wav", "", json_in=str(failed))
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps({"status": "succeeded", "output": {"diarization": [{"start": 1}]}}))
    with pytest.raises(DiarizationError, match="malformed"):
        diarize_pyannote_api("x.wav", "", json_in=str(malformed))


def test_server_error_is_retryable_and_not_chained(api):
    api.scenario = "500"
    with pytest.raises(DiarizationError) as info:
        _call(api)
    assert str(info.value) == (
        "pyannoteAI submit failed: HTTP 500 Internal Server Error from /v1/diarize: internal error"
    )
    assert info.value.retryable
    # the requests HTTPError (its request holds the Authorization header) is not attached
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_unreachable_server_is_retryable(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DiarizationError) as info:
        diarize_pyannote_api(str(AUDIO), KEY, base_url=f"http://127.0.0.1:{port}", **FAST)
    assert info.value.retryable and "cannot reach" in str(info.value)
    _no_key_in(info.value)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(model="precision-3"), "pyannote model must be one of precision-2, community-1"),
        (dict(num_speakers=0), "num_speakers must be a positive integer"),
        (dict(min_speakers=4, max_speakers=2), "min_speakers .4. is greater than max_speakers"),
        (dict(num_speakers=5, max_speakers=3), "outside"),
        (dict(timeout=0), "timeout must be a positive number"),
        (dict(poll_interval=-1), "poll interval must be a positive number"),
        (dict(base_url="ftp://host"), "invalid pyannoteAI API URL"),
        (dict(api_key=""), "API key missing"),
    ],
)
def test_bad_parameters(kw, match, monkeypatch):
    from speech.settings import get_settings

    monkeypatch.delenv("PYANNOTE_API_KEY", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(InvalidRequest, match=match):
            diarize_pyannote_api(str(AUDIO), kw.pop("api_key", KEY), **kw)
    finally:
        get_settings.cache_clear()


def test_request_bounds_the_pyannote_timeout():
    from pydantic import ValidationError

    from speech.schema import TranscriptionRequest

    assert TranscriptionRequest(audio_file="a.wav", pyannote_timeout=6 * 3600).pyannote_timeout == 21600
    with pytest.raises(ValidationError, match="pyannote_timeout"):
        TranscriptionRequest(audio_file="a.wav", pyannote_timeout=6 * 3600 + 1)


def test_base_url_resolution(monkeypatch):
    from speech.settings import get_settings

    assert resolve_api_url("http://127.0.0.1:9") == "http://127.0.0.1:9/v1"
    assert resolve_api_url("https://proxy.example/pyannote/v1/") == "https://proxy.example/pyannote/v1"
    monkeypatch.setenv("PYANNOTE_API_URL", "http://localhost:1234")
    get_settings.cache_clear()
    try:
        assert resolve_api_url() == "http://localhost:1234/v1"
        monkeypatch.delenv("PYANNOTE_API_URL")
        get_settings.cache_clear()
        assert resolve_api_url() == "https://api.pyannote.ai/v1"
    finally:
        get_settings.cache_clear()


def test_turn_model():
    assert Turn(start=0, end=1, speaker="SPEAKER_00").end == 1.0
