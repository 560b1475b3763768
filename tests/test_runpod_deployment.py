"""The RunPod-compatible endpoint in deployment mode (issue 14): each job is a run of a Prefect
deployment, executed by a separate process (a runner serving the deployment, as
``deployments/serve.py`` does), driven by the official ``runpod`` SDK. The job id is the flow run
id, the status outlives a restart of the service, a running job can be cancelled (the runner
stops its process), and tokens never become stored parameters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import DATA, runpod_sdk, serving_runpod_api, wer, wer_limit

from deployments.local_server import stop

ROOT = Path(__file__).resolve().parents[1]
KEY = "deployment-endpoint-key"
DEPLOYMENT = "transcribe-audio/runpod-api-test"
SERVE = ("from flows.transcribe import transcribe_audio\n"
         "transcribe_audio.serve(name='runpod-api-test', limit=2, print_starting_message=False)\n")


@pytest.fixture(scope="module")
def runner(prefect_harness, s3_server, tmp_path_factory):
    """A separate process serving the transcribe flow as a deployment against the test API, with
    a home of its own: results reach the service only through the bucket (RESULTS_STORAGE)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from speech.io.s3 import s3_client
    from speech.settings import get_settings

    for bucket in ("runpod-results", "runpod-out"):
        s3_client(get_settings()).create_bucket(Bucket=bucket)
    out = tmp_path_factory.mktemp("deployment-out")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "ALLOW_LOCAL_PATHS": f"{DATA}:{out}", "PYTHONPATH": str(ROOT),
           "PREFECT_HOME": str(tmp_path_factory.mktemp("runner-home")),
           "SPEECH_CACHE_DIR": str(tmp_path_factory.mktemp("runner-cache")),
           "RESULTS_STORAGE": "s3://runpod-results/prefect"}
    log = (out / "runner.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", SERVE], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.read_deployment_by_name(DEPLOYMENT)
                break
            except Exception:  # noqa: BLE001 - not registered yet
                assert proc.poll() is None and time.monotonic() < deadline, (out / "runner.log").read_text()[-3000:]
                time.sleep(1)
    yield out
    stop(proc, grace=5)  # the runner and the flow-run processes it started
    log.close()


@pytest.fixture
def service(runner, monkeypatch):
    from deployments.runpod_api import DeploymentJobs

    monkeypatch.setenv("ALLOW_LOCAL_PATHS", f"{DATA}:{runner}")  # the endpoint checks jobs at its edge too

    with serving_runpod_api(KEY, DeploymentJobs(DEPLOYMENT)) as base:
        yield base


@pytest.fixture
def sdk(service, monkeypatch):
    return runpod_sdk(monkeypatch, KEY, service)


