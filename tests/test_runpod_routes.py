"""RunPod's remaining routes on the compatible endpoint (issue 21): ``webhook`` receives the
final status body (retried, through the SSRF guard), ``/stream/{id}`` hands a non-streaming
job's output out once, ``/purge-queue`` cancels the queued jobs. Driven by the ``runpod`` SDK
and a receiver on 127.0.0.1."""
from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
import requests

from conftest import DATA, runpod_sdk, serving_runpod_api

KEY = "routes-key"


class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST; answers 500 ``fail_first`` times."""

    def __init__(self, fail_first: int = 0):
        self.bodies: list[dict] = []
        self.attempts = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                outer.attempts += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.attempts <= fail_first:
                    self.send_response(500)
                else:
                    outer.bodies.append(body)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=t"

    def wait(self, n: int, seconds: float = 120) -> list[dict]:
        deadline = time.monotonic() + seconds
        while len(self.bodies) < n:
            assert time.monotonic() < deadline, (self.attempts, self.bodies)
            time.sleep(0.2)
        return self.bodies


@pytest.fixture
def local_roots(monkeypatch, tmp_path):
    monkeypatch.setenv("ALLOW_LOCAL_PATHS", f"{DATA}:{tmp_path}")


def test_webhooks_get_the_final_status_of_real_jobs(prefect_harness, local_roots, monkeypatch, tmp_path):
    from deployments.runpod_api import Jobs
    from deployments.runpod_handler import handler

    ok, failing = Receiver(), Receiver(fail_first=2)  # the second answers 500 twice: retried
    with serving_runpod_api(KEY, Jobs(lambda job, job_id: handler(job, flow_run_name=job_id), workers=2)) as base:
        sdk = runpod_sdk(monkeypatch, KEY, base)
        auth = {"Authorization": f"Bearer {KEY}"}
        done = requests.post(f"{base}/e/run", headers=auth, timeout=30, json={
            "input": {"audio_file": str(DATA / "enrol_slt.wav"), "language": "en", "download_dir": str(tmp_path / "o")},
            "webhook": ok.url}).json()
        bad = requests.post(f"{base}/e/run", headers=auth, timeout=30, json={
            "input": {"audio_file": "/etc/passwd"}, "webhook": failing.url}).json()
        (completed,) = ok.wait(1)
        (failed,) = failing.wait(1)
        assert completed["id"] == done["id"] and completed["status"] == "COMPLETED" and completed["output"]["segments"]
        assert failed["id"] == bad["id"] and failed["status"] == "FAILED" and "ALLOW_LOCAL_PATHS" in failed["error"]
        assert failing.attempts == 3
        # /stream: the output once, then the SDK's loop ends
        job = sdk.Endpoint("e").run({"audio_file": str(DATA / "enrol_rms.wav"), "language": "en",
                                     "download_dir": str(tmp_path / "s")})
        chunks = list(job.stream())
        assert len(chunks) == 1 and chunks[0]["segments"] and job.status() == "COMPLETED"
        # a webhook that is not http(s) is refused at the edge; one to a private address is not called
        refused = requests.post(f"{base}/e/run", headers=auth, timeout=30, json={
            "input": {"audio_file": str(DATA / "enrol_slt.wav")}, "webhook": "file:///etc/passwd"})
        assert refused.status_code == 400 and "webhook" in refused.json()["error"]


def test_a_webhook_to_a_private_address_is_not_called(monkeypatch):
    from deployments.webhooks import deliver
    from speech.settings import get_settings

    receiver = Receiver()
    monkeypatch.setenv("FETCH_ALLOW_HOSTS", "")
    get_settings.cache_clear()
    assert deliver(receiver.url, {"id": "x", "status": "COMPLETED"}) is False
    assert receiver.attempts == 0
    monkeypatch.setenv("FETCH_ALLOW_HOSTS", "127.0.0.1")
    get_settings.cache_clear()
    assert deliver(receiver.url, {"id": "x", "status": "COMPLETED"}) is True


def test_purge_queue_cancels_the_queued_jobs_and_their_webhooks_say_so(monkeypatch):
    from deployments.runpod_api import Jobs

    release = threading.Event()
    hook = Receiver()
    with serving_runpod_api(KEY, Jobs(lambda job, job_id: release.wait(60) and {"done": True}, workers=1)) as base:
        sdk = runpod_sdk(monkeypatch, KEY, base)
        auth = {"Authorization": f"Bearer {KEY}"}
        ids = [requests.post(f"{base}/e/run", headers=auth, timeout=30, json={
            "input": {"audio_file": "https://example.com/a.wav"}, "webhook": hook.url}).json()["id"] for _ in range(3)]
        deadline = time.monotonic() + 30
        while requests.get(f"{base}/e/status/{ids[0]}", headers=auth, timeout=30).json()["status"] != "IN_PROGRESS":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert sdk.Endpoint("e").purge_queue() == {"removed": 2, "status": "completed"}
        release.set()
        bodies = {b["id"]: b["status"] for b in hook.wait(3)}
    assert bodies == {ids[0]: "COMPLETED", ids[1]: "CANCELLED", ids[2]: "CANCELLED"}
