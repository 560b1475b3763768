"""Issue 20: one trust boundary at every entry point that takes a request from someone else.

The same hostile requests go to each entry point (the handler, the endpoint in its in-process
mode over real HTTP, the submitters of deployment runs and task jobs, a deployment run's own
check, a sweep) and each refuses them the same way, before anything is opened, fetched, loaded
or written; the endpoint's edge rules (JSON only, loopback Host/Origin, body size and depth, no
500) and its waits (no thread per parked caller) are driven over real sockets; decoding and
enrolment stay bounded whatever the file claims.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import DATA, serving_runpod_api
from speech.errors import SpeechError
from speech.settings import get_settings

KEY = "hostile-service-key"
ROOT = DATA.parents[1]


def hostile_requests(tmp_path, s3_port: int) -> dict[str, dict]:
    """What the audit sent (issue 20), each with what the refusal names."""
    return {
        "a file outside the roots": {"audio_file": "/etc/passwd"},
        "a file that does not exist outside the roots": {"audio_file": "/etc/nonexistent-file"},
        "a file:// URL outside the roots": {"audio_file": "file:///etc/hostname"},
        "outputs over someone's folder": {"audio_file": "https://example.com/a.wav", "download_dir": str(tmp_path / "x"),
                                          "output_name": "config"},
        "the worker's keys to a chosen endpoint": {"audio_file": "https://example.com/a.wav", "bucket": "b",
                                                   "s3_endpoint": f"http://127.0.0.1:{s3_port}"},
        "a deepgram json from the worker's disk": {"audio_file": "https://example.com/a.wav",
                                                   "deepgram_json_in": "/etc/passwd"},
        "a pipeline config of the caller's": {"audio_file": "https://example.com/a.wav", "diarization": True,
                                              "diarization_model": str(tmp_path / "pipeline.yaml")},
        "a sample whose suffix hides the real path": {
            "audio_file": "https://example.com/a.wav", "speaker_verification": True,
            "speaker_samples": [{"name": "x", "url": f"/etc/passwd?/../../{DATA}/enrol_slt.wav"}]},
        "a model folder outside the roots": {"audio_file": "https://example.com/a.wav", "model": "/etc"},
        "an align model of the caller's": {"audio_file": "https://example.com/a.wav", "align_output": True,
                                           "align_model": "attacker/wav2vec2-with-a-pickle"},
        "too many enrolment clips": {"audio_file": "https://example.com/a.wav", "speaker_verification": True,
                                     "speaker_samples": [f"https://example.com/s{i}.wav" for i in range(21)]},
        "a worker Secret block sent to a chosen endpoint": {
            "audio_file": "https://example.com/a.wav", "bucket": "b", "s3_endpoint": "http://93.184.216.34:9000",
            "access_key": "prefect-secret:hf-token", "secret_key": "prefect-secret:deepgram-api-key"},
        "one worker token in another's field": {"audio_file": "https://example.com/a.wav",
                                                 "deepgram_api_key": "prefect-secret:hf-token"},
        "pyannoteAI polled in a tight loop on the worker's key": {
            "audio_file": "https://example.com/a.wav", "diarization": True, "pyannote_poll_interval": 0.01},
        "another run's handed-over URL": {"audio_file": "https://example.com/a.wav?X-Amz-Signature=***"
                                                        "#whisperx-handover=0123456789abcdef01234567"},
    }


@pytest.fixture
def roots(monkeypatch, tmp_path):
    """A worker that allows local files only under tests/data (outputs: RESULTS_DIR)."""
    monkeypatch.setenv("ALLOW_LOCAL_PATHS", str(DATA))
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.delenv("ALLOW_REQUEST_ENDPOINTS", raising=False)
    monkeypatch.delenv("WORKER_MODELS", raising=False)


def _refusal(error: str, case: str) -> None:
    assert error and "\n" not in error and "Traceback" not in error, (case, error)
    assert any(word in error for word in ("ALLOW_LOCAL_PATHS", "ALLOW_REQUEST_ENDPOINTS", "MAX_SPEAKER_SAMPLES",
                                          "access_key", "Secret block", "whisperx-handover",
                                          "pyannote_poll_interval")), (case, error)


def test_every_entry_point_refuses_the_same_hostile_requests(roots, tmp_path, monkeypatch):
    """handler(job), DeploymentJobs/TaskJobs submitters, a deployment run's own check and the
    in-process endpoint: the same refusal for each case, nothing written, no flow run made."""
    from deployments.runpod_handler import handler
    from deployments.runpod_jobs import DeploymentJobs
    from flows.jobs import check_job_request
    from flows.runtime import admit_deployment_run
    from speech.schema import TranscriptionRequest

    cases = hostile_requests(tmp_path, 9)
    deployment_jobs = DeploymentJobs("no/such-deployment")  # refused before any run would be made
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "00000000-0000-0000-0000-000000000001")
    for case, request in cases.items():
        _refusal(handler({"id": "h", "input": request}).get("error", ""), case)
        job = deployment_jobs.view(deployment_jobs.submit({"input": request}))
        assert job["status"] == "FAILED", (case, job)
        _refusal(job["error"], case)
        with pytest.raises(SpeechError) as task_job:
            check_job_request(request)
        _refusal(str(task_job.value), case)
        with pytest.raises(SpeechError) as run:
            admit_deployment_run(TranscriptionRequest.parse(request))
        _refusal(str(run.value), case)
    assert not (tmp_path / "x").exists()
    # no existence oracle: a present and an absent file outside the roots read the same
    a = handler({"input": cases["a file outside the roots"]})["error"].replace("/etc/passwd", "P")
    b = handler({"input": cases["a file that does not exist outside the roots"]})["error"].replace(
        "/etc/nonexistent-file", "P")
    assert a == b


def test_the_in_process_endpoint_applies_the_policy(roots, tmp_path):
    from deployments.runpod_api import Jobs
    from deployments.runpod_handler import handler

    made = []

    def run(job, job_id):
        made.append(job_id)
        return handler(job, flow_run_name=job_id)

    with serving_runpod_api(KEY, Jobs(run, workers=2)) as base:
        auth = {"Authorization": f"Bearer {KEY}"}
        for case, request in hostile_requests(tmp_path, 9).items():
            reply = requests.post(f"{base}/e/runsync?wait=30000", json={"input": request}, headers=auth, timeout=60)
            assert reply.status_code == 200, (case, reply.text)
            body = reply.json()
            assert body["status"] == "FAILED", (case, body)
            _refusal(body["error"], case)
    assert not (tmp_path / "x").exists() and len(made) == len(hostile_requests(tmp_path, 9))


def test_a_swept_source_outside_the_roots_is_refused_in_a_deployment_run(roots, monkeypatch, tmp_path):
    from flows.sweep import _refuse_untrusted_source

    _refuse_untrusted_source("/etc", {})  # a sweep run from Python by the machine's user: its own folders
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "00000000-0000-0000-0000-000000000001")
    with pytest.raises(SpeechError, match="ALLOW_LOCAL_PATHS"):
        _refuse_untrusted_source("/etc", {})
    with pytest.raises(SpeechError, match="ALLOW_LOCAL_PATHS"):
        _refuse_untrusted_source(str(DATA / ".." / ".."), {})
    with pytest.raises(SpeechError, match="download_dir"):
        _refuse_untrusted_source(str(DATA), {"download_dir": "/etc"})
    _refuse_untrusted_source(str(DATA), {})
    _refuse_untrusted_source("s3://bucket/inbox/", {})


def test_the_endpoint_edge_refuses_cross_site_oversized_and_deep_bodies(roots):
    """No 500 for any of it; a web page (foreign Origin/Host, text/plain) cannot drive it."""
    from deployments.runpod_api import Jobs

    ran = []
    with serving_runpod_api(None, Jobs(lambda job, job_id: ran.append(job) or {"ok": 1}, workers=1)) as base:
        good = {"input": {"audio_file": "https://example.com/a.wav"}}
        import json

        cases = {
            "text/plain (a form post from a web page)": (
                dict(data=json.dumps(good), headers={"Content-Type": "text/plain"}), 415),
            "a foreign Origin": (dict(json=good, headers={"Origin": "https://evil.example"}), 403),
            "a rebinding Host": (dict(json=good, headers={"Host": "evil.example:8000"}), 403),
            "2 MB": (dict(json={"input": {"audio_file": "x" * 2_000_000}}), 413),
            "2 MB chunked, no length": (dict(data=iter([b'{"input": {"a": "', b"x" * 2_000_000, b'"}}']),
                                             headers={"Content-Type": "application/json"}), 413),
            "nested 10,000 deep": (dict(data="[" * 10_000 + "]" * 10_000, headers={"Content-Type": "application/json"}),
                                   400),
            "not UTF-8": (dict(data=b"\xff\xfe{", headers={"Content-Type": "application/json"}), 400),
            "not an object": (dict(json=[1, 2]), 400),
        }
        for case, (kwargs, status) in cases.items():
            reply = requests.post(f"{base}/e/run", timeout=30, **kwargs)
            assert reply.status_code == status, (case, reply.status_code, reply.text)
            assert set(reply.json()) == {"error"}, (case, reply.text)
        bad_wait = requests.post(f"{base}/e/runsync?wait=soon", json=good, timeout=30)
        assert bad_wait.status_code == 400 and "wait" in bad_wait.json()["error"]
        assert requests.get(f"{base}/e/health", headers={"Origin": "https://evil.example"}, timeout=30).status_code == 403
        assert not ran
        assert requests.post(f"{base}/e/run", json=good, headers={"Origin": "http://127.0.0.1:3000"},
                             timeout=30).status_code == 200


def test_a_body_dripped_byte_by_byte_is_cut_off(roots, monkeypatch):
    """A caller that sends headers, then its body a byte at a time, holds its connection only
    until BODY_SECONDS: the endpoint answers 408 and closes, and nothing is queued."""
    import socket

    from deployments import runpod_api
    from deployments.runpod_api import Jobs

    monkeypatch.setattr(runpod_api, "BODY_SECONDS", 1.5)
    ran = []
    with serving_runpod_api(KEY, Jobs(lambda job, job_id: ran.append(job) or {"ok": 1}, workers=1)) as base:
        port = int(base.rsplit(":", 1)[1].split("/", 1)[0])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST /v2/e/run HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode())
            started, answer = time.monotonic(), b""
            try:
                for _ in range(40):  # 20 s of drip unless the endpoint ends it
                    sock.sendall(b" ")
                    time.sleep(0.5)
                    sock.setblocking(False)
                    try:
                        answer += sock.recv(4096)
                    except BlockingIOError:
                        pass
                    finally:
                        sock.setblocking(True)
                    if answer:
                        break
            except OSError:  # closed on us after answering
                pass
            elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert elapsed < 6, elapsed
    assert not ran


def test_s3_sources_only_under_the_allowed_roots(roots, monkeypatch, tmp_path):
    """The worker reads s3:// sources with its own credentials: with ALLOW_S3_SOURCES a request
    from others (handler, queued jobs, a sweep's source) reads only under those roots; an endpoint
    with several callers and no ALLOW_S3_SOURCES refuses them all; one caller or the operator's
    own setting keeps theirs."""
    from deployments.callers import Callers, s3_sources_closed
    from deployments.runpod_handler import handler
    from flows.jobs import check_job_request
    from speech.errors import FetchError
    from speech.policy import admit, check_source

    monkeypatch.setenv("ALLOW_S3_SOURCES", "inbox/alice/,samples")
    get_settings.cache_clear()
    admit({"audio_file": "s3://inbox/alice/call.wav"}, serving=False)
    admit({"audio_file": "s3://inbox/alice/call.wav", "speaker_verification": True,
           "speaker_samples": [{"name": "a", "url": "s3://samples/a.wav"}]}, serving=False)
    check_source("s3://inbox/alice/")
    for request in ({"audio_file": "s3://inbox/bob/call.wav"}, {"audio_file": "s3://inbox/alice-2/call.wav"},
                    {"audio_file": "s3://samples-other/a.wav"},
                    {"audio_file": "s3://inbox/alice/a.wav", "speaker_verification": True,
                     "speaker_samples": [{"name": "b", "url": "s3://inbox/bob/b.wav"}]}):
        error = handler({"id": "h", "input": request})["error"]
        assert "ALLOW_S3_SOURCES" in error and "s3://inbox/alice/" in error and "\n" not in error, error
        with pytest.raises(FetchError, match="ALLOW_S3_SOURCES"):
            check_job_request(request)
    with pytest.raises(FetchError, match="ALLOW_S3_SOURCES"):
        check_source("s3://inbox/")

    env = {}
    assert s3_sources_closed(Callers({"alice": "k" * 32, "bob": "j" * 32}), env) and env == {"ALLOW_S3_SOURCES": "none"}
    assert not s3_sources_closed(Callers({"alice": "k" * 32}), {})
    kept = {"ALLOW_S3_SOURCES": "inbox/"}
    assert not s3_sources_closed(Callers({"alice": "k" * 32, "bob": "j" * 32}), kept) and kept == {
        "ALLOW_S3_SOURCES": "inbox/"}
    monkeypatch.setenv("ALLOW_S3_SOURCES", "none")
    get_settings.cache_clear()
    with pytest.raises(FetchError, match="not allowed in requests from others at all"):
        admit({"audio_file": "s3://inbox/alice/call.wav"}, serving=False)


def test_parked_runsync_waits_hold_no_thread(roots):
    """100 callers parked in runsync while the only job slot is busy: /health still answers at once."""
    from deployments.runpod_api import Jobs

    release = threading.Event()
    with serving_runpod_api(KEY, Jobs(lambda job, job_id: release.wait(120) and {"done": True}, workers=1)) as base:
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"input": {"audio_file": "https://example.com/a.wav"}}
        with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
            parked = [pool.submit(requests.post, f"{base}/e/runsync?wait=60000", json=body, headers=auth, timeout=120)
                      for _ in range(100)]
            deadline = time.monotonic() + 60
            while requests.get(f"{base}/e/health", timeout=30).json()["jobs"]["inQueue"] < 99:
                assert time.monotonic() < deadline, "the 100 calls did not arrive"
                time.sleep(0.2)
            times = []
            for _ in range(5):
                start = time.monotonic()
                assert requests.get(f"{base}/e/health", timeout=30).status_code == 200
                times.append(time.monotonic() - start)
            release.set()
            replies = [f.result() for f in parked]
        assert max(times) < 1.0, times
        assert all(r.status_code == 200 for r in replies)
        assert sum(r.json()["status"] == "COMPLETED" for r in replies) >= 1


def test_a_full_queue_answers_429_and_the_remote_cli_waits_for_room(roots):
    """One caller cannot fill the endpoint's memory: with 1 job running and --max-queued 2 waiting,
    /run and /runsync answer 429 (Retry-After, one-line error, nothing queued) to the runpod SDK and
    plain HTTP; the CLI's remote mode waits as Retry-After says and gets in once there is room, or
    gives up at its deadline with that reason."""
    import runpod

    from deployments.runpod_api import Jobs
    from flows.remote import RemoteFailed, run_endpoint

    release = threading.Event()
    table = Jobs(lambda job, job_id: {"done": release.wait(120)}, workers=1, max_queued=2)
    with serving_runpod_api(KEY, table) as base:
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"input": {"audio_file": "https://example.com/a.wav"}}
        def send() -> str:
            return requests.post(f"{base}/e/run", json=body, headers=auth, timeout=30).json()["id"]

        ids = [send()]
        deadline = time.monotonic() + 30
        while table.view(ids[0])["status"] != "IN_PROGRESS":  # the worker took it: the queue is empty again
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ids += [send(), send()]
        assert requests.get(f"{base}/e/health", timeout=30).json()["jobs"]["inQueue"] == 2
        for route in ("run", "runsync?wait=1000"):
            full = requests.post(f"{base}/e/{route}", json=body, headers=auth, timeout=30)
            assert full.status_code == 429 and full.headers["Retry-After"] == "5", full.text
            assert "the queue is full: 2 jobs wait for a worker (--max-queued 2)" in full.json()["error"]
        endpoint = runpod.Endpoint("e", api_key=KEY)
        endpoint.rp_client.endpoint_url_base = base
        with pytest.raises(requests.HTTPError, match="429"):
            endpoint.run(body["input"])
        assert len(table.jobs) == 3  # nothing was queued by the refused calls

        with pytest.raises(RemoteFailed, match="queue stayed full until --remote-timeout: HTTP 429"):
            run_endpoint(f"{base}/e", KEY, body["input"], False, 3, lambda line: None)
        shown: list[str] = []
        threading.Timer(2, release.set).start()  # room in 2 s: the CLI's second try gets in
        output = run_endpoint(f"{base}/e", KEY, body["input"], False, 120, shown.append)
        assert output == {"done": True}
        assert "the endpoint's queue is full; sending again in 5 s" in shown
        assert all(table.view(i)["status"] == "COMPLETED" for i in ids)


def test_a_deployments_queue_is_bounded_too(roots, prefect_harness):
    """--deployment: the flow runs this endpoint made that no worker started count as its queue
    (read from the Prefect API); a submit beyond --max-queued makes no flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from deployments.runpod_jobs import DeploymentJobs, QueueFull
    from flows.transcribe import transcribe_audio

    deployment_id = transcribe_audio.to_deployment(name="queue-bound").apply()  # no pool, no worker: runs wait
    table = DeploymentJobs("transcribe-audio/queue-bound")
    table.max_queued = table._queued() + 2  # runs other tests left waiting count too
    body = {"input": {"audio_file": str(DATA / "enrol_slt.wav")}}
    ids = [table.submit(body) for _ in range(2)]
    try:
        assert [table.view(i)["status"] for i in ids] == ["IN_QUEUE", "IN_QUEUE"]
        with pytest.raises(QueueFull, match="jobs wait for a worker"):
            table.submit(body)
        with get_client(sync_client=True) as client:
            made = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            assert sorted(str(r.id) for r in made) == sorted(ids)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)  # and its runs


