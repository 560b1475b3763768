"""The RunPod-compatible endpoint (issue 14) driven by the official ``runpod`` SDK as the client:
the original worker README's example input, run_sync, run + status + output, errors, auth."""
from __future__ import annotations

import time

import pytest
import requests

from conftest import DATA, Receiver, runpod_sdk, serving_runpod_api, wer, wer_limit

KEY = "endpoint-key-for-tests"


@pytest.fixture(scope="module")
def endpoint(prefect_harness):
    from deployments.runpod_api import Jobs
    from deployments.runpod_handler import handler

    with serving_runpod_api(KEY, Jobs(lambda job, job_id: handler(job, flow_run_name=job_id), workers=1)) as base:
        yield base


@pytest.fixture(autouse=True)
def local_roots(monkeypatch, tmp_path):
    """Jobs are requests from others: local paths only under ALLOW_LOCAL_PATHS."""
    monkeypatch.setenv("ALLOW_LOCAL_PATHS", f"{DATA}:{tmp_path}")


@pytest.fixture
def sdk(endpoint, monkeypatch):
    return runpod_sdk(monkeypatch, KEY, endpoint)


def _text():
    import json

    return json.loads((DATA / "fixtures.json").read_text())["sample_2spk.wav"]["text"]


def test_run_sync_with_the_workers_example_input(sdk, tmp_path):
    """The README's "Transcription with Language Detection and Alignment" input, our audio."""
    out = sdk.Endpoint("whisperx").run_sync({"input": {
        "audio_file": str(DATA / "sample_2spk.wav"), "align_output": True, "batch_size": 32, "debug": True,
        "download_dir": str(tmp_path / "out")}}, timeout=600)
    assert out["detected_language"] == "en" and out["language_probability"] > 0.5
    assert all("words" in s for s in out["segments"]) and "debug" in out
    assert wer(_text(), " ".join(s["text"] for s in out["segments"])) <= wer_limit("sample_2spk.wav")


def test_run_then_status_then_output_and_the_flow_run_in_prefect(sdk, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    job = sdk.Endpoint("whisperx").run({"audio_file": str(DATA / "sample_2spk.wav"), "language": "en",
                                        "download_dir": str(tmp_path / "out")})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    out = job.output(timeout=600)
    assert job.status() == "COMPLETED" and out["segments"] and out["language_probability"] is None
    with get_client(sync_client=True) as client:  # the job is a Prefect flow run named after it
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[job.job_id])))
    assert len(runs) == 1 and runs[0].state.is_completed()


def test_the_workers_diarization_and_verification_examples(sdk, http_server, manifest):
    """The README's "Full Configuration with Diarization/Speaker Verification" inputs over HTTP,
    with the three ways the worker names a sample: ``?name=``, ``#fragment``, the file stem (a
    plain URL string). The output has the worker's shape: named segments with ``speaker_id`` and
    ``similarity``, no token anywhere."""
    token = "hf_example_token_never_echoed"
    out = sdk.Endpoint("whisperx").run_sync({"input": {
        "audio_file": f"{http_server}/diar_3spk.wav", "language": "en", "batch_size": 32, "temperature": 0.2,
        "align_output": True, "diarization": True, "huggingface_access_token": token, "min_speakers": 2,
        "max_speakers": 5, "debug": True, "speaker_verification": True,
        "speaker_samples": [{"url": f"{http_server}/enrol_slt.wav?name=slt"}, {"url": f"{http_server}/enrol_rms.wav#rms"},
                            f"{http_server}/enrol_awb.wav"]}}, timeout=900)
    assert out["detected_language"] == "en" and out["language_probability"] is None and "debug" in out
    assert {s["name"] for s in out["speakers"].values()} == {"slt", "rms", "enrol_awb"}
    ref = manifest["diar_3spk.wav"]["turns"]
    truth = {"slt": "slt", "rms": "rms", "enrol_awb": "awb"}
    right = total = 0.0
    for seg in out["segments"]:
        assert seg["speaker_id"].startswith("SPEAKER_") and 0 < seg["similarity"] <= 1 and seg["words"]
        mid = (seg["start"] + seg["end"]) / 2
        who = next((t["speaker"] for t in ref if t["start"] <= mid <= t["end"]), None)
        if who:
            total += seg["end"] - seg["start"]
            right += (seg["end"] - seg["start"]) * (truth.get(seg["speaker"]) == who)
    assert right / total >= 0.9
    assert token not in str(out)


