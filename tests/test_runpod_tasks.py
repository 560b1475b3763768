"""The RunPod-compatible endpoint's throughput path (``--task-workers``): each job is one
background task run of ``transcribe-job`` on a warm task worker (a separate process with its own
home and cache; results reach the endpoint through the bucket), driven by the official ``runpod``
SDK. The job id is the task run id; status and output come from Prefect's task-run API (a new
service answers the same); a queued job cancelled is skipped by the worker, a running one stops;
a full queue answers 429; another caller (a key of its own) sees none of these jobs and has its
own share of the queue; the trust policy and the token rule hold at the edge."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import DATA, runpod_sdk, serving_runpod_api, wer, wer_limit
from deployments.local_server import start_task_worker, stop, wait_for_task_workers

pytestmark = pytest.mark.prefect
ROOT = Path(__file__).resolve().parents[1]
KEY = "task-endpoint-key"
OTHER_KEY = "another-callers-key"
STORAGE = "s3://task-results/prefect"


@pytest.fixture(scope="module")
def worker(prefect_harness, s3_server, tmp_path_factory):
    from prefect.settings import PREFECT_API_URL

    from speech.io.s3 import s3_client
    from speech.settings import get_settings

    for bucket in ("task-results", "task-out"):
        s3_client(get_settings()).create_bucket(Bucket=bucket)
    out = tmp_path_factory.mktemp("task-out")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "ALLOW_LOCAL_PATHS": f"{DATA}:{out}",
           "PREFECT_HOME": str(tmp_path_factory.mktemp("worker-home")),
           "SPEECH_CACHE_DIR": str(tmp_path_factory.mktemp("worker-cache")), "RESULTS_STORAGE": STORAGE}
    proc = start_task_worker(env, out / "worker.log")
    try:
        wait_for_task_workers(PREFECT_API_URL.value(), 1, procs=(proc,))
        yield out
    finally:
        stop(proc)


@pytest.fixture
def jobs(worker, monkeypatch):
    """The endpoint's settings: the same result storage, and local paths allowed where the worker allows them."""
    from deployments.runpod_api import TaskJobs
    from speech.settings import get_settings

    monkeypatch.setenv("RESULTS_STORAGE", STORAGE)
    monkeypatch.setenv("ALLOW_LOCAL_PATHS", f"{DATA}:{worker}")
    get_settings.cache_clear()
    table = TaskJobs(watch_every=1.0)
    yield table
    table.stopping.set()
    get_settings.cache_clear()