def _wav(path, rate: int, seconds: float) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.sin(np.arange(int(rate * seconds)) * 0.3) * 8000).astype("<i2").tobytes())


def test_sample_rates_that_would_explode_on_resampling_are_refused(tmp_path):
    """A 1 Hz WAV of a few hundred samples (GBs once resampled to 16 kHz in one frame) and a 1 MHz
    one are refused with one line; 8 kHz telephone audio decodes."""
    import resource

    from speech.errors import AudioError
    from speech.io.decode import decode

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for rate in (1, 1_000, 1_000_000):
        path = tmp_path / f"r{rate}.wav"
        _wav(path, rate, 400 if rate == 1 else 1)
        with pytest.raises(AudioError, match="sample rate"):
            decode(path, path.name, 3600)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 200_000  # KB: no GB-sized buffer
    _wav(tmp_path / "tel.wav", 8000, 2)
    samples, _ = decode(tmp_path / "tel.wav", "tel", 3600)
    assert abs(samples.shape[0] - 32000) < 100


def test_enrolment_clips_are_capped_in_length_and_count(tmp_path, monkeypatch):
    """Every clip stops at MAX_SAMPLE_SECONDS (whoever asks); a request from others gives at most
    MAX_SPEAKER_SAMPLES clips (the machine's own user may enrol from as many as they like)."""
    from speech.errors import AudioError, InvalidRequest
    from speech.policy import admit
    from speech.schema import SpeakerSample
    from speech.speakers.verify import enroll

    monkeypatch.setenv("MAX_SAMPLE_SECONDS", "5")
    monkeypatch.setenv("MAX_SPEAKER_SAMPLES", "3")
    long_clip = tmp_path / "long.wav"
    _wav(long_clip, 16000, 8)
    with pytest.raises(AudioError, match="MAX_SAMPLE_SECONDS"):
        enroll([SpeakerSample(name="a", url=str(long_clip))])
    four = [{"name": f"s{i}", "url": "https://example.com/a.wav"} for i in range(4)]
    with pytest.raises(InvalidRequest, match="MAX_SPEAKER_SAMPLES"):
        admit({"audio_file": "https://example.com/b.wav", "speaker_verification": True, "speaker_samples": four},
              serving=False)
    admit({"audio_file": "https://example.com/b.wav", "speaker_verification": True, "speaker_samples": four[:3]},
          serving=False)