def test_s3_mode_returns_keys_and_presigned_urls(sdk, s3):
    s3.create_bucket(Bucket="runpod-api-out")
    out = sdk.Endpoint("whisperx").run_sync({"input": {
        "audio_file": str(DATA / "sample_2spk.wav"), "language": "en", "bucket": "runpod-api-out",
        "prefix_transcripts": "transcripts/"}}, timeout=600)
    job = out["transcript_key"].split("/")[2]  # the job's own key: <prefix><stem>/<job id>/
    assert out["transcript_key"] == f"transcripts/sample_2spk/{job}/sample_2spk.json" and job.endswith("-u1")
    assert out["segments_key"] == f"transcripts/sample_2spk/{job}/sample_2spk.segments.json"
    served = requests.get(out["transcript_url"], timeout=30).json()
    assert served["segments"] == out["segments"] and requests.get(out["segments_url"], timeout=30).json() == out["segments"]


def test_a_bad_job_fails_with_the_handlers_error(sdk, endpoint):
    job = sdk.Endpoint("whisperx").run({"audio_file": str(DATA / "nonexistent.wav")})
    job.output(timeout=120)
    body = requests.get(f"{endpoint}/whisperx/status/{job.job_id}", headers={"Authorization": f"Bearer {KEY}"},
                        timeout=30).json()
    assert body["status"] == "FAILED" and "not found" in body["error"] and "output" not in body


def test_auth_unknown_jobs_bad_bodies_and_health(endpoint):
    assert requests.post(f"{endpoint}/e/run", json={"input": {"audio_file": "a.wav"}}, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert requests.get(f"{endpoint}/e/status/x", headers=wrong, timeout=30).status_code == 401
    ok = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(f"{endpoint}/e/status/no-such-job", headers=ok, timeout=30).status_code == 404
    bad = requests.post(f"{endpoint}/e/run", json={"audio_file": "a.wav"}, headers=ok, timeout=30)
    assert bad.status_code == 400 and "input" in bad.json()["error"]
    health = requests.get(f"{endpoint}/e/health", timeout=30)  # no key needed
    assert health.status_code == 200 and "jobs" in health.json()


def test_runsync_answers_in_progress_after_its_wait(endpoint, tmp_path):
    ok = {"Authorization": f"Bearer {KEY}"}
    body = {"input": {"audio_file": str(DATA / "heldout_3spk.wav"), "download_dir": str(tmp_path / "o"),
                      "force": True}}
    first = requests.post(f"{endpoint}/e/runsync?wait=10", json=body, headers=ok, timeout=60).json()
    assert first["status"] in ("IN_QUEUE", "IN_PROGRESS") and "output" not in first
    deadline = time.monotonic() + 600
    while True:
        view = requests.get(f"{endpoint}/e/status/{first['id']}", headers=ok, timeout=30).json()
        if view["status"] == "COMPLETED":
            break
        assert time.monotonic() < deadline and view["status"] in ("IN_QUEUE", "IN_PROGRESS"), view
        time.sleep(1)
    assert view["output"]["segments"] and view["executionTime"] > 0


def test_the_service_refuses_a_public_host_without_a_key(monkeypatch):
    from deployments.runpod_api import main

    monkeypatch.delenv("ENDPOINT_API_KEY", raising=False)
    with pytest.raises(SystemExit):
        main(["--host", "0.0.0.0"])


def test_a_killed_in_process_endpoint_leaves_no_run_running(prefect_harness, tmp_path):
    """The endpoint (in-process mode, its own process) is killed with SIGKILL while a job's flow
    run is Running: the run stays Running in Prefect until the endpoint starts again on this
    machine, which marks it Crashed before it serves (nothing left Running for ever), and
    delivers the job's webhook, FAILED with the reason (the job died with the endpoint)."""
    import http.server
    import os
    import signal
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL

    from deployments.local_server import free_port, start_endpoint
    from deployments.webhooks import LOST

    class Trickle(http.server.BaseHTTPRequestHandler):  # a download that takes for ever
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "10000000")
            self.end_headers()
            try:
                for _ in range(600):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "ALLOW_PRIVATE_URLS": "1"}

    def _run_named(name: str):
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return runs[0] if runs else None

    def state_of(name: str):
        run = _run_named(name)
        return run.state if run else None

    def until(name: str, kind: str, seconds: float):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            state = state_of(name)
            if state is not None and state.type.value == kind:
                return state
            time.sleep(0.5)
        raise AssertionError(f"{name}: {state_of(name)} after {seconds} s, not {kind}")

    procs, hook, port, state = [], Receiver(), free_port(), ("--state-dir", str(tmp_path / "state"))
    try:
        proc, base = start_endpoint(env, tmp_path / "first.log", KEY, *state, endpoint_id="e", port=port)
        procs.append(proc)
        auth = {"Authorization": f"Bearer {KEY}"}
        job = requests.post(f"{base}/run", headers=auth, timeout=30, json={"input": {
            "audio_file": f"http://127.0.0.1:{server.server_address[1]}/call.wav", "language": "en"},
            "webhook": hook.url}).json()["id"]
        until(job, "RUNNING", 120)
        # the run notes its process first thing (one API call after it is set Running; a kill inside that
        # call's few milliseconds would leave a run no later process can tell is its own): kill after it
        deadline = time.monotonic() + 60
        while not _run_named(job).infrastructure_pid:
            assert time.monotonic() < deadline, "the run never recorded its process"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        time.sleep(2)
        assert state_of(job).type.value == "RUNNING"  # nobody left to say otherwise
        assert hook.attempts == 0
        proc, base = start_endpoint(env, tmp_path / "second.log", KEY, *state, endpoint_id="e", port=port)
        procs.append(proc)
        crashed = until(job, "CRASHED", 30)
        assert "ended without finishing the run" in crashed.message, crashed.message
        assert hook.wait(1, 60) == [{"id": job, "status": "FAILED", "error": LOST}]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        server.shutdown()


