"""A local server speaking pyannoteAI's documented job API (``/v1/test``, ``/v1/media/input`` +
presigned PUT, ``/v1/diarize``, ``/v1/jobs/{id}``), for the real ``pyannoteai-sdk`` as client.

Scenarios: ``succeed``, ``fail`` (the job fails), ``hang`` (it never finishes), ``500`` (submit
answers 500); ``submit_failures = N`` makes the next N submits answer 503 first;
``job_seconds`` makes every job run at least that long; ``stall = "submit"`` (or ``"upload"``, the
presigned PUT) reads that request and never answers it, ``stall = "upload-unread"`` stops reading
the PUT at its headers: the connection stays open until the next ``reset()`` or ``close()``
(``stalled`` counts them).
"""
from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from pathlib import Path

KEY = "sk-test-" + uuid.uuid4().hex
DATA = Path(__file__).parent / "data"


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
        self.submit_failures = 0  # the next N submits answer 503
        self.job_seconds = 0.0  # a job runs at least this long (wall time), whatever the polls
        self.poll_delay = 0.0  # seconds every poll after the first takes to answer (a slow API)
        self.submits = 0
        self.stall: str | None = None  # "submit" | "upload": read the request, never answer it;
        # "upload-unread": not even read the PUT's body
        self.stalled = 0
        self.release = threading.Event()  # set by reset() / close(): stalled handlers return


def _stall(st: _State, route: str) -> bool:
    """Hold the connection open without answering (a server that accepted it and hangs)."""
    if st.stall != route:
        return False
    st.stalled += 1
    st.release.wait(120)
    return True


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
            if job["polls"] > 1:
                time.sleep(st.poll_delay)
            doc = {"jobId": job["id"], "createdAt": "2025-01-01T00:00:00Z", "updatedAt": "2025-01-01T00:00:01Z"}
            if job["polls"] == 1:
                doc["status"] = "pending"
            elif (job["polls"] == 2 or job["scenario"] == "hang"
                  or time.monotonic() - job["created"] < st.job_seconds):
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
            st.submits += 1
            if _stall(st, "submit"):
                return
            if st.submit_failures > 0:
                st.submit_failures -= 1
                return self._send(503, {"message": "service unavailable", "requestId": "r503"})
            if st.scenario == "500":
                return self._send(500, {"message": "internal error", "requestId": "r1"})
            if req.get("url") not in st.uploads:
                return self._send(400, {"message": "media not found"})
            if req.get("model") not in ("precision-2", "community-1"):
                return self._send(400, {"message": "unknown model"})
            job_id = uuid.uuid4().hex
            st.jobs[job_id] = {"id": job_id, "polls": 0, "scenario": st.scenario, "request": req,
                               "created": time.monotonic()}
            return self._send(200, {"jobId": job_id, "status": "created"})
        self._send(404, {"message": "not found"})

    def do_PUT(self):
        st = self.state
        st.requests.append(("PUT", self.path))
        if _stall(st, "upload-unread"):
            return
        body = self._body()
        token = self.path.split("?")[0].rsplit("/", 1)[-1]
        if not self.path.startswith("/presigned/") or token not in st.presigned:
            return self._send(403, {"message": "bad signature"})
        if _stall(st, "upload"):
            return
        st.uploads[st.presigned.pop(token)] = body
        self._send(200, {})


class PyannoteServer:
    """The stub on 127.0.0.1; ``state`` holds what it saw and what it will do."""

    def __init__(self) -> None:
        self.state = _State()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.state.base = self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def reset(self) -> _State:
        self.state.release.set()
        fresh = _State()
        fresh.base = self.url
        self.state.__dict__.update(fresh.__dict__)
        return self.state

    def close(self) -> None:
        self.state.release.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "PyannoteServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