def test_the_download_deadline_covers_headers(slow_server, monkeypatch):
    from speech.io.audio import load_audio
    from speech.io.netguard import DeadlineExceeded

    monkeypatch.setenv("FETCH_ALLOW_HOSTS", "127.0.0.1")
    monkeypatch.setenv("HTTP_MAX_SECONDS", "3")
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="longer than 3 s"):
        load_audio(f"{slow_server}/headers")
    assert time.monotonic() - start < 6


def test_the_download_deadline_covers_every_attempt(slow_server, monkeypatch, prefect_harness):
    """A server that answers 503 after 2 s: the fetch task retries (3 retries, backoff 2-8 s),
    but all attempts together stop at HTTP_MAX_SECONDS=5 (was: 5 s per attempt, 58 s in all)."""
    from tasks.fetch import fetch_audio

    monkeypatch.setenv("FETCH_ALLOW_HOSTS", "127.0.0.1")
    monkeypatch.setenv("HTTP_MAX_SECONDS", "5")
    start = time.monotonic()
    state = fetch_audio(f"{slow_server}/busy", return_state=True)
    took = time.monotonic() - start
    assert state.is_failed()
    assert "HTTP_MAX_SECONDS" in (state.message or "") + str(state.result(raise_on_failure=False)), state
    assert took < 12, took