def test_a_job_stuck_in_a_stage_ends_the_in_process_endpoint(prefect_harness, slow_server, tmp_path):
    """A job of the in-process endpoint whose stage never returns (its Whisper model downloaded
    from a hub that stopped answering) would hold its slot for ever, and every job queued behind it
    would wait without end: past its deadline (GPU_TASK_TIMEOUT) and the grace, the endpoint's
    watchdog sets the job's run Failed with the reason and ends the process (WATCHDOG_EXIT) for
    its supervisor to start again; the job queued behind it is delivered FAILED by the next
    endpoint, and nothing is written."""
    import os

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL

    from deployments.local_server import free_port, start_endpoint
    from deployments.webhooks import LOST
    from flows.runguard import WATCHDOG_EXIT

    GRACE = 5  # WATCHDOG_GRACE, cut from 60 s

    out, hook, port = tmp_path / "out", Receiver(), free_port()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "ALLOW_LOCAL_PATHS": f"{DATA}:{out}",
           "GPU_TASK_TIMEOUT": "1", "WATCHDOG_GRACE": str(GRACE), "WORKER_MODELS": "tiny.en", "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"{slow_server}/stalled", "HF_HOME": str(tmp_path / "hf"),
           "SPEECH_CACHE_DIR": str(tmp_path / "cache")}
    state = ("--state-dir", str(tmp_path / "state"))
    proc, base = start_endpoint(env, tmp_path / "first.log", KEY, *state, endpoint_id="e", port=port)
    procs = [proc]
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        job = {"input": {"audio_file": str(DATA / "enrol_slt.wav"), "language": "en", "model": "tiny.en",
                         "download_dir": str(out)}, "webhook": hook.url}
        stuck, queued = (requests.post(f"{base}/run", headers=auth, timeout=30, json=job).json()["id"]
                         for _ in range(2))
        started = time.monotonic()
        assert proc.wait(timeout=GRACE + 180) == WATCHDOG_EXIT, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() - started >= GRACE  # stages may still stop on their own until then
        with get_client(sync_client=True) as client:
            (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[stuck])))
        assert run.state.is_failed() and "ran past its deadline" in run.state.message, run.state
        assert "stuck past their deadline" in (tmp_path / "first.log").read_text()
        proc, base = start_endpoint(env, tmp_path / "second.log", KEY, *state, endpoint_id="e", port=port)
        procs.append(proc)
        bodies = {b["id"]: b for b in hook.wait(2, 60)}
        assert bodies[queued] == {"id": queued, "status": "FAILED", "error": LOST}
        assert bodies[stuck]["status"] == "FAILED"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    assert not [f for f in out.rglob("*") if f.is_file()]


def test_abandoned_runs_are_found_on_every_page(prefect_harness, monkeypatch):
    """A later process marks every run of this machine whose process is gone, however many
    unfinished runs the server holds (read page by page, runs of deployments left to their
    workers); a run whose process lives is left alone."""
    import os
    import socket
    import subprocess
    import sys

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    import flows.local_api as local_api

    monkeypatch.setattr(local_api, "PAGE", 5)

    @flow(name="abandoned-page-probe")
    def probe() -> None:
        pass

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    with get_client(sync_client=True) as client:
        def run(pid: int) -> str:
            made = client.create_flow_run(probe, state=Running())
            client.update_flow_run(made.id, infrastructure_pid=f"{host}:{pid}")
            return made

        gone = [run(dead.pid) for _ in range(12)]
        alive = [run(os.getppid()) for _ in range(3)]  # pytest's parent: alive, and not this process
        marked = local_api.mark_abandoned_runs(client)
        assert {r.name for r in gone} <= set(marked)
        assert not {r.name for r in alive} & set(marked)
        assert all(client.read_flow_run(r.id).state.is_crashed() for r in gone)
        for r in alive:  # leave nothing Running in the shared harness
            client.set_flow_run_state(r.id, Completed(), force=True)