def _status(base: str, job_id: str) -> dict:
    return requests.get(f"{base}/e/status/{job_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()


def test_a_job_is_a_deployment_run_and_outlives_a_restart(sdk, runner, manifest):
    from prefect.client.orchestration import get_client

    from deployments.runpod_api import DeploymentJobs

    job = sdk.Endpoint("whisperx").run({"audio_file": str(DATA / "sample_2spk.wav"), "align_output": True,
                                        "bucket": "runpod-out", "prefix_transcripts": "jobs/"})
    out = job.output(timeout=600)
    assert job.status() == "COMPLETED", _status(sdk.endpoint_url_base, job.job_id)
    # the result came through the bucket (the runner has its own home); the outputs' keys are presigned
    # under the job's own key: <prefix><stem>/<flow run id>/
    assert out["transcript_key"] == f"jobs/sample_2spk/{job.job_id}/sample_2spk.json"
    assert out["segments_key"] == f"jobs/sample_2spk/{job.job_id}/sample_2spk.segments.json"
    assert requests.get(out["transcript_url"], timeout=30).json()["segments"] == out["segments"]
    assert wer(manifest["sample_2spk.wav"]["text"], " ".join(s["text"] for s in out["segments"])) <= wer_limit("sample_2spk.wav")
    assert out["detected_language"] == "en" and all("words" in s for s in out["segments"])
    with get_client(sync_client=True) as client:  # the job id is the flow run of the deployment
        run = client.read_flow_run(uuid.UUID(job.job_id))
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        stored = client.read_block_document(run.state.data.storage_block_id)  # the run's result record
    assert run.deployment_id == deployment.id and run.state.is_completed()
    assert stored.block_type.slug == "s3-bucket" and stored.data["bucket_name"] == "runpod-results"
    assert run.parameters["condition_on_previous_text"] is True  # the worker's envelope semantics travel
    assert "batch_size" not in run.parameters  # only what the job set: the deployment's defaults stand

    from prefect.deployments import run_deployment

    other_run = run_deployment(DEPLOYMENT, parameters={"audio_file": str(runner / "not-a-job.wav")}, timeout=0).id

    # a restarted service (a new job table) still answers for the job, from the Prefect API
    with serving_runpod_api(KEY, DeploymentJobs(DEPLOYMENT)) as base:
        again = _status(base, job.job_id)
        assert again["status"] == "COMPLETED" and again["output"]["segments"] == out["segments"]
        assert again["executionTime"] > 0
        for other in (uuid.uuid4(), other_run):  # unknown, or a flow run this endpoint did not start
            assert requests.get(f"{base}/e/status/{other}", headers={"Authorization": f"Bearer {KEY}"},
                                timeout=30).status_code == 404


def test_cancelling_a_running_job_stops_its_run(service, runner):
    """A job long enough (5 min of speech, aligned and diarized: minutes on 2 cores) that only the
    cancellation can end it early: the run ends Cancelled and writes no outputs."""
    import numpy as np
    import soundfile as sf

    from prefect.client.orchestration import get_client

    clip, rate = sf.read(str(DATA / "diar_4spk.wav"), dtype="float32")
    long = runner / "long.wav"
    sf.write(str(long), np.tile(clip, int(300 * rate // len(clip)) + 1), rate)
    out = runner / "cancelled"
    ok = {"Authorization": f"Bearer {KEY}"}
    body = {"input": {"audio_file": str(long), "diarization": True, "align_output": True, "force": True,
                      "download_dir": str(out)}}
    job_id = requests.post(f"{service}/e/run", json=body, headers=ok, timeout=60).json()["id"]
    deadline = time.monotonic() + 300
    while (status := _status(service, job_id)["status"]) != "IN_PROGRESS":  # one look per turn: no race
        assert time.monotonic() < deadline and status == "IN_QUEUE", status
        time.sleep(0.5)
    answer = requests.post(f"{service}/e/cancel/{job_id}", headers=ok, timeout=60).json()
    assert answer["status"] == "CANCELLED"
    with get_client(sync_client=True) as client:  # the runner stops the process: the run ends CANCELLED
        deadline = time.monotonic() + 120
        while not (state := client.read_flow_run(uuid.UUID(job_id)).state).is_final():
            assert time.monotonic() < deadline, state
            time.sleep(1)
    assert state.is_cancelled(), state
    assert _status(service, job_id)["status"] == "CANCELLED"
    assert not out.exists() or not list(out.iterdir())  # stopped before any output was written


def test_failures_and_tokens(service, runner):
    ok = {"Authorization": f"Bearer {KEY}"}
    # a bad input fails in the run, answered with the handler's one-line error
    bad = requests.post(f"{service}/e/runsync?wait=120000", headers=ok, timeout=200,
                        json={"input": {"audio_file": str(runner / "missing.wav")}}).json()
    assert bad["status"] == "FAILED" and "not found" in bad["error"], bad
    assert "Flow run encountered" not in bad["error"] and "Traceback" not in bad["error"]
    # a token would be stored in the queued run's parameters: refused before a run is made
    token = requests.post(f"{service}/e/run", headers=ok, timeout=60, json={"input": {
        "audio_file": str(DATA / "sample_2spk.wav"), "deepgram_api_key": "dg-secret-123"}}).json()
    refused = _status(service, token["id"])
    assert refused["status"] == "FAILED" and "prefect-secret:" in refused["error"]
    assert "dg-secret-123" not in str(refused)
    invalid = requests.post(f"{service}/e/run", headers=ok, timeout=60,
                            json={"input": {"audio_file": "a.wav", "batch_size": 0}}).json()
    assert "batch_size" in _status(service, invalid["id"])["error"]
    health = requests.get(f"{service}/e/health", timeout=30).json()
    assert health["jobs"]["failed"] >= 3 and health["jobs"]["completed"] >= 1


def test_the_cli_remote_mode_runs_a_file_through_the_deployment(runner, s3, tmp_path, capsys, manifest):
    """``--deployment``: a local file goes up to the bucket and the run gets its s3:// URI (no
    signed URL among stored parameters); the result comes back through RESULTS_STORAGE and the
    outputs are written here. Without a bucket the absolute path is sent (the runner allows it).
    A token would be stored with the run: refused before a run is made."""
    from prefect.client.orchestration import get_client

    from flows.cli import main

    s3.create_bucket(Bucket="runpod-audio")
    out = tmp_path / "out"
    code = main(["--deployment", DEPLOYMENT, str(DATA / "sample_2spk.wav"), "--bucket", "runpod-audio",
                 "--language", "en", "--download-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "sample_2spk.json", "sample_2spk.segments.json", "sample_2spk.srt", "sample_2spk.vtt"]
    result = json.loads((out / "sample_2spk.json").read_text())
    assert wer(manifest["sample_2spk.wav"]["text"], " ".join(s["text"] for s in result["segments"])) \
        <= wer_limit("sample_2spk.wav")
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
    sent = [r for r in runs if r.parameters.get("audio_file") == "s3://runpod-audio/audio/sample_2spk.wav"]
    assert len(sent) == 1 and sent[0].state.is_completed()
    assert "X-Amz" not in json.dumps(sent[0].parameters)

    local = tmp_path / "local"  # two files, two runs at once (the command's threads each reach the API)
    assert main(["--deployment", DEPLOYMENT, str(DATA / "sample_2spk.wav"), str(DATA / "enrol_rms.wav"), "--language",
                 "en", "--json", "--remote-jobs", "2", "--download-dir", str(local)]) == 0
    captured = capsys.readouterr()
    first, at = json.JSONDecoder().raw_decode(captured.out)
    second = json.loads(captured.out[at:])
    assert first["segments"] == result["segments"]
    assert wer(manifest["enrol_rms.wav"]["text"], " ".join(s["text"] for s in second["segments"])) <= 0.25
    assert (local / "sample_2spk.srt").read_text() == (out / "sample_2spk.srt").read_text()
    assert (local / "enrol_rms.json").is_file() and captured.err.count(": remote job ") == 2

    assert main(["--deployment", DEPLOYMENT, str(DATA / "sample_2spk.wav"), "--deepgram-api-key", "dg-secret-9",
                 "--download-dir", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "prefect-secret:" in err and "dg-secret-9" not in err and not (tmp_path / "never").exists()
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs(limit=200)) == len(runs) + 2  # the local-path runs only
    assert main(["--deployment", "transcribe-audio/no-such-deployment", "s3://runpod-audio/audio/sample_2spk.wav"]) == 2
    assert "no such deployment" in capsys.readouterr().err
