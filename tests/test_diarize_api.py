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

import http.server
import json
import logging
import threading
import time
import uuid

import pytest

from conftest import DATA
from speech.errors import DiarizationError, InvalidRequest
from speech.schema import DiarizationOutcome, Turn
from speech.speakers.pyannote_api import diarize_pyannote_api, resolve_api_url

AUDIO = DATA / "heldout_3spk.wav"
KEY = "sk-test-" + uuid.uuid4().hex
FAST = dict(poll_interval=0.01, timeout=5.0)


def _truth() -> list[dict]:
    turns = json.loads((DATA / "fixtures.json").read_text())["heldout_3spk.wav"]["turns"]
    labels: dict[str, str] = {}
    out = []
    for t in turns:
        label = labels.setdefault(t["speaker"], f"SPEAKER_{len(labels):02d}")
        out.append({"start": t["start"], "end": t["end"], "speaker": label})
    return out


EXCLUSIVE = _truth()
# the regular output overlaps each turn into the next one by 0.8 s (as overlapped speech would)
OVERLAPPED = [dict(t, end=round(t["end"] + 0.8, 3)) for t in EXCLUSIVE]


class _State:
    def __init__(self) -> None:
        self.base = ""
        self.requests: list[tuple[str, str]] = []
        self.auth_ok: list[bool] = []
        self.presigned: dict[str, str] = {}  # token -> media url
        self.uploads: dict[str, bytes] = {}  # media url -> bytes
        self.jobs: dict[str, dict] = {}
        self.scenario = "succeed"  # succeed | fail | hang | 500 (on submit)


class _Handler(http.server.BaseHTTPRequestHandler):
    state: _State

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict | None = None) -> None:
        data = json.dumps(body if body is not None else {}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        ok = self.headers.get("Authorization") == f"Bearer {KEY}"
        self.state.auth_ok.append(ok)
        if not ok:
            self._send(401, {"message": "Unauthorized", "requestId": uuid.uuid4().hex})
        return ok

    def do_GET(self):
        st = self.state
        st.requests.append(("GET", self.path))
        if not self.path.startswith("/v1/"):
            return self._send(404, {"message": "not found"})
        if not self._authorized():
            return
        if self.path == "/v1/test":
            return self._send(200, {"status": "OK", "message": "API key is valid"})
        if self.path.startswith("/v1/jobs/"):
            job = st.jobs.get(self.path.rsplit("/", 1)[1])
            if job is None:
                return self._send(404, {"message": "job not found"})
            job["polls"] += 1
            doc = {"jobId": job["id"], "createdAt": "2025-01-01T00:00:00Z", "updatedAt": "2025-01-01T00:00:01Z"}
            if job["polls"] == 1:
                doc["status"] = "pending"
            elif job["polls"] == 2 or job["scenario"] == "hang":
                doc["status"] = "running"
            elif job["scenario"] == "fail":
                doc.update(status="failed", output={"error": "audio file could not be decoded"})
            else:
                output = {"diarization": OVERLAPPED}
                if job["request"].get("exclusive"):
                    output["exclusiveDiarization"] = EXCLUSIVE
                doc.update(status="succeeded", output=output)
            return self._send(200, doc)
        self._send(404, {"message": "not found"})

    def do_POST(self):
        st = self.state
        st.requests.append(("POST", self.path))
        body = self._body()
        if not self._authorized():
            return
        try:
            req = json.loads(body)
        except ValueError:
            return self._send(400, {"message": "body is not JSON"})
        if self.path == "/v1/media/input":
            if not str(req.get("url", "")).startswith("media://"):
                return self._send(400, {"message": "url must start with media://"})
            token = uuid.uuid4().hex
            st.presigned[token] = req["url"]
            return self._send(201, {"url": f"{st.base}/presigned/{token}?X-Signature=abc"})
        if self.path == "/v1/diarize":
            if st.scenario == "500":
                return self._send(500, {"message": "internal error", "requestId": "r1"})
            if req.get("url") not in st.uploads:
                return self._send(400, {"message": "media not found"})
            if req.get("model") not in ("precision-2", "community-1"):
                return self._send(400, {"message": "unknown model"})
            job_id = uuid.uuid4().hex
            st.jobs[job_id] = {"id": job_id, "polls": 0, "scenario": st.scenario, "request": req}
            return self._send(200, {"jobId": job_id, "status": "created"})
        self._send(404, {"message": "not found"})

    def do_PUT(self):
        st = self.state
        st.requests.append(("PUT", self.path))
        body = self._body()
        token = self.path.split("?")[0].rsplit("/", 1)[-1]
        if not self.path.startswith("/presigned/") or token not in st.presigned:
            return self._send(403, {"message": "bad signature"})
        st.uploads[st.presigned.pop(token)] = body
        self._send(200, {})


@pytest.fixture(scope="module")
def _server():
    state = _State()
    handler = type("Handler", (_Handler,), {"state": state})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def api(_server) -> _State:
    """The server's state, reset for each test."""
    fresh = _State()
    fresh.base = _server.base
    _server.__dict__.update(fresh.__dict__)
    return _server


def _call(api: _State, **kw) -> DiarizationOutcome:
    kw = {**FAST, **kw}
    return diarize_pyannote_api(str(AUDIO), kw.pop("api_key", KEY), base_url=api.base, **kw)


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