def test_ten_concurrent_jobs_sharing_two_file_names_each_get_their_own_outputs(prefect_harness, s3, tmp_path,
                                                                             monkeypatch):
    """5 recordings under 2 file names (a/call.wav, b/call.wav, c/call.wav, a/memo.wav,
    b/memo.wav), each sent twice at once through the endpoint with a bucket: every job's keys are
    its own (``<prefix><stem>/<job id>/``) and its URL serves its own transcript."""
    import shutil

    from deployments.runpod_api import Jobs
    from deployments.runpod_handler import handler

    files = {"a/call.wav": "enrol_slt.wav", "b/call.wav": "enrol_rms.wav", "c/call.wav": "enrol_awb.wav",
             "a/memo.wav": "enrol_kal16.wav", "b/memo.wav": "heldout_3spk.wav"}
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(DATA / source, tmp_path / name)
    monkeypatch.setenv("ALLOW_LOCAL_PATHS", str(tmp_path))
    get_settings.cache_clear()
    s3.create_bucket(Bucket="jobs-out")
    with serving_runpod_api(KEY, Jobs(lambda job, job_id: handler(job, flow_run_name=job_id), workers=2)) as base:
        auth = {"Authorization": f"Bearer {KEY}"}

        def send(name):
            body = {"input": {"audio_file": str(tmp_path / name), "language": "en", "bucket": "jobs-out",
                              "prefix_transcripts": "tx/"}}
            return name, requests.post(f"{base}/e/runsync?wait=290000", json=body, headers=auth, timeout=600).json()

        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            replies = list(pool.map(send, [*files, *files]))
    keys = set()
    texts: dict[str, set[str]] = {}
    for name, reply in replies:
        assert reply["status"] == "COMPLETED", reply.get("error")
        out = reply["output"]
        stem = name.split("/")[1].removesuffix(".wav")
        assert out["transcript_key"] == f"tx/{stem}/{reply['id']}/{stem}.json", out["transcript_key"]
        keys.add(out["transcript_key"])
        served = requests.get(out["transcript_url"], timeout=30).json()
        assert served["segments"] == out["segments"]
        texts.setdefault(name, set()).add(" ".join(s["text"] for s in out["segments"]).strip())
    assert len(keys) == 10
    assert all(len(t) == 1 for t in texts.values())  # a recording's two jobs agree
    assert len({next(iter(t)) for t in texts.values()}) == 5  # and no job got another recording's transcript


