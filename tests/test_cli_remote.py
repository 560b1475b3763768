"""The command line's remote mode (issue 21), for the pipeline script's users: ``--endpoint URL
--api-key KEY [--sync]`` sends the request to a RunPod-compatible endpoint (this project's own, in
its in-process mode, on 127.0.0.1), local audio goes up to a real S3 server (moto) and is sent as
a presigned URL, and the same output files are written locally. ``--deployment`` is tested with
the deployment runner in tests/test_runpod_deployment.py."""
from __future__ import annotations

import json
import re
import time

import pytest
import requests

from conftest import DATA, serving_runpod_api, wer, wer_limit

KEY = "remote-mode-key"


@pytest.fixture(scope="module")
def endpoint(prefect_harness, s3_server):
    from deployments.runpod_api import Jobs
    from deployments.runpod_handler import handler

    with serving_runpod_api(KEY, Jobs(lambda job, job_id: handler(job, flow_run_name=job_id), workers=1)) as base:
        yield f"{base}/whisperx"


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    # the endpoint's side: local paths only under these roots; its fetches may reach the S3 server on 127.0.0.1
    monkeypatch.setenv("ALLOW_LOCAL_PATHS", f"{tmp_path / 'nothing'}")
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)


def _text(name: str) -> str:
    return json.loads((DATA / "fixtures.json").read_text())[name]["text"]


def test_sync_uploads_the_local_file_and_writes_the_outputs_here(endpoint, s3, tmp_path, capsys):
    from flows.cli import main

    s3.create_bucket(Bucket="remote-audio")
    out = tmp_path / "out"
    code = main(["--endpoint", endpoint, "--sync", str(DATA / "sample_2spk.wav"), "--language", "en",
                 "--bucket", "remote-audio", "--download-dir", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == [
        "sample_2spk.json", "sample_2spk.segments.json", "sample_2spk.srt", "sample_2spk.vtt"]
    result = json.loads((out / "sample_2spk.json").read_text())
    assert wer(_text("sample_2spk.wav"), " ".join(s["text"] for s in result["segments"])) <= wer_limit("sample_2spk.wav")
    assert "-->" in (out / "sample_2spk.srt").read_text() and captured.out.count("] ") == len(result["segments"])
    assert "uploaded: sample_2spk.wav -> s3://remote-audio/audio/sample_2spk.wav" in captured.err
    assert s3.head_object(Bucket="remote-audio", Key="audio/sample_2spk.wav")["ContentLength"] > 0
    ours = "".join(line for line in captured.err.splitlines(True)  # not the S3 server's own request log
                   if "werkzeug" not in line and "GET /remote-audio/" not in line)
    assert KEY not in ours + captured.out and not re.search(r"X-Amz-Signature=[0-9a-f]", ours)


def test_async_polls_status_and_renders_the_chosen_format(endpoint, s3, tmp_path, capsys):
    """/run then /status; an s3:// source is sent as it is; --output-format and --json as locally."""
    from flows.cli import main

    s3.create_bucket(Bucket="remote-src")
    s3.upload_file(str(DATA / "enrol_slt.wav"), "remote-src", "calls/slt.wav")
    out = tmp_path / "out"
    code = main(["--endpoint", endpoint, "s3://remote-src/calls/slt.wav", "--language", "en", "--output_format", "txt",
                 "--output_dir", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["slt.json", "slt.txt"]
    printed = json.loads(captured.out)
    assert printed["segments"] and (out / "slt.txt").read_text().strip()
    assert wer(_text("enrol_slt.wav"), (out / "slt.txt").read_text()) <= 0.25  # one short sentence


def test_refusals_and_failures_write_nothing(endpoint, s3, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "out"
    # a local file with no bucket: the endpoint could not read it; refused before anything is sent
    assert main(["--endpoint", endpoint, str(DATA / "sample_2spk.wav"), "--download-dir", str(out)]) == 2
    assert "the endpoint cannot read it; give --bucket" in capsys.readouterr().err
    # the wrong key: one line, the key not echoed
    assert main(["--endpoint", endpoint, "--api-key", "wrong-key", "s3://remote-src/x.wav", "--download-dir",
                 str(out)]) == 1
    err = capsys.readouterr().err
    assert "refused the key" in err and "wrong-key" not in err
    # the job fails at the endpoint: its error, exit 1
    s3.create_bucket(Bucket="remote-empty")
    assert main(["--endpoint", endpoint, "--sync", "s3://remote-empty/missing.wav", "--download-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "missing.wav" in err
    # nobody listening
    assert main(["--endpoint", "http://127.0.0.1:9/v2/x", "s3://remote-empty/a.wav", "--download-dir", str(out)]) == 1
    assert "cannot reach the endpoint" in capsys.readouterr().err
    # not an endpoint address
    assert main(["--endpoint", "ftp://h/x", "s3://remote-empty/a.wav"]) == 2
    assert not out.exists()


def test_the_deadline_cancels_the_remote_job(endpoint, s3, tmp_path, capsys):
    """The endpoint's one worker is busy, so the command's job waits in its queue past
    --remote-timeout: the command ends with exit 1 and the job is cancelled there."""
    from flows.cli import main

    auth = {"Authorization": f"Bearer {KEY}"}
    s3.create_bucket(Bucket="remote-slow")
    s3.upload_file(str(DATA / "enrol_awb.wav"), "remote-slow", "awb.wav")
    busy = requests.post(f"{endpoint}/run", headers=auth, timeout=30, json={"input": {
        "audio_file": "s3://remote-slow/awb.wav", "force": True, "language": "en"}}).json()["id"]
    started = time.monotonic()
    code = main(["--endpoint", endpoint, "s3://remote-slow/awb.wav", "--remote-timeout", "1", "--download-dir",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "did not finish within 1 s" in err and time.monotonic() - started < 30, err
    job = err.split("remote job ")[1].split()[0]

    def final(job_id: str) -> str:
        deadline = time.monotonic() + 300
        while (state := requests.get(f"{endpoint}/status/{job_id}", headers=auth, timeout=30).json()["status"]) \
                not in ("CANCELLED", "COMPLETED", "FAILED"):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        return state

    assert final(job) == "CANCELLED" and not (tmp_path / "out").exists()
    assert final(busy) == "COMPLETED"


@pytest.mark.parametrize("value, expected", [
    ("abc123", ("https://api.runpod.ai/v2", "abc123")),
    ("http://127.0.0.1:8000/v2/whisperx", ("http://127.0.0.1:8000/v2", "whisperx")),
    ("https://api.runpod.ai/v2/abc123/runsync", ("https://api.runpod.ai/v2", "abc123")),
])
def test_endpoint_addresses(value, expected):
    from flows.remote import endpoint_address

    assert endpoint_address(value) == expected


@pytest.mark.parametrize("value", ["http://host", "ftp://h/v2/x", "a b", "http:///v2/x"])
def test_bad_endpoint_addresses(value):
    from flows.remote import endpoint_address
    from speech.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        endpoint_address(value)