def _status(base: str, job_id: str) -> dict:
    return requests.get(f"{base}/e/status/{job_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()


def test_a_job_is_a_task_run_on_a_warm_worker(jobs, worker, monkeypatch, manifest):
    from prefect.client.orchestration import get_client

    with serving_runpod_api(KEY, jobs) as base:
        runpod = runpod_sdk(monkeypatch, KEY, base)
        job = runpod.Endpoint("e").run({"audio_file": str(DATA / "sample_2spk.wav"), "language": "en",
                                        "bucket": "task-out", "prefix_transcripts": "jobs/"})
        out = job.output(timeout=300)
        assert job.status() == "COMPLETED", _status(base, job.job_id)
    assert wer(manifest["sample_2spk.wav"]["text"], " ".join(s["text"] for s in out["segments"])) <= wer_limit("sample_2spk.wav")
    assert out["transcript_key"] == f"jobs/sample_2spk/{job.job_id}/sample_2spk.json"  # the job's own key
    assert requests.get(out["transcript_url"], timeout=30).json()["segments"] == out["segments"]
    with get_client(sync_client=True) as client:
        run = client.read_task_run(uuid.UUID(job.job_id))  # the job is the task run
    assert run.state.is_completed() and {"runpod-api", "transcribe-job"} <= set(run.tags)
    assert run.flow_run_id is None  # no flow run, no process per job

    from deployments.runpod_api import TaskJobs

    again = TaskJobs(watch_every=60)  # a restarted endpoint reads the same job back
    try:
        with serving_runpod_api(KEY, again) as base:
            view = _status(base, job.job_id)
            assert view["status"] == "COMPLETED" and view["output"]["segments"] == out["segments"]
            for other in (uuid.uuid4(), "not-a-uuid"):
                assert requests.get(f"{base}/e/status/{other}", headers={"Authorization": f"Bearer {KEY}"},
                                    timeout=30).status_code == 404
    finally:
        again.stopping.set()


def test_cancelling_queued_and_running_jobs(jobs, worker):
    """The worker (limit 1) runs a long job; a second one waits in the queue. Cancelled, the queued
    one is skipped by the worker when it comes to it; the running one stops and writes nothing."""
    import numpy as np
    import soundfile as sf

    clip, rate = sf.read(str(DATA / "diar_4spk.wav"), dtype="float32")
    long = worker / "long.wav"
    sf.write(str(long), np.tile(clip, int(240 * rate // len(clip)) + 1), rate)
    from deployments.callers import Callers

    ok, other = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER_KEY}"}
    with serving_runpod_api(Callers({"default": KEY, "mallory": OTHER_KEY}), jobs) as base:
        def submit(name: str) -> str:
            body = {"input": {"audio_file": str(long), "language": "en", "diarization": True, "force": True,
                              "download_dir": str(worker / name)}}  # outputs: <name>/long/<job id>/
            return requests.post(f"{base}/e/run", json=body, headers=ok, timeout=60).json()["id"]

        running, queued = submit("running"), submit("queued")
        deadline = time.monotonic() + 300
        while _status(base, running)["status"] != "IN_PROGRESS":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert _status(base, queued)["status"] == "IN_QUEUE"
        jobs.max_queued = 1  # --max-queued 1: one job waits already, the next is refused and never handed over
        full = requests.post(f"{base}/e/run", json={"input": {"audio_file": str(long)}}, headers=ok, timeout=60)
        assert full.status_code == 429 and "the queue is full: 1 jobs wait" in full.json()["error"], full.text
        assert jobs._count(("SCHEDULED", "PENDING")) == 1
        jobs.max_queued, jobs.per_caller = 1000, 1  # another caller: its own share, and none of these jobs
        for route, method in (("status", requests.get), ("cancel", requests.post), ("stream", requests.get)):
            seen = method(f"{base}/e/{route}/{queued}", headers=other, timeout=60)
            assert seen.status_code == 404 and seen.json() == {"error": f"no job {queued}"}
        mine = requests.post(f"{base}/e/run", json={"input": {"audio_file": str(long)}}, headers=other, timeout=60)
        assert mine.status_code == 200, mine.text
        assert "your share of the queue is full: 1 of your jobs" in requests.post(
            f"{base}/e/run", json={"input": {"audio_file": str(long)}}, headers=ok, timeout=60).json()["error"]
        assert requests.post(f"{base}/e/purge-queue", headers=other, timeout=60).json()["removed"] == 1
        assert _status(base, queued)["status"] == "IN_QUEUE"
        assert requests.get(f"{base}/e/status/{mine.json()['id']}", headers=other, timeout=60).json()["status"] == \
            "CANCELLED"
        jobs.per_caller = None
        assert requests.post(f"{base}/e/cancel/{queued}", headers=ok, timeout=60).json()["status"] == "CANCELLED"
        assert requests.post(f"{base}/e/cancel/{running}", headers=ok, timeout=60).json()["status"] == "CANCELLED"
        while "skipped task run" not in (worker / "worker.log").read_text():  # the worker came to it
            assert time.monotonic() < deadline, (worker / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        assert _status(base, running)["status"] == _status(base, queued)["status"] == "CANCELLED"
    for name in ("running", "queued"):
        assert not (worker / name).exists() or not [p for p in (worker / name).rglob("*") if p.is_file()]


def test_policy_tokens_and_failures_at_the_edge(jobs, worker, tmp_path):
    ok = {"Authorization": f"Bearer {KEY}"}
    outside = tmp_path / "private.wav"
    outside.write_bytes((DATA / "enrol_slt.wav").read_bytes())
    with serving_runpod_api(KEY, jobs) as base:
        def run(body: dict) -> dict:
            job = requests.post(f"{base}/e/runsync?wait=120000", headers=ok, timeout=200, json={"input": body}).json()
            return _status(base, job["id"]) if job["status"] not in ("COMPLETED", "FAILED") else job

        refused = run({"audio_file": str(outside)})  # outside ALLOW_LOCAL_PATHS: no task run is made
        assert refused["status"] == "FAILED" and "ALLOW_LOCAL_PATHS" in refused["error"], refused
        token = run({"audio_file": str(DATA / "enrol_slt.wav"), "deepgram_api_key": "dg-secret-123"})
        assert token["status"] == "FAILED" and "prefect-secret:" in token["error"]
        assert "dg-secret-123" not in str(token)
        model = run({"audio_file": str(DATA / "enrol_slt.wav"), "model": "bundled:tiny.en"})
        assert model["status"] == "FAILED" and "this worker serves bundled:base" in model["error"], model
        missing = run({"audio_file": str(DATA / "missing.wav")})
        assert missing["status"] == "FAILED" and "not found" in missing["error"], missing
        for failed in (model, missing):
            assert "\n" not in failed["error"] and "encountered an exception" not in failed["error"]
        health = requests.get(f"{base}/e/health", timeout=30).json()
    assert health["jobs"]["failed"] >= 4


def test_a_sweep_sends_each_new_file_to_task_workers(jobs, worker):
    """sweep_inbox(via="task-workers"): one transcribe-job per new file (no flow run per file),
    watched until done; the next sweep sends nothing and reports the failed file."""
    import shutil

    from flows.sweep import sweep_inbox

    inbox, out = worker / "inbox", worker / "swept"
    inbox.mkdir()
    shutil.copy(DATA / "enrol_slt.wav", inbox / "a.wav")
    shutil.copy(DATA / "enrol_rms.wav", inbox / "b.wav")
    (inbox / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEnot really audio" * 50)
    request = {"language": "en", "download_dir": str(out)}
    first = sweep_inbox(str(inbox), glob="*.wav", request=request, via="task-workers", max_attempts=1)
    assert first == {"triggered": 3, "done": 2, "skipped": 0, "failed": 1, "deferred": 0}, first
    # each job under its own key: <download_dir>/<stem>/<task run id>/<stem>.json
    assert sorted(p.name for p in out.glob("*/*/*.json") if p.name.count(".") == 1) == ["a.json", "b.json"]
    again = sweep_inbox(str(inbox), glob="*.wav", request=request, via="task-workers", max_attempts=1)
    assert again == {"triggered": 0, "done": 0, "skipped": 2, "failed": 1, "deferred": 0}, again


def test_a_sweep_watches_jobs_an_earlier_sweep_left_unfinished(jobs, worker):
    """An earlier sweep died together with the worker running its file's job (the job left
    Running, claimed by a worker that is gone): the next sweep does not skip the file as done
    for ever, it watches the job too; the job runs again on a live worker and the file is done."""
    import shutil

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterTags
    from prefect.states import Running

    from flows.dispatch import write_claim
    from flows.jobs import transcribe_job
    from flows.sweep import sweep_inbox
    from tasks.storage import task_result_storage

    def sweep_jobs() -> set:  # the transcribe-job runs of sweeps (not the stage runs inside them)
        with get_client(sync_client=True) as client:
            return {r.id for r in client.read_task_runs(task_run_filter=TaskRunFilter(
                tags=TaskRunFilterTags(all_=["sweep"])), limit=200) if r.task_key == transcribe_job.task_key}

    inbox, out = worker / "inbox-orphan", worker / "swept-orphan"
    inbox.mkdir()
    shutil.copy(DATA / "enrol_awb.wav", inbox / "orphan.wav")
    request = {"language": "en", "download_dir": str(out)}
    before = sweep_jobs()
    first = sweep_inbox(str(inbox), glob="*.wav", request=request, via="task-workers", max_attempts=1)
    assert first["done"] == 1, first
    (job,) = sweep_jobs() - before
    with get_client(sync_client=True) as client:  # as if its sweep and its worker had died mid-run
        client.set_task_run_state(job, Running(), force=True)
    write_claim(task_result_storage(), job, "a-task-worker-that-died")
    again = sweep_inbox(str(inbox), glob="*.wav", request=request, via="task-workers", max_attempts=1)
    assert again == {"triggered": 0, "done": 1, "skipped": 0, "failed": 0, "deferred": 0}, again
    with get_client(sync_client=True) as client:
        run = client.read_task_run(job)
    assert run.state.is_completed() and run.run_count >= 2, (run.state, run.run_count)