def _harness_files() -> list:
    """Everything the session's Prefect API keeps on disk: its SQLite database (-wal, -shm
    included) and the local result storage."""
    from pathlib import Path

    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_SERVER_DATABASE_CONNECTION_URL

    db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    files = [p for p in db.parent.glob(db.name + "*") if p.is_file()]
    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    return files + ([p for p in storage.rglob("*") if p.is_file()] if storage.exists() else [])


def test_no_secret_reaches_the_database_from_any_in_process_entry_point(prefect_harness, http_server, tmp_path,
                                                                       monkeypatch):
    """Canaries in URL user-info, a signature, a sample's token and a token field, through the
    CLI (one file and a batch), the handler and the in-process endpoint: after the runs, no canary
    in the Prefect database files (-wal, -shm too), result storage, the decode cache or outputs.
    The queued modes (deployment runs, task jobs) refuse such URLs before anything is stored."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from deployments.runpod_api import Jobs
    from deployments.runpod_handler import handler
    from flows.jobs import check_job_request

    monkeypatch.setenv("ALLOW_LOCAL_PATHS", str(tmp_path))
    get_settings.cache_clear()
    canaries = {}

    def request(via: str) -> dict:
        names = {k: f"{k}-{via}-canary-{os.getpid()}" for k in ("pw", "sig", "sample", "token")}
        canaries.update({v: via for v in names.values()})
        base = http_server.replace("http://", f"http://alice:{names['pw']}@")
        return {"audio_file": f"{base}/enrol_rms.wav?X-Amz-Signature={names['sig']}&v=1", "language": "en",
                "download_dir": str(tmp_path / via), "huggingface_access_token": names["token"],
                "speaker_verification": True,
                "speaker_samples": [{"name": "slt", "url": f"{http_server}/enrol_slt.wav?token={names['sample']}"}]}

    out = handler({"id": "canary-job", "input": request("handler")})
    assert "error" not in out, out
    with serving_runpod_api(KEY, Jobs(lambda job, job_id: handler(job, flow_run_name=job_id))) as base:
        reply = requests.post(f"{base}/e/runsync?wait=290000", json={"input": request("endpoint")},
                              headers={"Authorization": f"Bearer {KEY}"}, timeout=600).json()
    assert reply["status"] == "COMPLETED", reply
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    one = request("cli")
    cli = subprocess.run([sys.executable, "-m", "flows.transcribe", one["audio_file"], "--language", "en",
                          "--download-dir", one["download_dir"]], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    two = request("batch")
    batch = subprocess.run([sys.executable, "-m", "flows.transcribe", two["audio_file"],
                            two["audio_file"].replace("enrol_rms", "enrol_awb"), "--language", "en",
                            "--download-dir", two["download_dir"]], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert batch.returncode == 0, batch.stderr[-3000:]
    for refused in (request("queued"),):
        with pytest.raises(SpeechError, match="carries credentials"):
            check_job_request({k: v for k, v in refused.items() if k != "huggingface_access_token"})

    printed = cli.stdout + cli.stderr + batch.stdout + batch.stderr
    files = _harness_files() + [p for p in tmp_path.rglob("*") if p.is_file()] + \
        [p for p in get_settings().cache_dir.rglob("*") if p.is_file() and p.suffix != ".npy"]
    assert sum(".db" in p.name for p in files) >= 1 and len(files) > 10  # the database itself is read
    blobs = [(p, p.read_bytes()) for p in files]
    for canary, via in canaries.items():
        if via == "queued":
            continue
        assert canary not in printed, (canary, "printed")
        leaked = [str(p) for p, blob in blobs if canary.encode() in blob]
        assert not leaked, (canary, leaked)


def test_a_set_the_bucket_refuses_is_kept_in_the_jobs_own_folder(roots, tmp_path):
    """A request from others names a bucket that will fail and, as download_dir, another job's
    folder: the set kept locally lands under this job's own key inside it, never over the other
    job's files; with no download_dir, under RESULTS_DIR the same way (the bucket key's folders)."""
    from speech.policy import admit, job_scoped
    from speech.io.store import kept_folder

    victim = tmp_path / "results" / "meeting" / "victim-job"
    for download_dir in (str(victim), None):
        raw = {"audio_file": "https://example.com/meeting.wav", "bucket": "no-such-bucket-zz",
               **({"download_dir": download_dir} if download_dir else {})}
        req = job_scoped(admit(raw, serving=False), "attacker-job")
        kept = str(kept_folder(req.download_dir, req.prefix_transcripts))
        base = victim if download_dir else tmp_path / "results"
        assert kept == str(base / "transcripts" / "meeting" / "attacker-job"), kept
    assert str(kept_folder(str(victim), "../../../etc/")) == str(victim / "etc")


def test_a_webhook_failure_is_logged_without_its_token(caplog, monkeypatch):
    """The receiver refuses the connection: the endpoint logs the failure, but not the webhook
    URL's path or query (urllib3 quotes them in its error, and they carry the receiver's token)."""
    import logging
    import socket

    from deployments.webhooks import deliver

    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with caplog.at_level(logging.WARNING, logger="deployments.webhooks"):
        assert not deliver(f"http://127.0.0.1:{dead}/hooks/tok-path-canary?token=tok-query-canary",
                           {"id": "j1", "status": "COMPLETED"}, timeout=5, max_seconds=30)
    logged = caplog.text
    assert "not delivered" in logged and "j1" in logged, logged
    assert "canary" not in logged, logged


def test_the_compose_stack_is_closed_by_default():
    """infra/docker-compose.yml read as compose reads it: every published port binds to
    ${BIND_ADDRESS:-127.0.0.1}; the Prefect server wants basic auth and every Prefect client
    sends it; MinIO has no default credentials; the Docker socket only in an opt-in profile."""
    import yaml

    text = (ROOT / "infra" / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    assert "minioadmin" not in text
    services = compose["services"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
        env = svc.get("environment", {})
        if "PREFECT_API_URL" in env:
            assert str(env.get("PREFECT_API_AUTH_STRING", "")).startswith("${PREFECT_AUTH:?"), name
        for key in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if key in env:
                assert ":?" in str(env[key]), (name, key, env[key])
        if any("docker.sock" in str(v) for v in svc.get("volumes", [])):
            assert svc.get("profiles"), f"{name} mounts the Docker socket without being opt-in"
    server = services["prefect-server"]["environment"]
    assert str(server["PREFECT_SERVER_API_AUTH_STRING"]).startswith("${PREFECT_AUTH:?")
    example = (ROOT / "infra" / ".env.example").read_text()
    assert all(f"{k}=" in example for k in ("PREFECT_AUTH", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "BIND_ADDRESS"))


def test_idle_and_dripping_connections_are_closed_after_the_head_deadline(roots, tmp_path):
    """Sockets that connect and send nothing, or drip their request line, would each hold one of
    --max-connections for ever (uvicorn times only idle keep-alive connections): the endpoint
    closes them HEAD_SECONDS after they opened; /health answers meanwhile, and a keep-alive
    connection serves a second request after its first."""
    import os
    import signal
    import socket

    from deployments.local_server import start_endpoint
    from deployments.runpod_api import HEAD_SECONDS

    proc, base = start_endpoint({**os.environ, "ALLOW_LOCAL_PATHS": str(DATA)}, tmp_path / "endpoint.log", KEY,
                                "--max-connections", "20", endpoint_id="e")
    try:
        port = int(base.split(":")[2].split("/", 1)[0])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(8)]
        drip = socket.create_connection(("127.0.0.1", port), timeout=30)
        started = time.monotonic()
        assert requests.get(f"{base}/health", timeout=10).status_code == 200
        with requests.Session() as keep_alive:  # one connection, two requests: the deadline is per request head
            assert keep_alive.get(f"{base}/health", timeout=10).status_code == 200
            time.sleep(2)
            assert keep_alive.get(f"{base}/health", timeout=10).status_code == 200
        for byte in b"POST /v2/e/run HTTP/1.1\r\nHost: 127.0.0.1\r\n":
            try:
                drip.sendall(bytes([byte]))
            except OSError:  # closed on us
                break
            if time.monotonic() - started > HEAD_SECONDS + 5:
                break
            time.sleep(0.5)
        for sock in [*idle, drip]:
            sock.settimeout(HEAD_SECONDS + 10 - (time.monotonic() - started))
            try:
                assert sock.recv(100) == b""  # closed by the endpoint
            except ConnectionResetError:
                pass
        closed_after = time.monotonic() - started
        assert HEAD_SECONDS - 1 <= closed_after <= HEAD_SECONDS + 6, closed_after
        assert requests.get(f"{base}/health", timeout=10).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def test_an_s3_endpoint_that_resolves_elsewhere_after_the_check_is_not_reached(roots, monkeypatch):
    """DNS rebinding: a request's s3_endpoint resolves to a public address when the policy checks
    it, then to 127.0.0.1 (an internal service) when the outputs are written. A process serving
    others connects only to checked addresses, each time: the internal service sees nothing. (The
    CLI's own process, which serves no one else, connects as boto3 does: the control.)"""
    import http.server
    import socket

    from speech import policy
    from speech.io.s3 import s3_client_for
    from speech.policy import admit
    from speech.contracts import S3Options

    monkeypatch.delenv("ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.delenv("FETCH_ALLOW_HOSTS", raising=False)
    get_settings.cache_clear()
    hits = []

    class Internal(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_PUT(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    internal = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Internal)
    threading.Thread(target=internal.serve_forever, daemon=True).start()
    port = internal.server_address[1]
    flipped = threading.Event()
    real = socket.getaddrinfo

    def rebinding(host, service, *args, **kwargs):
        if host == "storage.attacker.example":
            ip = "127.0.0.1" if flipped.is_set() else "93.184.216.34"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(service)))]
        return real(host, service, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    try:
        req = admit({"audio_file": "https://example.com/a.wav", "bucket": "b", "access_key": "a", "secret_key": "b",
                     "s3_endpoint": f"http://storage.attacker.example:{port}"}, serving=False)
        flipped.set()
        with pytest.raises(Exception) as refused:
            s3_client_for(S3Options.from_request(req)).put_object(Bucket="b", Key="k", Body=b"transcript")
        chain, seen = [], refused.value
        while seen is not None:
            chain.append(seen)
            seen = seen.__cause__ or seen.__context__ or getattr(seen, "kwargs", {}).get("error")
        assert any("not a public address" in str(e) for e in chain), chain
        assert hits == []
        monkeypatch.setattr(policy, "_SERVING_OTHERS", False)  # the control: a process serving no one else
        s3_client_for(S3Options.from_request(req)).put_object(Bucket="b", Key="k", Body=b"transcript")
        assert hits == ["/b/k"]
    finally:
        internal.shutdown()


def test_a_batch_runs_own_output_names_are_scoped_to_the_run(roots, monkeypatch):
    """A deployment batch run names a second call.wav call-2 itself (a caller cannot give
    output_name for several files): those outputs go under the run's own key like any file's,
    never the shared <prefix>call-2.* keys another run could write; a single-file run's
    output_name from its caller still asks for the shared keys."""
    from flows.runtime import admit_deployment_run
    from speech.schema import TranscriptionRequest

    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "00000000-0000-0000-0000-000000000001")
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "00000000-0000-0000-0000-00000000000b")
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__FLOW_NAME", "transcribe-batch")
    req = TranscriptionRequest.parse({"audio_file": "https://example.com/b/call.wav", "bucket": "out",
                                      "output_name": "call-2"})
    scoped = admit_deployment_run(req)
    assert scoped.prefix_transcripts == "transcripts/call-2/00000000-0000-0000-0000-00000000000b/", scoped
    assert scoped.output_name == "call-2"
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__FLOW_NAME", "transcribe-audio")
    assert admit_deployment_run(req).prefix_transcripts is None


