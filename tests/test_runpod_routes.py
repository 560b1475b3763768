"""RunPod's remaining routes on the compatible endpoint (issue 21): ``webhook`` receives the
final status body (retried, through the SSRF guard), ``/stream/{id}`` hands a non-streaming
job's output out once, ``/purge-queue`` cancels the queued jobs. Driven by the ``runpod`` SDK
and a receiver on 127.0.0.1."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from conftest import DATA, Receiver, runpod_sdk, serving_runpod_api

KEY = "routes-key"


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


def test_webhooks_an_endpoint_left_undelivered_are_delivered_by_the_next_one(tmp_path):
    """An endpoint is killed with webhooks pending (its journal's last line cut short): the next
    endpoint on that journal delivers them, the final status of a job that outlived it
    (deployment / task-worker jobs, read back from Prefect) and FAILED for one that died with it
    (in-process jobs); a delivered webhook is not delivered again; one journal, one endpoint."""
    import stat

    from deployments.webhooks import LOST, Journal, Webhooks

    hook, path = Receiver(), tmp_path / "state" / "webhooks-8000.jsonl"
    states = {"outlives": "IN_PROGRESS", "dies": "IN_PROGRESS", "done": "COMPLETED"}
    journal = Journal(path)
    first = Webhooks(lambda job: {"id": job, "status": states[job]}, every=0.05, journal=journal)
    first.add("outlives", hook.url, "alice")
    first.add("dies", hook.url, "bob")
    first.add("done", hook.url, "alice")
    assert [b["id"] for b in hook.wait(1)] == ["done"]
    time.sleep(0.2)  # its delivery journaled
    first.stopping.set()  # killed: nothing more delivered, nothing flushed at exit
    journal.close()
    with path.open("a") as f:
        f.write('{"job": "half-writ')
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # webhook URLs carry their receivers' tokens

    journal = Journal(path)
    assert journal.pending == {"outlives": (hook.url, "alice"), "dies": (hook.url, "bob")}
    with pytest.raises(RuntimeError, match="another endpoint"):
        Journal(path)
    # the job that outlived the endpoint has finished; the one that died with it is unknown now
    second = Webhooks(lambda job: {"id": job, "status": "COMPLETED"} if job == "outlives" else None, every=0.05,
                      journal=journal)
    bodies = {b["id"]: b for b in hook.wait(3)}
    assert bodies["outlives"]["status"] == "COMPLETED"
    assert bodies["dies"] == {"id": "dies", "status": "FAILED", "error": LOST}
    time.sleep(0.2)
    second.stopping.set()
    journal.close()
    left = Journal(path)
    assert left.pending == {}  # delivered: not again
    left.close()
    assert len(hook.bodies) == 3