def test_a_requests_s3_endpoint_that_answers_a_byte_at_a_time_is_cut_off(roots, monkeypatch):
    """botocore's timeouts are per read: an S3 endpoint of the caller's that answers a byte every
    half second would hold the run for minutes per request. In a process serving others no
    connection to it lives past HTTP_MAX_SECONDS: the write fails in seconds."""
    import socketserver

    from speech.io.s3 import s3_client_for
    from speech.policy import admit
    from speech.contracts import S3Options

    class Trickle(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                self.request.recv(65536)
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n")
                for _ in range(200):
                    self.request.sendall(b" ")
                    time.sleep(0.5)
            except OSError:
                pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HTTP_MAX_SECONDS", "2")
    get_settings.cache_clear()
    outcome = {}

    def write():
        started = time.monotonic()
        try:
            s3_client_for(S3Options.from_request(req)).put_object(Bucket="b", Key="k", Body=b"transcript")
            outcome["result"] = "written"
        except Exception as exc:  # noqa: BLE001 - what the run would report
            outcome["result"] = type(exc).__name__
        outcome["seconds"] = time.monotonic() - started

    try:
        req = admit({"audio_file": "https://example.com/a.wav", "bucket": "b", "access_key": "a", "secret_key": "b",
                     "s3_endpoint": f"http://127.0.0.1:{server.server_address[1]}"}, serving=False)
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(40)
        assert not writer.is_alive(), "the write was still waiting on the trickling endpoint after 40 s"
        assert outcome["result"] != "written" and outcome["seconds"] < 30, outcome
    finally:
        server.shutdown()


@pytest.fixture
def swapped(tmp_path, monkeypatch):
    """A root the caller can write to, a file outside it the worker can read, and the admission
    check already passed: what a caller has after swapping its admitted file for a link."""
    import shutil

    root, outside = tmp_path / "inbox", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    shutil.copy(DATA / "sample_2spk.wav", outside / "someone-elses.wav")
    shutil.copy(DATA / "sample_2spk.wav", root / "mine.wav")
    monkeypatch.setenv("ALLOW_LOCAL_PATHS", str(root))
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    from speech.policy import check_local_path
    from speech.settings import get_settings

    check_local_path(str(root / "mine.wav"), get_settings())  # admitted: a regular file inside the root
    (root / "mine.wav").unlink()
    (root / "mine.wav").symlink_to(outside / "someone-elses.wav")  # ...then swapped
    return root, outside


def test_a_file_swapped_for_a_link_after_admission_reads_nothing_outside(swapped):
    """A request from someone else opens its local file once and checks the file it opened: a link
    swapped in after admission is refused (a missing target reads the same), a link inside the
    roots is read, and later stages read a copy, not the path. The machine's own runs still follow
    links anywhere (the control)."""
    from speech.errors import FetchError
    from speech.io.audio import load_audio
    from speech.policy import request_from_others

    root, outside = swapped
    assert load_audio(str(root / "mine.wav"), decode_now=False).size_bytes > 0  # the machine's own run: read
    with request_from_others():
        with pytest.raises(FetchError, match="ALLOW_LOCAL_PATHS") as refused:
            load_audio(str(root / "mine.wav"), decode_now=False)
        (root / "gone.wav").symlink_to(outside / "missing.wav")
        with pytest.raises(FetchError, match="ALLOW_LOCAL_PATHS") as missing:
            load_audio(str(root / "gone.wav"), decode_now=False)
        assert str(refused.value) == str(missing.value)  # no existence oracle outside the roots
        (root / "inside.wav").symlink_to(DATA / "sample_2spk.wav")
        # bytes of its own (trailing padding), so no other test has cached its samples
        (root / "real.wav").write_bytes((DATA / "sample_2spk.wav").read_bytes() + b"\0\0")
        (root / "link-inside.wav").symlink_to(root / "real.wav")
        ref = load_audio(str(root / "link-inside.wav"), decode_now=False)
        assert ref.temporary and ref.local_path and Path(ref.local_path).parent != root  # a copy the run owns
        assert Path(ref.local_path).read_bytes() == (root / "real.wav").read_bytes()
        with pytest.raises(FetchError, match="ALLOW_LOCAL_PATHS"):  # a link out of the roots, inside them
            load_audio(str(root / "inside.wav"), decode_now=False)
        from speech.io.audio import release

        release(ref)
        assert not Path(ref.local_path).exists()
        # a saved API response (deepgram_json_in, pyannote_json_in) is held to the roots the same way
        from speech.confidence.deepgram import load_response_json
        from speech.errors import InvalidRequest

        (outside / "theirs.deepgram.json").write_text('{"results": {}}')
        (root / "mine.deepgram.json").symlink_to(outside / "theirs.deepgram.json")
        with pytest.raises(InvalidRequest, match="ALLOW_LOCAL_PATHS"):
            load_response_json(root / "mine.deepgram.json")
    assert load_response_json(root / "mine.deepgram.json") == {"results": {}}  # the machine's own run


def test_a_fifo_swapped_in_is_refused_at_once(tmp_path):
    """Opening a local file never waits: a FIFO (no writer will come) is refused, not waited on."""
    import os
    import threading

    from speech.errors import FetchError
    from speech.io.fetch import fetch

    os.mkfifo(tmp_path / "pipe.wav")
    errors: list = []
    reader = threading.Thread(target=lambda: errors.append(pytest.raises(FetchError, fetch, str(tmp_path / "pipe.wav"))),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "the fetch waited on a FIFO"
    assert "not a regular file" in str(errors[0].value)


def test_every_entry_point_checks_the_file_it_opens(swapped, monkeypatch, prefect_harness, tmp_path):
    """The handler (and so the in-process endpoint), a deployment run and a task worker's job run
    their request inside request_from_others: with the admission check passed (as before a swap),
    the file opened is still refused; nothing is written."""
    import speech.policy
    from deployments.runpod_handler import handler

    root, _ = swapped
    monkeypatch.setattr(speech.policy, "check_local_path", lambda *a, **k: None)  # admitted before the swap
    request = {"audio_file": str(root / "mine.wav"), "language": "en", "download_dir": str(tmp_path / "results")}
    error = handler({"id": "swap-1", "input": request}).get("error", "")
    assert "ALLOW_LOCAL_PATHS" in error and "\n" not in error, error
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "00000000-0000-0000-0000-000000000001")
    from flows.transcribe import transcribe_audio

    with pytest.raises(SpeechError, match="ALLOW_LOCAL_PATHS"):
        transcribe_audio(**request)
    monkeypatch.delenv("PREFECT__RUNTIME__DEPLOYMENT__ID")
    from flows.jobs import transcribe_job

    with pytest.raises(SpeechError, match="ALLOW_LOCAL_PATHS"):
        transcribe_job(request)
    # a deployment run's GPU unit on a task worker: its plan says whose request it is
    from flows.gpu import GpuPlan, gpu_stages
    from speech.io.audio import load_audio
    from speech.contracts import TranscribeParams
    from speech.schema import SpeakerSample

    plan = GpuPlan(transcribe=TranscribeParams(language="en"), others=True,
                   samples=[SpeakerSample(name="alice", url=str(root / "mine.wav"))])
    with pytest.raises(SpeechError, match="ALLOW_LOCAL_PATHS"):
        gpu_stages.fn(load_audio(str(DATA / "sample_2spk.wav")), plan)
    assert not [f for f in (tmp_path / "results").rglob("*") if f.is_file()]
